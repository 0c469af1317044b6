"""The labeling station's core (app/station.py, issue 15): the queue's strategies and filters,
undoable actions (assign, accept, correct, remove) restored exactly, history, counters, and the
model following the labels without blocking the station."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fewshot_studio.app import Workspace, modeling, projects, station
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.errors import DataError
from fewshot_studio.jobs import TRAIN

TINY = BackboneSpec("tiny", None, device="cpu")
CLASSES = ["circle", "square", "star"]
# five pool images, three classes; the orders differ by strategy:
#   image  p                  1 − p1   p1 − p2   entropy
#   0      .50 .49 .01        .50      .01       .745
#   1      .40 .30 .30        .60      .10       1.089
#   2      .90 .05 .05        .10      .85       .394
#   3      .45 .45 .10        .55      .00       .948
#   4      .20 .70 .10        .30      .50       .802
PROBS = [[.50, .49, .01], [.40, .30, .30], [.90, .05, .05], [.45, .45, .10], [.20, .70, .10]]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def pool(tmp_path, tiny):
    """A project with three classes (one example each), five pool images and a current
    GraphAdapter-kind model (not closed-form) whose stored predictions are PROBS."""
    ws = Workspace.at(tmp_path / "data", TINY, loader=lambda spec: tiny)
    store = ws.store
    p = store.create_project("Station")
    cls = [store.add_class(p.id, c) for c in CLASSES]
    for n, c in enumerate(cls):
        store.add_images(p.id, [(f"ex{n}.png", png(100 + n))], class_id=c.id)
    imgs, _ = store.add_images(p.id, [(f"pool{n}.png", png(n)) for n in range(len(PROBS))])
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    model = store.register_model(p.id, "graph", "tiny", {"classes": CLASSES}, {}, d)
    store.save_predictions(model.id, [(img.id, cls[int(np.argmax(pr))].id, max(pr), pr)
                                      for img, pr in zip(imgs, PROBS)])
    yield ws, ws.scope(p.id), [i.id for i in imgs], {c.name: c.id for c in cls}, model
    ws.close()


def ids_of(page, imgs) -> list[int]:
    """The queue's order as pool indices 0..4."""
    return [imgs.index(it.image_id) for it in page.items]


def test_queue_orders_by_each_strategy(pool):
    ws, sc, imgs, cid, model = pool
    assert ids_of(station.queue(sc, "least-confident"), imgs) == [1, 3, 0, 4, 2]
    assert ids_of(station.queue(sc, "margin"), imgs) == [3, 0, 1, 4, 2]
    assert ids_of(station.queue(sc, "entropy"), imgs) == [1, 3, 4, 0, 2]
    page = station.queue(sc)
    assert page.total == 5 and page.model_id == model.id and page.model_label == f"GraphAdapter #{model.id}"
    first = page.items[0]
    assert (first.label, first.confidence, first.name) == ("circle", pytest.approx(.40), "pool1.png")
    assert [c for c, _ in first.top] == ["circle", "square", "star"] and first.top[0][1] == pytest.approx(.40)
    assert first.margin == pytest.approx(.10) and first.entropy == pytest.approx(-(np.log(.4) * .4 + .6 * np.log(.3)))
    # grid mode: sort overrides, filters, paging, skipped to the end in skip order
    assert ids_of(station.queue(sc, sort="confidence"), imgs) == [1, 3, 0, 4, 2]
    assert ids_of(station.queue(sc, sort="margin"), imgs) == [3, 0, 1, 4, 2]
    assert ids_of(station.queue(sc, sort="entropy"), imgs) == [1, 3, 4, 0, 2]
    assert ids_of(station.queue(sc, predicted="circle"), imgs) == [1, 3, 0, 2]
    assert ids_of(station.queue(sc, min_confidence=.45, max_confidence=.7), imgs) == [3, 0, 4]
    page = station.queue(sc, offset=1, limit=2)
    assert ids_of(page, imgs) == [3, 0] and page.total == 5
    assert ids_of(station.queue(sc, skipped=[imgs[3], imgs[1]]), imgs) == [0, 4, 2, 3, 1]
    with pytest.raises(DataError):
        station.queue(sc, "random")
    # predictions saved again (the pool relabeled) are read again, not a kept copy
    ws.store.save_predictions(model.id, [(imgs[2], cid["star"], .34, [.33, .33, .34])])
    assert ids_of(station.queue(sc), imgs) == [2, 1, 3, 0, 4]
    assert station.queue(sc).items[0].label == "star"


