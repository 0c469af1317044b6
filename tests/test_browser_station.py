"""The labeling station in Debian's Chromium (Playwright): keyboard-only review of a generated
shapes pool, checked against the store after every key; a grid bulk action on ten tiles picked
by click and shift-click; undo restoring labels exactly; the layout at 400 px. The keyboard
test prints its pace (run with -s): the README's actions-per-minute figure, and saves the
station's picture for the README (docs/station.png)."""
from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import modeling, projects

from helpers import HAVE_CHROMIUM, NO_CHROMIUM, launch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)]

STATION_SHOT = Path(__file__).resolve().parent.parent / "docs" / "station.png"
SHAPES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
POOL = 40  # generated pool images, on top of the example's 15


def png(label: str, seed: int) -> bytes:
    b = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 64).save(b, "PNG")
    return b.getvalue()


@pytest.fixture
def project(studio):
    """The shapes example with POOL more generated pool images, a GDA model (closed form: every
    label refits it) and its stored predictions of the pool."""
    from fewshot_studio.jobs import DONE

    p = projects.load_example(studio, "shapes")
    scope = studio.scope(p.id)
    studio.store.add_images(p.id, [(f"gen_{k:03d}.png", png(SHAPES[k % 5], 1000 + k)) for k in range(POOL)],
                            class_id=None)
    job = modeling.start_training(scope, "gda", modeling.backbone_spec(studio, "tiny"), {})
    assert studio.runner.wait(job, timeout=180).status == DONE
    modeling.label_pool(scope)
    return p


@pytest.fixture
def app(studio, project):
    demo = launch(studio)
    yield demo
    demo.close()


def open_station(browser, app, width: int = 1400):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": width, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(app.local_url)
    expect(page.locator("#status-banner")).to_contain_text("tiny", timeout=60_000)
    tab = page.get_by_role("tab", name="5 · Predict & label")
    if not tab.is_visible():  # a narrow page keeps the other tabs behind "More tabs"
        page.locator("#tabs > .tab-wrapper .overflow-menu button").first.click()
        tab = page.locator(".overflow-dropdown button", has_text="5 · Predict & label")
    tab.click()
    expect(page.locator("#station-image [data-image-id]")).not_to_have_attribute("data-image-id", "",
                                                                                 timeout=30_000)
    return context, page


def on_screen(page) -> int:
    return int(page.locator("#station-image [data-image-id]").get_attribute("data-image-id"))


