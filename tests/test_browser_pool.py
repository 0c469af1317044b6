"""A 10,000-image pool through the service and Chromium (issue 15, item 6): the shapes example
with a GDA model (closed form: every label refits it and predicts the whole pool again) and
10,000 small generated pool images without predictions. Label the pool is pressed in the
browser; the station must show its first review image while the job still runs (the first
stored chunk), then twenty keyboard actions each bring the next image, checked in the store; once the
labeling ended, twenty more (each label's refit now predicts all 10,000 images again).

Budgets (stated in the README's note, generous for a busy shared 2-core machine, where the
measured figures are far below them): the first review image within FIRST_IMAGE_BUDGET_S of
the press, the p95 of key → next image within ACTION_P95_BUDGET_S. Run with -s for the figures."""
from __future__ import annotations

import io
import statistics
import time

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import modeling, projects

from helpers import HAVE_CHROMIUM, NO_CHROMIUM, launch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)]

SHAPES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
POOL = 10_000  # generated pool images, on top of the example's 15
PX = 32  # their side: small, so that making them and the upload take seconds
ACTIONS = 20
FIRST_IMAGE_BUDGET_S = 20.0
ACTION_P95_BUDGET_S = 2.5


@pytest.fixture
def project(studio):
    """The shapes example, a GDA model of it, and POOL generated pool images added in one batch
    (every one still decoded and checked by the store), none of them predicted yet."""
    from fewshot_studio.jobs import DONE

    p = projects.load_example(studio, "shapes")
    scope = studio.scope(p.id)
    job = modeling.start_training(scope, "gda", modeling.backbone_spec(studio, "tiny"), {})
    assert studio.runner.wait(job, timeout=180).status == DONE
    rng = np.random.default_rng(7)

    def png(k: int) -> bytes:
        b = io.BytesIO()
        shapes.render(shapes.ShapeSpec(*SHAPES[k % 5].split(" ", 1)), rng, PX, supersample=1).save(b, "PNG")
        return b.getvalue()

    t0 = time.perf_counter()
    added, errors = studio.store.add_images(p.id, ((f"gen_{k:05d}.png", png(k)) for k in range(POOL)), class_id=None)
    print(f"\n{POOL} pool images made and stored in {time.perf_counter() - t0:.1f} s")
    assert len(added) == POOL and not errors
    return p


@pytest.fixture
def app(studio, project):
    demo = launch(studio)
    yield demo
    demo.close()


def shown_id(page) -> int | None:
    shown = page.locator("#station-image [data-image-id]").get_attribute("data-image-id")
    return int(shown) if shown else None


def wait_for_change(page, before: int | None, timeout: float = 60.0) -> float:
    """Seconds until the review shows an image other than `before`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        shown = shown_id(page)
        if shown is not None and shown != before:
            return time.perf_counter() - t0
        page.wait_for_timeout(10)
    toasts = page.locator(".toast-body").all_inner_texts()
    raise AssertionError(f"the review still shows image {before} after {timeout:.0f} s (toasts: {toasts})")


def keyboard_actions(page, store, classes: dict[str, int]) -> dict[int, float]:
    """ACTIONS keys (accept and numbers), each checked in the store once the next image shows:
    {image labeled: seconds from its key to the next image}."""
    names = list(classes)
    keys = ["Enter", "2", "Enter", "4", "a"]
    out = {}
    for k in range(ACTIONS):
        key = keys[k % len(keys)]
        before = shown_id(page)
        prediction = page.locator("#station-image figcaption b").inner_text()
        page.keyboard.press(key)
        try:
            seconds = wait_for_change(page, before)
        except AssertionError as e:
            raise AssertionError(f"key {key!r} (action {k + 1}): {e}") from None
        img = store.get_image(before)
        want = prediction if key in ("Enter", "a") else names[int(key) - 1]
        assert img.class_id == classes[want], (key, before, img)
        assert img.labeled_by == ("accepted" if want == prediction else "corrected")
        out[before] = seconds
    return out


def test_ten_thousand_pool_images_first_review_image_and_keyboard_actions(studio, project, app, browser):
    from playwright.sync_api import expect

    from fewshot_studio.jobs import LABEL

    store = studio.store
    classes = {c.name: c.id for c in store.list_classes(project.id)}
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app.local_url)
    expect(page.locator("#status-banner")).to_contain_text("tiny", timeout=60_000)
    page.get_by_role("tab", name="5 · Predict & label").click()
    expect(page.locator("#station-image .fs-empty")).to_be_visible(timeout=30_000)  # nothing predicted yet

    t0 = time.perf_counter()
    page.click("#label-pool-btn")
    first_image_s = wait_for_change(page, None, timeout=120)
    # the first image came from a chunk, while the job still labels the rest of the pool
    running = modeling.active_job(studio, project.id, LABEL)
    scored_then = len(store.list_predictions(modeling.current_model_info(studio.scope(project.id)).id))
    print(f"first review image {first_image_s:.2f} s after pressing Label the pool "
          f"({scored_then} of {POOL + 15} images scored then; labeling still running: {running is not None})")
    assert running is not None and scored_then < POOL

    page.locator("body").click(position={"x": 5, "y": 5})  # the focus on the page, not in a box
    during = keyboard_actions(page, store, classes)
    while_labeling_s = time.perf_counter() - t0
    # then with the whole pool scored: each label's refit predicts all 10,000 images again
    deadline = time.time() + 300
    while modeling.active_job(studio, project.id, LABEL) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert modeling.active_job(studio, project.id, LABEL) is None, "the pool labeling did not end in 5 minutes"
    labeled_s = time.perf_counter() - t0
    page.wait_for_timeout(1500)  # the station's last refresh after the labeling
    after = keyboard_actions(page, store, classes)
    done = [*during, *after]
    assert len(set(done)) == 2 * ACTIONS  # each action labeled another image
    assert len(store.list_images(project.id, pool=True)) == 15 + POOL - 2 * ACTIONS
    assert all(store.get_image(i).class_id is not None for i in done)
    p95 = {}
    for name, actions in (("while the pool is labeled", during), ("with the whole pool scored", after)):
        seconds = sorted(actions.values())
        p95[name] = seconds[int(0.95 * (len(seconds) - 1))]
        print(f"{ACTIONS} keyboard actions {name}: median {statistics.median(seconds) * 1000:.0f} ms, "
              f"p95 {p95[name] * 1000:.0f} ms, max {seconds[-1] * 1000:.0f} ms from key to the next image")
    print(f"labeling {POOL} images took {labeled_s:.1f} s; the first {ACTIONS} actions were done "
          f"{while_labeling_s:.1f} s after pressing Label the pool")
    assert first_image_s <= FIRST_IMAGE_BUDGET_S, f"first review image after {first_image_s:.1f} s"
    for name, seconds in p95.items():
        assert seconds <= ACTION_P95_BUDGET_S, f"p95 action {name}: {seconds:.2f} s"
    assert not errors, errors
    context.close()