def test_diverse_queue_uses_cached_features_or_says_why_not(pool):
    ws, sc, imgs, _, _ = pool
    page = station.queue(sc, "diverse", limit=2)
    assert page.strategy == "entropy" and page.note.startswith("Not every pool image")  # nothing cached yet
    assert ids_of(page, imgs) == [1, 3]
    # cache features: images 1 and 3 (the two least confident) coincide, 0 is far from them
    store = ws.store
    hashes = [store.get_image(i).hash for i in imgs]
    f = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, .01, 0], [0, 0, 1]], dtype=np.float32)
    ws.cache.put_many("tiny", [(h, 0) for h in hashes], f)
    page = station.queue(sc, "diverse", limit=2)
    assert page.strategy == "diverse" and page.note == ""
    # shortlist 8 ⊇ all five; first the least confident (1), then the farthest from it: 0, 2 or 4, never 3
    order = ids_of(station.queue(sc, "diverse", limit=5), imgs)
    assert order[0] == 1 and order[1] != 3 and sorted(order) == [0, 1, 2, 3, 4]
    assert ids_of(page, imgs)[0] == 1 and ids_of(page, imgs)[1] in (0, 2, 4)


def state(ws, i):
    img = ws.store.get_image(i)
    return img.class_id, img.labeled_by


def test_assign_accept_and_correct_are_undone_exactly(pool):
    ws, sc, imgs, cid, model = pool
    a = station.assign(sc, [imgs[0], imgs[4]])  # accept the predictions
    assert (a.kind, a.count, a.refit_job) == ("accept", 2, None) and a.summary.startswith("Accepted")
    assert state(ws, imgs[0]) == (cid["circle"], "accepted") and state(ws, imgs[4]) == (cid["square"], "accepted")
    assert station.queue(sc).total == 3
    b = station.assign(sc, [imgs[1], imgs[4]], "star")  # a correction (and a relabel of a labeled image)
    assert b.kind == "correct" and b.summary == "Labeled 2 images as star."
    assert state(ws, imgs[1]) == (cid["star"], "corrected") and state(ws, imgs[4]) == (cid["star"], "corrected")
    station.assign(sc, [imgs[2]], "circle")  # the class it predicted: an accepted label
    assert state(ws, imgs[2]) == (cid["circle"], "accepted")
    assert station.counters(sc).labeled_today == 4
    u = station.undo(sc)
    assert u.kind == "undo" and u.count == 1 and state(ws, imgs[2]) == (None, None)
    station.undo(sc)
    assert state(ws, imgs[1]) == (None, None) and state(ws, imgs[4]) == (cid["square"], "accepted")
    station.undo(sc)
    assert state(ws, imgs[0]) == (None, None) and state(ws, imgs[4]) == (None, None)
    with pytest.raises(DataError, match="Nothing to undo."):
        station.undo(sc)
    page = station.queue(sc)  # every prediction listed again
    assert page.total == 5 and {it.image_id for it in page.items} == set(imgs)
    hist = station.history(sc)
    assert [h.kind for h in hist] == ["undo", "undo", "undo", "correct", "correct", "accept"]
    assert all(h.undone for h in hist[3:]) and station.counters(sc).labeled_today == 0
    # the old entry points log undoable actions too, with their return types kept
    lab = modeling.accept(sc, [imgs[3]])
    assert lab == modeling.Labeled(1, None, "") and state(ws, imgs[3]) == (cid["circle"], "accepted")
    lab = modeling.correct(sc, [imgs[2]], "square")
    assert lab == modeling.Labeled(1, None, "") and state(ws, imgs[2]) == (cid["square"], "corrected")
    station.undo(sc)
    station.undo(sc)
    assert state(ws, imgs[3]) == (None, None) and state(ws, imgs[2]) == (None, None)
    assert modeling.accept_confident(sc, 0.85).count == 1 and state(ws, imgs[2])[1] == "accepted"
    station.undo(sc)
    assert state(ws, imgs[2]) == (None, None)
    with pytest.raises(DataError):
        station.assign(sc, [])