def wait_for_change(page, before: int, timeout: float = 20.0) -> float:
    """Seconds until the image on screen is another than `before` (the next one shows)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        shown = page.locator("#station-image [data-image-id]").get_attribute("data-image-id")
        if shown and int(shown) != before:
            return time.perf_counter() - t0
        page.wait_for_timeout(10)
    toasts = page.locator(".toast-body").all_inner_texts()
    raise AssertionError(f"image {before} stayed on screen (toasts: {toasts})")


def state_of(studio, image_id: int) -> tuple[int | None, str | None]:
    img = studio.store.get_image(image_id)
    return img.class_id, img.labeled_by


def class_id(studio, project, name: str) -> int:
    return next(c.id for c in studio.store.list_classes(project.id) if c.name == name)


def test_twenty_pool_images_labeled_with_the_keyboard_alone(studio, project, app, browser):
    """Numbers, Enter, skip and undo, each checked in the store; the pace is printed."""
    context, page = open_station(browser, app)
    page.locator("body").click(position={"x": 5, "y": 5})  # the focus is on the page, not in a box
    names = [c.name for c in studio.store.list_classes(project.id)]
    seconds, labeled = [], []
    # a fixed rhythm: accept, a number, skip, accept, a number ... with an undo every seventh key
    keys = ["Enter", "2", "s", "a", "5", "Enter", "z"]
    k = 0
    while len(labeled) < 20:
        key = keys[k % len(keys)]
        k += 1
        before = on_screen(page)
        prediction = page.locator("#station-image figcaption b").inner_text()
        if key == "z":
            last = labeled.pop()
            assert state_of(studio, last) != (None, None)
            page.keyboard.press("z")
            # undo restores the label exactly: back in the pool, as it was before
            deadline = time.time() + 20
            while state_of(studio, last) != (None, None) and time.time() < deadline:
                time.sleep(0.02)
            assert state_of(studio, last) == (None, None)
            page.wait_for_timeout(300)  # the undone image is back in the queue
            continue
        page.keyboard.press(key)
        try:
            seconds.append(wait_for_change(page, before))
        except AssertionError as e:
            raise AssertionError(f"key {key!r} (number {k}): {e}") from None
        if key == "s":
            assert state_of(studio, before) == (None, None)  # skipped: still in the pool
            continue
        cls, by = state_of(studio, before)
        if key in ("Enter", "a"):
            assert cls == class_id(studio, project, prediction) and by == "accepted"
        else:
            want = names[int(key) - 1]
            assert cls == class_id(studio, project, want)
            assert by == ("accepted" if want == prediction else "corrected")
        labeled.append(before)
    # every image labeled is in its class; nothing else left the pool
    assert all(state_of(studio, i)[0] is not None for i in labeled)
    assert len(studio.store.list_images(project.id, pool=True)) == 15 + POOL - len(labeled)
    counters = page.locator("#station-counters").inner_text()
    assert f"{len(labeled)} labeled today" in counters
    page.wait_for_timeout(300)
    STATION_SHOT.parent.mkdir(exist_ok=True)
    page.locator("#station").first.screenshot(path=str(STATION_SHOT))  # the README's picture of the station
    mean, p95 = statistics.mean(seconds), sorted(seconds)[int(0.95 * (len(seconds) - 1))]
    print(f"\nstation keyboard pace: {len(seconds)} key actions, mean {mean * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms from key to the next image = {60 / mean:.0f} actions/min "
          f"(the machine's limit; a person adds the time to look)")
    assert not page.errors, page.errors
    context.close()


def test_grid_assigns_a_class_to_ten_tiles_and_undo_restores_them(studio, project, app, browser):
    from playwright.sync_api import expect

    context, page = open_station(browser, app)
    page.locator("#station-mode label", has_text="Grid").click()
    tiles = page.locator("#station-grid-tiles .fs-tile")
    expect(tiles).to_have_count(48, timeout=20_000)
    ids = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(10)]
    before = {i: state_of(studio, i) for i in ids}
    # a labeled image made part of the action would show that undo restores labels, not just pools
    tiles.nth(0).click()
    tiles.nth(9).click(modifiers=["Shift"])
    expect(page.locator("#station-grid-tiles .fs-tile[aria-selected=true]")).to_have_count(10)
    expect(page.locator("#fs-grid-count")).to_have_text("10 selected")
    page.locator("#station-grid-to input").click()
    page.get_by_role("option", name="yellow star", exact=True).click()
    page.click("#station-grid-assign")
    star = class_id(studio, project, "yellow star")
    deadline = time.time() + 20
    while any(state_of(studio, i)[0] != star for i in ids) and time.time() < deadline:
        time.sleep(0.05)
    assert all(state_of(studio, i)[0] == star for i in ids)
    expect(page.locator("#station-history li").first).to_contain_text("10", timeout=10_000)
    # the assigned images left the grid; the page holds the next ones
    expect(page.locator("#station-grid-tiles .fs-tile[aria-selected=true]")).to_have_count(0)
    shown = {int(t.get_attribute("data-image-id")) for t in tiles.all()}
    assert not shown & set(ids)

    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+z")  # the grid's bulk action is one action: one undo
    deadline = time.time() + 20
    while any(state_of(studio, i) != before[i] for i in ids) and time.time() < deadline:
        time.sleep(0.05)
    assert {i: state_of(studio, i) for i in ids} == before
    expect(tiles).to_have_count(48, timeout=10_000)

    # accept all shown, with a filter: only that predicted class's tiles are shown and accepted
    page.locator("#station-grid-class input").click()
    page.get_by_role("option", name="red circle", exact=True).click()
    expect(page.locator("#station-grid-tiles .fs-tile span").first).to_contain_text("red circle", timeout=10_000)
    captions = page.locator("#station-grid-tiles .fs-tile span").all_inner_texts()
    assert captions and all(c.startswith("red circle") for c in captions)
    shown = [int(t.get_attribute("data-image-id")) for t in tiles.all()]
    page.click("#station-grid-accept")
    red = class_id(studio, project, "red circle")
    deadline = time.time() + 20
    while any(state_of(studio, i)[0] != red for i in shown) and time.time() < deadline:
        time.sleep(0.05)
    assert all(state_of(studio, i) == (red, "accepted") for i in shown)
    assert not page.errors, page.errors
    context.close()


def test_station_at_400_px_with_visible_focus(studio, project, app, browser):
    context, page = open_station(browser, app, width=400)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways at 400 px ({width} px wide)"
    button = page.locator("#station-class-1")
    box = button.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 400 and box["height"] >= 40
    assert button.inner_text().startswith("1 · ")  # the key is on the button
    page.keyboard.press("Tab")  # keyboard focus (focus-visible), then onto the class button
    button.focus()
    outline = page.evaluate("""() => { const b = document.querySelector('#station-class-1');
        const s = getComputedStyle(b); return [s.outlineStyle, parseFloat(s.outlineWidth)]; }""")
    assert outline[0] != "none" and outline[1] >= 2, outline
    # a key still works at this width, and the help lists the keys
    page.keyboard.press("?")
    assert page.locator("#fs-keys-help").is_visible()
    before = on_screen(page)
    page.locator("body").click(position={"x": 2, "y": 2})
    page.keyboard.press("Enter")
    wait_for_change(page, before)
    assert state_of(studio, before)[1] == "accepted"
    assert not page.errors, page.errors
    context.close()


def test_a_refit_refreshes_the_predictions_and_keeps_the_image_on_screen(studio, project, app, browser):
    """GDA refits after a label (closed form, in the background): the station shows the new
    model's predictions by itself, naming that model, with the same image still under review."""
    from fewshot_studio.app import station

    scope = studio.scope(project.id)
    first = modeling.current_model_info(scope).id
    context, page = open_station(browser, app)
    page.locator("body").click(position={"x": 5, "y": 5})
    head = on_screen(page)
    page.keyboard.press("ArrowRight")  # a place inside the queue, not its head
    wait_for_change(page, head)
    before = on_screen(page)
    page.keyboard.press("Enter")
    wait_for_change(page, before)
    place = on_screen(page)
    deadline, shown = time.time() + 30, ""
    while time.time() < deadline:
        current = modeling.current_model_info(scope)
        shown = page.locator("#station-counters").inner_text()
        if current.id != first and f"predictions by {station.model_label(current)}" in shown:
            break
        page.wait_for_timeout(100)
    else:
        raise AssertionError(f"the station still shows {shown!r}")
    assert on_screen(page) == place  # the refresh kept the user's place
    assert not page.errors, page.errors
    context.close()