def test_accept_gives_the_class_that_was_shown_even_if_a_refit_changed_it(pool):
    """The race of the review: a refit lands between drawing the screen and the key press; Enter
    accepts what the user saw, never the new prediction they did not see."""
    ws, sc, imgs, cid, model = pool
    shown = station.queue(sc, limit=5)
    seen = {it.image_id: it.label for it in shown.items}
    assert seen[imgs[0]] == "circle"
    # a "refit" now predicts star for every pool image
    ws.store.save_predictions(model.id, [(i, cid["star"], .9, [.05, .05, .9]) for i in imgs])
    a = station.assign(sc, [imgs[0], imgs[4]], shown={i: seen[i] for i in (imgs[0], imgs[4])})
    assert a.kind == "accept" and a.count == 2
    assert state(ws, imgs[0]) == (cid["circle"], "accepted") and state(ws, imgs[4]) == (cid["square"], "accepted")
    station.undo(sc)
    assert state(ws, imgs[0]) == (None, None)
    # without `shown` an accept takes the stored prediction (the table's Accept, the CLI)
    station.assign(sc, [imgs[0]])
    assert state(ws, imgs[0]) == (cid["star"], "accepted")
    with pytest.raises(DataError, match="no prediction on screen"):
        station.assign(sc, [imgs[1]], shown={})
    with pytest.raises(DataError, match="no longer exists"):
        station.assign(sc, [imgs[1]], shown={imgs[1]: "hexagon"})
    with pytest.raises(DataError, match="already labeled"):
        station.assign(sc, [imgs[0]], shown={imgs[0]: "circle"})


def test_remove_is_undone_with_labels_and_predictions(pool):
    ws, sc, imgs, cid, model = pool
    station.assign(sc, [imgs[4]], "star")
    r = station.remove(sc, [imgs[4], imgs[0]])
    assert (r.kind, r.count, r.summary) == ("remove", 2, "Removed 2 images.")
    assert station.queue(sc).total == 3 and station.counters(sc).pool_left == 3
    assert station.counters(sc).per_class == {"circle": 1, "square": 1, "star": 1}
    station.undo(sc)
    assert state(ws, imgs[4]) == (cid["star"], "corrected") and state(ws, imgs[0]) == (None, None)
    assert station.queue(sc).total == 4  # imgs[0]'s prediction is listed again; imgs[4] is labeled
    assert {p.image_id for p in ws.store.list_predictions(model.id)} == set(imgs)
    station.undo(sc)
    assert station.queue(sc).total == 5


def test_history_counters_and_owners(pool):
    ws, sc, imgs, cid, model = pool
    ann, bob = ws.scope(sc.id, "ann"), ws.scope(sc.id, "bob")
    station.assign(ann, [imgs[0]])
    station.assign(bob, [imgs[1]], "square")
    with pytest.raises(DataError):
        station.undo(sc)  # nothing of the local owner's
    station.undo(ann)  # ann's, not bob's later one
    assert state(ws, imgs[0]) == (None, None) and state(ws, imgs[1]) == (cid["square"], "corrected")
    c = station.counters(sc)
    assert c.labeled_today == 1 and c.pool_left == 4
    assert c.per_class == {"circle": 1, "square": 2, "star": 1}
    assert c.cv_accuracy is None and c.model_label == f"GraphAdapter #{model.id}"
    assert [h.summary for h in station.history(sc, 2)] == ["Undid: Accepted the predictions of 1 image.",
                                                         "Labeled 1 image as square."]
    # labels made yesterday do not count today
    with ws.store._tx() as conn:
        conn.execute("UPDATE actions SET created = created - 86400")
    assert station.counters(sc).labeled_today == 0
    # an Auto model's cross-validated accuracy is the counter's
    assert station.cv_accuracy(model.__class__(**{**model.__dict__, "metrics": {
        "auto": {"winner": "gda", "cv_accuracy": {"gda": .9, "tip": .8}}}})) == .9
    assert station.cv_accuracy(model.__class__(**{**model.__dict__, "metrics": {"cv": {"accuracy": .75}}})) == .75


def test_retrain_after_n_labels_runs_in_the_background(pool, monkeypatch):
    """Past `every` labels a non-closed-form model retrains as a job; `assign` returns while
    that job runs (it blocks on an Event here), and a second one is not queued meanwhile."""
    ws, sc, imgs, cid, model = pool
    release, started, calls = threading.Event(), threading.Event(), []

    def fake_retrain(scope, *, refresh=False):
        calls.append(refresh)

        def work(job):
            started.set()
            release.wait(60)
            return "retrained"
        return ws.runner.submit(TRAIN, work, scope.id, owner=scope.owner)

    monkeypatch.setattr(modeling, "retrain", fake_retrain)
    try:
        a = station.assign(sc, [imgs[0]], every=2)
        assert a.refit_job is None and calls == []  # 1 label < 2
        b = station.assign(sc, [imgs[1]], every=2)
        assert b.refit_job is not None and calls == [True]  # refresh: predict, then become current
        assert started.wait(30)
        assert ws.runner.get(b.refit_job).status == "running"  # assign returned while it runs
        c = station.assign(sc, [imgs[2], imgs[3]], every=2)  # past N again: one is pending, none more
        assert c.refit_job is None and calls == [True] and c.count == 2
        assert ws.runner.get(b.refit_job).status == "running"
    finally:
        release.set()
    assert ws.runner.wait(b.refit_job, 30).status == "done"


def test_migrated_database_opens_in_the_station(tmp_path, tiny):
    from fewshot_studio.store import MIGRATIONS, ProjectStore

    root = tmp_path / "data"
    with ProjectStore(root, migrations=MIGRATIONS[:3]) as s:  # before the action log
        p = s.create_project("Old")
        s.add_class(p.id, "cat")
        s.add_images(p.id, [("a.png", png(1))])
    ws = Workspace.at(root, TINY, loader=lambda spec: tiny)
    try:
        sc = ws.scope(p.id)
        assert station.history(sc) == [] and station.counters(sc).pool_left == 1
        img = ws.store.list_images(p.id, pool=True)[0]
        station.assign(sc, [img.id], "cat")
        station.undo(sc)
        assert ws.store.get_image(img.id).class_id is None
    finally:
        ws.close()


@pytest.mark.slow  # trains end to end (GraphAdapter and GDA on the shapes example)
def test_the_model_follows_the_labels_end_to_end(tiny, tmp_path):
    ws = Workspace.at(tmp_path / "data", TINY, loader=lambda spec: tiny)
    try:
        p = projects.load_example(ws, "shapes")
        sc = ws.scope(p.id)
        first = ws.runner.wait(modeling.start_training(sc, "graph"), 300).result
        modeling.label_pool(sc)
        page = station.queue(sc, limit=3)
        assert page.model_id == first.id and len(page.items) == 3
        a = station.assign(sc, [it.image_id for it in page.items], every=3)
        assert a.refit_job is not None
        st = ws.runner.wait(a.refit_job, 300)
        assert st.status == "done", st.message
        now = modeling.current_model_info(sc)
        assert now.id != first.id and now.method == "graph"
        page = station.queue(sc)  # the new model's predictions, for the pool left
        assert page.model_id == now.id and page.total == 12
        # a closed-form model refits at once and records its cross-validated accuracy
        gda = ws.runner.wait(modeling.start_training(sc, "gda", settings={"augment_views": 0}), 300).result
        modeling.label_pool(sc)
        b = station.assign(sc, [station.queue(sc).items[0].image_id])
        assert b.refit_job is not None
        assert ws.runner.wait(b.refit_job, 300).status == "done"
        deadline = time.time() + 120
        while modeling.active_job(ws, p.id) is not None and time.time() < deadline:
            time.sleep(0.05)
        c = station.counters(sc)
        assert 0.0 <= c.cv_accuracy <= 1.0 and f"of #{gda.id})" in c.model_label
        assert station.queue(sc).total == 11
    finally:
        ws.close()


def test_a_refit_never_replaces_a_model_made_current_meanwhile(pool, tmp_path):
    """An instant refit (or its re-search) of model A that finishes after model B became
    current is dropped: B stays current and the refit is deleted."""
    ws, sc, imgs, cid, model = pool
    store = ws.store

    def register(name: str, config: dict):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        return store.register_model(sc.id, "gda", "tiny", {"classes": CLASSES, **config}, {}, d)

    refit = register("refit", {modeling.REFIT: {"of": model.id, "count": 1, "settings": {}, "searched": False}})
    newer = register("newer", {})
    store.set_current_model(sc.id, newer.id)

    class Job:
        report, cancel_event = None, threading.Event()

    with pytest.raises(DataError, match="newer model became current"):
        modeling._after_refit(sc, Job(), refit, None)
    assert store.current_model(sc.id).id == newer.id
    assert refit.id not in [m.id for m in store.list_models(sc.id)]


def test_a_refit_still_queued_is_cancelled_by_the_next_label(pool):
    """Each refit predicts the whole pool again: a refit that has not started when the next
    label asks for one is cancelled (the newer one fits the same labels and more), so quick
    labels queue at most one refit instead of one each; the one that ran leaves its
    predictions parsed for the station's next queue."""
    from fewshot_studio.jobs import CANCELLED, DONE, RUNNING

    ws, sc, imgs, cid, model = pool
    assert ws.runner.wait(modeling.start_training(sc, "gda"), 300).status == DONE
    modeling.label_pool(sc)
    gate = threading.Event()
    blocker = ws.runner.submit(TRAIN, lambda job: gate.wait(60), sc.id)  # holds the one CPU slot
    try:
        deadline = time.time() + 30
        while ws.runner.get(blocker).status != RUNNING and time.time() < deadline:
            time.sleep(0.01)
        first = station.assign(sc, [imgs[0]])
        second = station.assign(sc, [imgs[1]])
        assert first.refit_job and second.refit_job and first.refit_job != second.refit_job
    finally:
        gate.set()
    assert ws.runner.wait(first.refit_job, 60).status == CANCELLED
    # whoever waits on the cancelled one is pointed to the refit that replaced it
    assert modeling.newer_refit(sc, first.refit_job) == second.refit_job
    assert modeling.newer_refit(sc, second.refit_job) is None
    assert ws.runner.wait(second.refit_job, 300).status == DONE
    # one refit ran, on both labels
    current = modeling.current_model_info(sc)
    assert modeling.refit_lineage(current)["count"] == 1
    assert len(ws.store.support_set(sc.id).images) == len(CLASSES) + 2
    # the finished refit's (or re-search's) predictions were parsed in its job, for the next queue
    deadline = time.time() + 30
    while time.time() < deadline and modeling.current_model_info(sc).id not in station._COLUMNS.get(ws.store, {}):
        time.sleep(0.02)
    assert modeling.current_model_info(sc).id in station._COLUMNS[ws.store]


def test_queue_finds_an_image_anywhere_in_its_order(pool):
    """`find`: the position of one image in the whole order, whatever page is asked for."""
    ws, sc, imgs, cid, model = pool
    page = station.queue(sc, "least-confident", offset=0, limit=1, find=imgs[2])
    assert page.found == 4 and ids_of(page, imgs) == [1]
    assert station.queue(sc, "margin", limit=1, find=imgs[0]).found == 1
    assert station.queue(sc, "least-confident", limit=1, skipped=[imgs[1]], find=imgs[1]).found == 4
    assert station.queue(sc, predicted="square", find=imgs[0]).found is None


def test_queue_puts_the_inspected_outliers_first_or_last(pool, monkeypatch):
    from fewshot_studio.app import insight as app_insight

    ws, sc, imgs, cid, model = pool
    assert ids_of(station.queue(sc, station.OUTLIERS_FIRST), imgs) == [1, 3, 0, 4, 2]  # nothing inspected yet
    monkeypatch.setattr(app_insight, "outlier_ids", lambda scope: {imgs[4], imgs[0]})
    page = station.queue(sc, station.OUTLIERS_FIRST)
    assert ids_of(page, imgs) == [0, 4, 1, 3, 2] and page.strategy == station.OUTLIERS_FIRST
    assert ids_of(station.queue(sc, station.OUTLIERS_LAST), imgs) == [1, 3, 2, 0, 4]
