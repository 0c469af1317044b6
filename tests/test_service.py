"""The app's use cases (fewshot_studio.app, what the UI calls) end to end, without Gradio:
examples, training, the knowledge graph, pool labeling, accept/correct, exports and import,
hosted isolation, one-sentence errors, and the small helpers the UI relies on (ui/presenters.py)."""
from __future__ import annotations

import csv
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_studio import shapes
from fewshot_studio.app import Workspace, exports, library, modeling, projects
from fewshot_studio.app.library import POOL
from fewshot_studio.app.projects import ASSETS
from fewshot_studio.backbone import BackboneSpec, load_backbone
from fewshot_studio.data import ImageRef
from fewshot_studio.errors import DataError, FewShotError, ModelFileError, WeightsUnavailableError
from fewshot_studio.features import FeatureExtractor
from fewshot_studio.methods import catalog, load_model
from fewshot_studio.store import NotFoundError
from fewshot_studio.ui import presenters
from fewshot_studio.ui.presenters import parse_image_ids

TINY = BackboneSpec("tiny", None, device="cpu")


def make_ws(root, tiny, hosted=False) -> Workspace:
    """A workspace whose backbone loader hands out the session's loaded `tiny` (any other spec loads)."""
    def loader(spec):
        return tiny if (spec.name, spec.pretrained, spec.checkpoint) == ("tiny", None, None) else load_backbone(spec)

    return Workspace.at(root, TINY, hosted=hosted, loader=loader)


def one_sentence(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and "Traceback" not in msg and msg.rstrip().endswith((".", ")"))


def wait_done(ws: Workspace, job_id: str):
    st = ws.runner.wait(job_id, timeout=300)
    assert st.status == "done", st.message
    return st


def png(path: Path, label: str, seed: int) -> Path:
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 64).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """The shapes example with a GraphAdapter model."""
    ws = make_ws(tmp_path_factory.mktemp("studio"), tiny)
    p = projects.load_example(ws, "shapes")
    wait_done(ws, modeling.start_training(ws.scope(p.id), "graph"))
    yield ws, p
    ws.close()


def truth() -> dict[str, str]:
    with open(ASSETS / "shapes" / "pool_truth.csv", newline="") as f:
        return {r["file"]: r["label"] for r in csv.DictReader(f)}


def test_examples_load(trained, tiny, tmp_path):
    ws, p = trained
    rows = library.class_rows(ws.scope(p.id))
    assert [r[0] for r in rows[:-1]] == ["blue square", "green triangle", "purple hexagon", "red circle",
                                         "yellow star"]
    assert all(r[2] == 4 for r in rows[:-1]) and rows[-1] == [POOL, "", 15]
    ws2 = make_ws(tmp_path, tiny)
    t = projects.load_example(ws2, "textile")
    names = [c for _, c in presenters.class_choices(ws2.scope(t.id))]
    assert set(names) == {"nominal", "local defect", "global defect"}
    assert library.class_by_name(ws2.scope(t.id), "nominal").description.startswith("a fabric surface")
    assert projects.load_example(ws2, "shapes").name == "Example: coloured shapes"
    assert projects.load_example(ws2, "shapes").name == "Example: coloured shapes (2)"
    with pytest.raises(DataError):
        projects.load_example(ws2, "nope")


def test_graph_with_visual_edges(trained):
    ws, p = trained
    kg = modeling.knowledge_graph(ws.scope(p.id))
    assert kg.classes == [c for _, c in presenters.class_choices(ws.scope(p.id))]
    assert kg.counts == [4] * 5
    assert kg.visual_edges is not None and np.asarray(kg.visual_edges).shape == (5, 5)
    assert np.allclose(np.diag(np.asarray(kg.text_edges)), 1.0, atol=1e-4)


def test_zero_shot_graph_gets_visual_edges_from_prototypes(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    p = projects.load_example(ws, "shapes")
    wait_done(ws, modeling.start_training(ws.scope(p.id), "zeroshot"))
    kg = modeling.knowledge_graph(ws.scope(p.id))
    assert kg.visual_edges is not None and np.asarray(kg.visual_edges).shape == (5, 5)


def test_label_pool_accuracy_and_active_learning_order(trained):
    ws, p = trained
    sc = ws.scope(p.id)
    rows = modeling.label_pool(sc)
    t = truth()
    assert len(rows) == len(t) == 15
    acc = np.mean([t[r.name] == r.label for r in rows])
    assert acc >= 0.8, acc
    assert [r.confidence for r in rows] == sorted(r.confidence for r in rows)
    stored = modeling.pool_predictions(sc)
    assert [(r.image_id, r.label) for r in stored] == [(r.image_id, r.label) for r in rows]
    assert all(r.top for r in stored)
    gallery = presenters.pool_gallery(sc, rows)
    assert len(gallery) == 15 and gallery[0][1].startswith(f"#{rows[0].image_id} {rows[0].label}")
    assert all(Path(thumb).is_file() for thumb, _ in gallery)


@pytest.mark.slow  # end to end: trains twice
def test_accept_correct_and_retrain_reuse_cache(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    first = wait_done(ws, modeling.start_training(sc, "graph"))
    rows = modeling.label_pool(sc)
    a, b = rows[0], rows[1]
    # GraphAdapter is not closed-form: nothing retrains until Retrain is pressed
    assert modeling.accept(sc, [a.image_id]) == modeling.Labeled(1, None, "")
    img = ws.store.get_image(a.image_id)
    assert img.labeled_by == "accepted" and img.class_id == library.class_by_name(sc, a.label).id
    other = next(n for n in ("red circle", "blue square") if n != b.label)
    assert modeling.correct(sc, [b.image_id], other) == modeling.Labeled(1, None, "")
    assert [m.id for m in modeling.models(sc)] == [first.result.id] and modeling.active_job(ws, p.id) is None
    img = ws.store.get_image(b.image_id)
    assert img.labeled_by == "corrected" and img.class_id == library.class_by_name(sc, other).id
    assert {r.image_id for r in modeling.pool_predictions(sc)}.isdisjoint({a.image_id, b.image_id})
    n = modeling.accept_confident(sc, 0.0)
    assert n.count == 13 and n.refit_job is None and modeling.pool_predictions(sc) == []
    with pytest.raises(DataError):
        modeling.accept_confident(sc, 0.5)  # nothing left to accept
    before = library.class_rows(sc)
    again = wait_done(ws, modeling.retrain(sc))
    assert len(modeling.models(sc)) == 2 and library.class_rows(sc) == before
    assert again.elapsed < max(5.0, first.elapsed * 2)  # cached features: no slower than the first fit
    assert modeling.active_job(ws, p.id) is None


def _versions(sc) -> list[int]:
    """The project's model ids, newest first, without the first models on plain views that a
    closed-form training registers before refining them (issue 14, item 6)."""
    return [m.id for m in modeling.models(sc) if (m.metrics or {}).get("views") != "plain"]


def _finished(ws, pid):
    """Wait until the project has no unfinished job (an instant refit queues its re-search)."""
    deadline = time.time() + 120
    while modeling.active_job(ws, pid) is not None:
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.mark.slow  # trains end to end
@pytest.mark.parametrize("search", [False, True])
def test_accept_refits_a_closed_form_model_at_once(tiny, tmp_path, search):
    """Item 5 of issue 14: with GDA in use, accepting (or correcting) a pool label refits the
    model without Train being pressed, and the pool's predictions come from the new model.
    With the search on, the refit reuses the searched α and a background job searches again."""
    ws = make_ws(tmp_path, tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    settings = {"augment_views": 2, "search": search, "alpha": 1.0}
    base = wait_done(ws, modeling.start_training(sc, "gda", settings=settings)).result
    assert catalog.closed_form("gda") and not catalog.closed_form("graph") and not catalog.closed_form("tip-f")
    rows = modeling.label_pool(sc)
    first, second = rows[0], rows[1]
    n_pool = len(rows)
    support_before = sum(ws.store.support_set(p.id).counts())

    lab = modeling.accept(sc, [first.image_id])
    assert lab.count == 1 and lab.refit_job is not None and lab.note == ""
    state = wait_done(ws, lab.refit_job)
    refit = state.result  # the instant refit's model, as registered
    assert state.kind == "train" and refit.method == "gda" and refit.id != base.id
    lineage = modeling.refit_lineage(refit)
    assert lineage == {"of": base.id, "count": 1, "settings": {**lineage["settings"], **settings},
                       "searched": False}
    # it used the accepted image, and the α the base model's search chose, without searching
    assert sum(refit.config["support_counts"]) == support_before + 1
    assert refit.config["hyperparameters"]["alpha"] == pytest.approx(base.metrics["alpha"])
    assert refit.config["hyperparameters"]["search"] is False and refit.metrics["searched"] is False
    _finished(ws, p.id)
    current = modeling.current_model_info(sc)
    if not search:  # nothing to search again: the refit is the model in use
        assert current.id == refit.id and modeling.refit_research(sc) is None
    else:  # the background re-search replaced the refit (same lineage), adding no version
        assert current.id not in (refit.id, base.id) and current.metrics["searched"] is True
        assert modeling.refit_lineage(current) == {**lineage, "searched": True}
    assert _versions(sc) == [current.id, base.id]
    # the pool's predictions were refreshed by the model in use, for every image still in the pool
    preds = ws.store.list_predictions(current.id, pool_only=True)
    assert len(preds) == n_pool - 1 and first.image_id not in {q.image_id for q in preds}
    assert len(modeling.pool_predictions(sc)) == n_pool - 1
    summary = presenters.model_summary(sc)
    assert f"Model #{current.id}" in summary and f"refit 1 of #{base.id}" in summary

    # a correction refits again; still one refit model beside the base
    other = next(c for c in ("red circle", "blue square") if c != second.label)
    lab = modeling.correct(sc, [second.image_id], other)
    assert lab.count == 1 and lab.refit_job is not None
    wait_done(ws, lab.refit_job)
    _finished(ws, p.id)
    now = modeling.current_model_info(sc)
    assert modeling.refit_lineage(now)["count"] == 2 and sum(now.config["support_counts"]) == support_before + 2
    assert _versions(sc) == [now.id, base.id]
    assert len(ws.store.list_predictions(now.id, pool_only=True)) == n_pool - 2
    # Retrain trains with the lineage's own settings again: a new base, not a refit
    again = wait_done(ws, modeling.retrain(sc)).result
    assert modeling.refit_lineage(again) == {} and again.config["hyperparameters"]["search"] is search
    ws.close()


@pytest.mark.slow  # trains end to end
def test_no_instant_refit_past_the_visitor_job_limit_says_so(tiny, tmp_path):
    """Hosted: a visitor whose queue is full still gets the label; the refit is refused in
    one sentence, and Retrain remains."""
    import threading

    ws = make_ws(tmp_path, tiny, hosted=True)
    p = projects.load_example(ws, "shapes", owner="ann")
    sc = ws.scope(p.id, "ann")
    wait_done(ws, modeling.start_training(sc, "gda", settings={"augment_views": 1}))
    rows = modeling.label_pool(sc)
    release = threading.Event()
    busy = [ws.runner.submit("label", lambda job: release.wait(60), p.id, owner="ann")
            for _ in range(modeling.MAX_JOBS_PER_VISITOR)]
    try:
        lab = modeling.accept(sc, [rows[0].image_id])
        assert lab.count == 1 and lab.refit_job is None and one_sentence(lab.note)
        assert lab.note.startswith("The GDA model was not refitted: you already have 2 jobs")
        assert len(_versions(sc)) == 1 and ws.store.get_image(rows[0].image_id).labeled_by == "accepted"
    finally:
        release.set()
        for j in busy:
            ws.runner.wait(j, 60)
    ws.close()


def test_exports(trained, tmp_path):
    ws, p = trained
    sc = ws.scope(p.id)
    a, b = exports.export_labels_csv(sc), exports.export_labels_csv(sc)
    assert a.parent != b.parent and a.parent.parent == ws.exports_dir and len(a.parent.name) > 12
    assert not a.exists()  # a visitor keeps only its latest export of a project
    with open(b, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 35 and set(rows[0]) == {"image_id", "file", "sha256", "label", "labeled_by", "unlike_every_class"}
    assert sum(r["label"] == "red circle" for r in rows) >= 4
    data = json.loads(exports.export_labels_json(sc).read_text(encoding="utf-8"))
    assert data["project"] == p.name and len(data["classes"]) == 5 and len(data["images"]) == 35
    folder = exports.export_imagefolder(sc)
    assert folder.renamed == 0 and presenters.renamed_folders(folder) == ""
    with zipfile.ZipFile(folder.path) as z:
        names = [n for n in z.namelist() if n != exports.MANIFEST]
        manifest = json.loads(z.read(exports.MANIFEST))
    folders = {n.split("/")[0] for n in names}
    assert folders == {"blue square", "green triangle", "purple hexagon", "red circle", "yellow star"}
    assert all(n.count("/") == 1 and n.endswith(".png") for n in names) and len(names) >= 20
    assert {r["folder"]: r["images"] for r in manifest["classes"]} == {
        f: sum(n.startswith(f + "/") for n in names) for f in folders}

    zpath = exports.export_model(sc)
    with zipfile.ZipFile(zpath) as z:
        assert {"model/config.json", "model/model.safetensors", "model/USAGE.md"} <= set(z.namelist())
        z.extractall(tmp_path)
    info, method = modeling.current_model(sc)
    loaded = load_model(tmp_path / "model", backbone=method.backbone)
    refs = [ImageRef.from_pil(shapes.render(shapes.ShapeSpec("red", "circle"), np.random.default_rng(i), 64))
            for i in range(3)]
    ex = FeatureExtractor(method.backbone, ws.cache)
    assert torch.equal(loaded.predict_proba(refs, ex), method.predict_proba(refs, ex))
    snippet = presenters.usage(sc)
    assert "load_model" in snippet and "GraphAdapter" in snippet


def test_import_model(trained, tiny, tmp_path):
    ws, p = trained
    zpath = exports.export_model(ws.scope(p.id))
    other = make_ws(tmp_path / "other", tiny)
    q = projects.create_project(other, "Same classes")
    qs = other.scope(q.id)
    for c in ["blue square", "green triangle", "purple hexagon", "red circle", "yellow star"]:
        library.add_class(qs, c)
    info = exports.import_model(qs, zpath)
    assert info.method == "graph" and modeling.current_model(qs)[0].id == info.id
    img = png(tmp_path / "star.png", "yellow star", 11)
    assert modeling.predict(qs, str(img)) == pytest.approx(modeling.predict(ws.scope(p.id), str(img)))

    r = projects.create_project(other, "Different classes")
    rs = other.scope(r.id)
    library.add_class(rs, "cat")
    with pytest.raises(ModelFileError) as e:
        exports.import_model(rs, zpath)
    assert one_sentence(str(e.value)) and "differ" in str(e.value)
    assert modeling.models(rs) == []

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        dst.writestr("../../outside.txt", b"gotcha")
    with pytest.raises(FewShotError) as e:
        exports.import_model(qs, evil)
    assert one_sentence(str(e.value)) and "nothing was imported" in str(e.value)
    assert not (tmp_path / "outside.txt").exists() and len(modeling.models(qs)) == 1


def test_hosted_isolation(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny, hosted=True)
    a = projects.create_project(ws, "A's project", owner="alice")
    library.add_class(ws.scope(a.id, "alice"), "red circle")
    assert [p.name for p in projects.list_projects(ws, "alice")] == ["A's project"]
    assert projects.list_projects(ws, "bob") == [] and projects.list_projects(ws, None) == []
    for call in (lambda: ws.scope(a.id, "bob"), lambda: library.add_class(ws.scope(a.id, "bob"), "x"),
                 lambda: library.class_rows(ws.scope(a.id, "bob")),
                 lambda: exports.export_labels_csv(ws.scope(a.id, "bob")),
                 lambda: projects.delete_project(ws.scope(a.id, "bob")),
                 lambda: projects.rename_project(ws.scope(a.id, "bob"), "mine")):
        with pytest.raises(NotFoundError) as e:
            call()
        assert one_sentence(str(e.value))
    assert projects.last_project(ws, "bob", preferred=a.id) is None
    assert projects.last_project(ws, "alice", preferred=a.id).id == a.id
    assert ws.scope(a.id, "alice").project.name == "A's project"


def test_errors_are_one_sentence(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    p = projects.create_project(ws, "Empty")
    sc = ws.scope(p.id)
    with pytest.raises(FewShotError) as e:
        modeling.start_training(sc, "graph")
    assert one_sentence(str(e.value))
    library.add_class(sc, "red circle")
    library.add_images(sc, [png(tmp_path / "r.png", "red circle", 1)],
                       class_id=library.class_by_name(sc, "red circle").id)
    library.add_class(sc, "blue square")
    with pytest.raises(DataError) as e:
        modeling.start_training(sc, "graph")
    assert one_sentence(str(e.value)) and "blue square" in str(e.value)
    for call in (lambda: modeling.predict(sc, str(tmp_path / "r.png")), lambda: modeling.knowledge_graph(sc),
                 lambda: modeling.label_pool(sc), lambda: exports.export_model(sc), lambda: ws.scope(None),
                 lambda: library.add_class(sc, "RED CIRCLE"), lambda: library.add_class(sc, POOL),
                 lambda: library.remove_images(sc, []),
                 lambda: modeling.correct(sc, [], "nope"), lambda: library.add_uploads(sc, [], None)):
        with pytest.raises(FewShotError) as e:
            call()
        assert one_sentence(str(e.value)), str(e.value)
    bad = modeling.backbone_spec(ws, "ViT-B-32/openai", None, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsUnavailableError) as e:
        modeling.start_training(sc, "zeroshot", bad)
    assert one_sentence(str(e.value))
    with pytest.raises(DataError) as e:
        catalog.coerce_settings("mma", {"steps": "many"})
    assert one_sentence(str(e.value))


def test_uploads_files_and_zips(tiny, tmp_path):
    ws = make_ws(tmp_path / "d", tiny)
    p = projects.create_project(ws, "Uploads")
    sc = ws.scope(p.id)
    library.add_class(sc, "red circle")
    files = [png(tmp_path / f"r{i}.png", "red circle", i) for i in range(2)]
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    up = library.add_uploads(sc, files + [junk], "red circle")
    assert up.added == 2 and up.duplicates == 0 and len(up.errors) == 1 and "notes.png" in up.errors[0]
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(png(tmp_path / "b.png", "blue square", 3), "blue square/b.png")
        zf.write(png(tmp_path / "r9.png", "red circle", 9), "red circle/r9.png")
        zf.write(png(tmp_path / "g.png", "green triangle", 4), "loose.png")
    up = library.add_uploads(sc, [z], None)
    assert up.added == 3 and up.errors == []
    rows = {r[0]: r[2] for r in library.class_rows(sc)}
    assert rows == {"red circle": 3, "blue square": 1, POOL: 1}
    library.add_class(sc, "mixed")
    with zipfile.ZipFile(tmp_path / "pool.zip", "w") as zf:
        for i in range(3):
            zf.write(png(tmp_path / f"y{i}.png", "yellow star", 20 + i), f"some/folder/y{i}.png")
    assert library.add_uploads(sc, [tmp_path / "pool.zip"], POOL).added == 3 and {r[0]: r[2] for r in library.class_rows(sc)}[POOL] == 4
    assert library.add_uploads(sc, [z], "mixed").added == 3 and {r[0]: r[2] for r in library.class_rows(sc)}["mixed"] == 3
    gal, gal_ids = presenters.gallery_items(sc, "red circle")
    assert len(gal) == 3 and gal[0][1].startswith("#") and gal == presenters.image_gallery(sc, "red circle")
    assert [int(c.split()[0][1:]) for _, c in gal] == gal_ids  # the ids in gallery order
    ids = gal_ids[:2]
    assert library.remove_images(sc, ids) == 2 and len(presenters.image_gallery(sc, "red circle")) == 1


def test_helpers(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    assert parse_image_ids("#12, 15 16 #12") == [12, 15, 16] and parse_image_ids(None) == []
    assert parse_image_ids([3, "4"]) == [3, 4]
    for caption in ("#3 oc_2.png", "#20 tmp_pz1.png", "cs_0.jpg"):  # captions are not ids
        with pytest.raises(DataError) as e:
            parse_image_ids(caption)
        assert one_sentence(str(e.value))
    assert [v for _, v in presenters.method_choices()] == ["graph", "mma", "tip", "tip-f", "gda", "proker", "zeroshot"]
    graph = catalog.settings("graph")
    assert graph["alpha"] == 0.7 and graph["steps"] == 300 and "templates" not in graph
    mma = catalog.settings("mma")
    assert mma["rank"] == 32 and mma["scale"] == 0.001 and mma["steps"] is None and mma["lr"] == 0.0015
    assert catalog.coerce_settings("mma", {"steps": 30.0, "lr": "0.01", "start_block": None,
                                            "cache_lower": 1}) == {"steps": 30, "lr": 0.01, "cache_lower": True}
    with pytest.raises(DataError, match="MMA has no setting 'bogus'"):  # strict now: unknown names are refused
        catalog.coerce_settings("mma", {"steps": 30, "bogus": 1})
    choices = dict((v, label) for label, v in presenters.backbone_choices(ws))
    assert presenters.backbone_choices(ws)[0][1] == "tiny" == presenters.default_backbone_value(ws)
    assert "only knows coloured shapes" in choices["tiny"] and "ViT-B-32/openai" in choices
    assert (modeling.backbone_spec(ws, "ViT-B-16/openai").pretrained == "openai"
            and modeling.backbone_spec(ws, "tiny").name == "tiny")
    ok, line = presenters.backbone_status(ws)
    assert ok and "tiny" in line and "CPU" in line
    secret = ws.browser_secret()
    assert len(secret) >= 16 and Workspace.at(tmp_path, TINY).browser_secret() == secret
    assert projects.last_project(ws) is None
    a = projects.create_project(ws, "A")
    time.sleep(0.01)
    b = projects.create_project(ws, "B")
    assert projects.last_project(ws).id == b.id and projects.last_project(ws, preferred=a.id).id == a.id
    assert projects.last_project(ws, preferred=999).id == b.id
    assert "No model yet" in presenters.model_summary(ws.scope(a.id)) and modeling.model_history(ws.scope(a.id)) == []


def test_status_banner_when_weights_are_missing(tmp_path):
    ws = Workspace.at(tmp_path, BackboneSpec(name="ViT-B-32", checkpoint="/no/such/file.pt", device="cpu"))
    ok, line = presenters.backbone_status(ws)
    assert not ok and "unavailable" in line and "does not exist" in line and "tiny" in line and "Device" in line
    assert presenters.default_backbone_value(ws) == "ViT-B-32/openai"
    assert presenters.backbone_choices(ws)[0][1] == "ViT-B-32/openai"


def test_too_many_loose_files_is_one_sentence(tmp_path):
    from fewshot_studio.app.library import MAX_UPLOAD_FILES
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.errors import DataError

    ws = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"))
    try:
        p = projects.create_project(ws, "p")
        with pytest.raises(DataError, match=f"at most {MAX_UPLOAD_FILES}"):
            library.add_images(ws.scope(p.id), [("x.png", b"x")] * (MAX_UPLOAD_FILES + 1))
        assert ws.store.list_images(p.id) == []
    finally:
        ws.close()


def test_a_project_link_shares_a_hosted_project(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny, hosted=True)
    a = projects.create_project(ws, "A's project", owner="alice")
    library.add_class(ws.scope(a.id, "alice"), "red circle")
    with pytest.raises(NotFoundError):
        projects.project_link(ws.scope(a.id, "bob"))  # only who sees a project can share it
    token = projects.project_link(ws.scope(a.id, "alice"))
    assert projects.project_link(ws.scope(a.id, "alice")) == token
    assert projects.open_link(ws, token, "bob").id == a.id
    assert [p.id for p in projects.list_projects(ws, "bob")] == [a.id] and projects.last_project(ws, "bob").id == a.id
    library.add_class(ws.scope(a.id, "bob"), "blue square")  # bob works on it like alice
    assert [r[0] for r in library.class_rows(ws.scope(a.id, "alice"))][:2] == ["red circle", "blue square"]
    with pytest.raises(FewShotError) as e:
        projects.delete_project(ws.scope(a.id, "bob"))
    assert one_sentence(str(e.value)) and ws.scope(a.id, "alice")
    renewed = projects.project_link(ws.scope(a.id, "alice"), renew=True)
    with pytest.raises(NotFoundError) as e:
        projects.open_link(ws, token, "carol")  # the old link stops working...
    assert one_sentence(str(e.value)) and projects.list_projects(ws, "carol") == []
    assert ws.scope(a.id, "bob").id == a.id  # ...but bob keeps the project
    assert projects.open_link(ws, renewed, "carol").id == a.id
    assert projects.open_link(ws, renewed, "alice").id == a.id and projects.list_projects(ws, "alice")[0].id == a.id
    projects.delete_project(ws.scope(a.id, "alice"))
    assert projects.list_projects(ws, "bob") == [] and projects.list_projects(ws, "carol") == []


def test_a_gallery_thumbnail_names_its_image(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    p = projects.create_project(ws, "Thumbs")
    sc = ws.scope(p.id)
    red = library.add_class(sc, "red circle")
    library.add_images(sc, [png(tmp_path / "r0.png", "red circle", 1), png(tmp_path / "r1.png", "red circle", 2)],
                       class_id=red.id)
    library.add_uploads(sc, [png(tmp_path / "pool.png", "blue square", 3)], POOL)
    shown = presenters.image_gallery(sc, "red circle")
    for thumb, caption in shown:
        img = presenters.image_by_thumbnail(sc, "red circle", Path(thumb).name)
        assert caption == f"#{img.id} {img.original_name}"
    pool_thumb = Path(presenters.image_gallery(sc, POOL)[0][0]).name
    assert presenters.image_by_thumbnail(sc, POOL, pool_thumb).original_name.endswith("pool.png")
    for cls, thumb in (("red circle", pool_thumb), ("red circle", "nonsense.png"), (POOL, Path(shown[0][0]).name)):
        with pytest.raises(NotFoundError) as e:  # another class's image, or none at all
            presenters.image_by_thumbnail(sc, cls, thumb)
        assert one_sentence(str(e.value))


def test_a_hugging_face_space_is_hosted_unless_told_otherwise(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_STUDIO_HOSTED", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not make_ws(tmp_path / "a", tiny, hosted=None).hosted  # locally: one user, every project
    monkeypatch.setenv("SPACE_ID", "someone/fewshot-studio")
    assert make_ws(tmp_path / "b", tiny, hosted=None).hosted
    monkeypatch.setenv("FEWSHOT_STUDIO_HOSTED", "0")
    assert not make_ws(tmp_path / "c", tiny, hosted=None).hosted
    monkeypatch.setenv("FEWSHOT_STUDIO_HOSTED", "1")
    monkeypatch.delenv("SPACE_ID")
    assert make_ws(tmp_path / "d", tiny, hosted=None).hosted


def test_a_blank_checkpoint_means_the_configured_one(tmp_path, tiny):
    """FEWSHOT_STUDIO_CHECKPOINT (the default spec's checkpoint) is used when the form's
    Local-checkpoint box is blank and the form names the default backbone."""
    ws = Workspace.at(tmp_path / "d", BackboneSpec("ViT-B-32", "openai", "/models/b32.safetensors", "cpu"))
    try:
        for name in ("", "ViT-B-32/openai", None):
            assert modeling.backbone_spec(ws, name, None, "").checkpoint == "/models/b32.safetensors"
        assert modeling.backbone_spec(ws, "ViT-B-32/openai", None, "/other.pt").checkpoint == "/other.pt"
        # another backbone: not that file
        assert modeling.backbone_spec(ws, "ViT-B-16/openai", None, "").checkpoint is None
        assert modeling.backbone_spec(ws, "tiny", None, "").checkpoint is None
    finally:
        ws.close()


def test_the_current_model_is_chosen_and_survives(tmp_path, tiny):
    ws = make_ws(tmp_path, tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    ids = []
    for method in ("zeroshot", "tip"):
        ws.runner.wait(modeling.start_training(sc, method, modeling.backbone_spec(ws, "tiny"), {}))
        ids.append(modeling.current_model_info(sc).id)  # a new model becomes the one in use
    assert ids[1] > ids[0] and presenters.model_summary(sc).startswith(f"**Model #{ids[1]}**")
    assert modeling.set_current_model(sc, ids[0]).id == ids[0]
    assert modeling.current_model(sc)[0].id == ids[0] and modeling.retrain(sc)  # retrains the chosen one's method
    ws.runner.wait(ws.runner.jobs(p.id)[-1].id)
    assert modeling.current_model_info(sc).method == "zeroshot"
    labels, current = presenters.model_choices(sc)
    assert current == modeling.current_model_info(sc).id and [v for _, v in labels] == sorted(
        (v for _, v in labels), reverse=True)
    tip_label = next(l for l, v in labels if v == ids[1])
    assert "Tip-Adapter" in tip_label and "leave-one-out accuracy" in tip_label and "steps" not in tip_label
    q = projects.create_project(ws, "other")
    with pytest.raises(NotFoundError) as e:  # another project's model
        modeling.set_current_model(ws.scope(q.id), ids[0])
    assert one_sentence(str(e.value))
    ws.store.delete_model(modeling.current_model_info(sc).id)  # the one in use goes: the newest is used
    assert modeling.current_model_info(sc).id == max(m.id for m in modeling.models(sc))


def test_an_interrupted_training_is_found_after_a_restart(tmp_path, tiny):
    from fewshot_studio.store import ProjectStore

    with ProjectStore(tmp_path / "d") as store:
        p = store.create_project("p")
        store.create_job(p.id, "train", status="running")
    ws = Workspace.at(tmp_path / "d", BackboneSpec("tiny", None, device="cpu"))
    try:
        job = modeling.interrupted_training(ws.scope(p.id))
        assert job is not None and job.status == "failed" and not modeling.never_started(job)
    finally:
        ws.close()
    with ProjectStore(tmp_path / "d") as store:  # a training that was still queued says so
        store.create_job(p.id, "train")
    ws = Workspace.at(tmp_path / "d", BackboneSpec("tiny", None, device="cpu"))
    try:
        job = modeling.interrupted_training(ws.scope(p.id))
        assert job is not None and modeling.never_started(job) and "before this job started" in job.message
    finally:
        ws.close()


def test_progress_text_gives_the_time_left():
    from types import SimpleNamespace

    from fewshot_studio.ui.presenters import duration_text, eta_text

    state = SimpleNamespace(stage_started=100.0, fraction=0.25)
    assert eta_text(state, now=130.0) == " · about 1 min 30 s left"
    assert eta_text(state, now=101.0) == ""  # too early to know the pace
    assert eta_text(SimpleNamespace(stage_started=None, fraction=0.5), now=200.0) == ""
    assert duration_text(7265) == "2 h 1 min" and duration_text(0.2) == "1 s"


def test_an_example_is_found_again_before_copying(tmp_path, tiny):
    ws = make_ws(tmp_path, tiny)
    assert projects.example_project(ws, "shapes") is None
    p = projects.load_example(ws, "shapes")
    assert projects.example_project(ws, "shapes").id == p.id
    q = projects.load_example(ws, "shapes")
    assert q.name.endswith("(2)") and projects.example_project(ws, "shapes").id in (p.id, q.id)


# ---- long work: cross-validation and pool labeling are jobs of the one runner ---------------------

@pytest.mark.slow  # end to end: a cross-validation and a pool labeling
def test_cross_validation_and_pool_labeling_run_as_recorded_jobs(trained):
    ws, p = trained
    sc = ws.scope(p.id)
    heard = []
    job_id = modeling.start_evaluation(sc, ["zeroshot", "tip"], TINY)
    ws.runner.subscribe(job_id, lambda s: heard.append((s.stage, s.step, s.total)))
    state = wait_done(ws, job_id)
    assert state.kind == "evaluate" and set(state.result.results) == {"zeroshot", "tip"}
    assert state.result.results["tip"].n == 20  # leave-one-out over the 20 examples
    assert any(total for _, _, total in heard)  # it reported progress on the way
    rows = wait_done(ws, modeling.start_labeling(sc)).result
    assert len(rows) == 15 and [r.confidence for r in rows] == sorted(r.confidence for r in rows)
    recorded = {j.kind: j.status for j in ws.store.list_jobs(p.id)}
    assert recorded["evaluate"] == "done" and recorded["label"] == "done" and recorded["train"] == "done"
    # the training resume on page load follows only training jobs
    assert modeling.active_job(ws, p.id) is None


def test_bad_requests_fail_before_a_job_starts(trained, tiny, tmp_path):
    ws, p = trained
    sc = ws.scope(p.id)
    before = len(ws.store.list_jobs(p.id))
    with pytest.raises(DataError, match="Pick at least one method"):
        modeling.start_evaluation(sc, [], TINY)
    with pytest.raises(DataError, match="Unknown method 'nope'"):
        modeling.start_evaluation(sc, ["nope"], TINY)
    fresh = make_ws(tmp_path, tiny)
    q = projects.create_project(fresh, "empty")
    with pytest.raises(FewShotError, match="[Tt]rain"):  # no model yet: one sentence, no job
        modeling.start_labeling(fresh.scope(q.id))
    assert len(ws.store.list_jobs(p.id)) == before and fresh.store.list_jobs(q.id) == []
    fresh.close()


def test_a_cross_validation_is_cancelled_within_a_step_and_waits_its_turn(trained, monkeypatch):
    ws, p = trained
    sc = ws.scope(p.id)
    # one CPU slot: a cross-validation started while a training runs waits in the same queue
    training = modeling.start_training(sc, "mma", TINY, {"steps": 400})
    evaluation = modeling.start_evaluation(sc, ["mma"], TINY)
    time.sleep(0.5)
    assert ws.runner.get(evaluation).status == "queued"
    assert modeling.cancel(ws, training)
    end = time.time() + 60
    while ws.runner.get(evaluation).status == "queued" and time.time() < end:
        time.sleep(0.1)
    time.sleep(1.0)  # MMA's folds train 300 steps each: still running
    assert ws.runner.get(evaluation).status == "running"
    t = time.perf_counter()
    assert modeling.cancel(ws, evaluation)
    state = ws.runner.wait(evaluation, timeout=60)
    assert state.status == "cancelled" and time.perf_counter() - t < 15
    assert ws.store.get_job(int(evaluation)).status == "cancelled"


def test_a_job_that_breaks_fails_in_one_sentence(trained, monkeypatch):
    from fewshot_studio import evaluation

    ws, p = trained

    def broken(*a, **k):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(evaluation, "cross_validate", broken)
    state = ws.runner.wait(modeling.start_evaluation(ws.scope(p.id), ["zeroshot"], TINY), timeout=60)
    assert state.status == "failed" and state.message == "Cross-validation failed unexpectedly: boom."
    assert one_sentence(state.message)


def test_a_missing_image_file_shows_a_placeholder_and_one_sentence(tiny, tmp_path):
    ws = make_ws(tmp_path, tiny)
    sc = ws.scope(projects.load_example(ws, "shapes").id)
    items, ids = presenters.gallery_items(sc, "red circle")
    gone = ws.store.get_image(ids[1])
    gone.path.unlink()  # bad luck: the stored file (and its thumbnail) are deleted behind the app's back
    Path(items[1][0]).unlink()
    assert presenters.missing_notice(sc).startswith(f"1 image file is missing from the data folder (#{gone.id} ")
    items, ids = presenters.gallery_items(sc, "red circle")  # no FileNotFoundError
    assert len(items) == 4 and items[1][0] == library.placeholder(ws) and items[0][0] != items[1][0]
    assert [i.id for i in library.missing_images(sc)] == [gone.id]
    library.remove_image(sc, gone.id)  # it can be removed like any image
    assert presenters.missing_notice(sc) == "" and len(presenters.gallery_items(sc, "red circle")[0]) == 3
    ws.close()


def test_user_text_in_notices_is_escaped_markdown():
    from fewshot_studio.ui.presenters import md

    hostile = "![x](http://evil.example/x.png) [Session expired](http://evil.example) <b>hi</b> *a* www.evil.example"
    out = md(hostile)
    for raw in ("![", "](", "<b>", "*a*", "www.evil"):
        assert raw not in out
    # every escape is a backslash before the very character typed: the text reads the same
    assert out.replace("\\", "") == hostile and md("red circle") == "red circle"
    assert md("two\nlines") == "two lines"


def test_a_visitor_has_at_most_two_jobs_and_cancel_reaches_all_of_them(tiny, tmp_path):
    """#13 finding 3: in hosted mode one visitor cannot fill the queue, and Cancel stops every job
    the visitor started (not only the latest); another visitor is not held by either."""
    ws = make_ws(tmp_path, tiny, hosted=True)
    alice = ws.scope(projects.load_example(ws, "shapes", "alice").id, "alice")
    bob = ws.scope(projects.load_example(ws, "shapes", "bob").id, "bob")
    long = {"steps": 20000}
    first = modeling.start_training(alice, "graph", TINY, long)
    second = modeling.start_training(alice, "graph", TINY, long)
    with pytest.raises(DataError) as e:
        modeling.start_evaluation(alice, ["zeroshot"], TINY)
    assert str(e.value) == ("You already have 2 jobs queued or running, the most one visitor may have at a time; "
                            "wait for one to finish or cancel it.")
    assert [j.id for j in modeling.owner_jobs(ws, "alice")] == [first, second]
    theirs = modeling.start_training(bob, "zeroshot", TINY)  # Bob's own limit is untouched
    assert modeling.cancel_owner_jobs(ws, "alice", "train") == 2
    for job_id in (first, second):
        assert ws.runner.wait(job_id, timeout=60).status == "cancelled"
    assert ws.runner.wait(theirs, timeout=120).status == "done"
    wait_done(ws, modeling.start_training(alice, "zeroshot", TINY))  # room again
    ws.close()


# ---- features prepared in the background (issue #14, item 6a) --------------------------------------
def _encode_jobs(ws):
    from fewshot_studio.jobs import ENCODE

    return [j for j in ws.runner.jobs(background=True) if j.kind == ENCODE]


def test_upload_encodes_plain_views_in_the_background(tiny, tmp_path):
    """After an upload, a low-priority job puts every image's plain view in the feature cache,
    so a training finds them there (and encodes nothing); it is not one of the visitor's jobs."""
    with make_ws(tmp_path / "data", tiny) as ws:
        p = projects.create_project(ws, "Prepared")
        sc = ws.scope(p.id)
        library.add_class(sc, "red circle")
        files = [png(tmp_path / f"r{i}.png", "red circle", i) for i in range(5)]
        up = library.add_uploads(sc, files, "red circle")
        library.add_uploads(sc, [png(tmp_path / "pool.png", "blue square", 9)], POOL)
        assert up.added == 5
        jobs = _encode_jobs(ws)
        assert jobs and not modeling.owner_jobs(ws, None) and not ws.runner.jobs()
        for j in jobs:
            assert ws.runner.wait(j.id, 120).status == "done"
        hashes = [i.hash for i in ws.store.list_images(p.id)]
        assert len(hashes) == 6
        hits = ws.cache.get_many(tiny.id, [(h, 0) for h in hashes], tiny.embed_dim)
        assert all(h is not None for h in hits)
        ex = ws.extractor(tiny)
        before = ex.encoded_images
        ex.image_features([i.ref() for i in ws.store.list_images(p.id)])
        assert ex.encoded_images == before  # all found in the cache


def test_background_encoding_never_runs_ahead_of_a_job_and_cancels(tiny, tmp_path):
    """A background job waits while another job is queued or running (it starts only after),
    stands still at its next report when one arrives, and is cancellable while it waits."""
    import threading

    from fewshot_studio.jobs import YIELDED_STAGE
    from fewshot_studio.progress import Progress

    with make_ws(tmp_path / "data", tiny) as ws:
        runner = ws.runner
        release, fg_running, steps_during_fg = threading.Event(), threading.Event(), []

        def foreground(job):
            fg_running.set()
            release.wait(30)
            fg_running.clear()

        def background(job):
            for i in range(40):
                job.report(Progress("bg", i, 40))  # where it yields
                if fg_running.is_set():
                    steps_during_fg.append(i)
                time.sleep(0.01)

        fg = runner.submit("train", foreground)
        bg = runner.submit_background("encode", background)
        time.sleep(0.3)
        s = runner.get(bg)
        assert s.status == "queued" and s.stage == YIELDED_STAGE and s.step == 0
        release.set()
        assert runner.wait(bg, 30).status == "done" and runner.get(fg).status == "done"
        assert not steps_during_fg

        # a foreground job arriving mid-way: the background one pauses at its next report
        release.clear()
        gate = threading.Event()

        def background2(job):
            for i in range(1000):
                job.report(Progress("bg", i, 1000))
                if fg_running.is_set():
                    steps_during_fg.append(i)
                if i == 5:
                    gate.set()
                time.sleep(0.005)

        bg2 = runner.submit_background("encode", background2)
        assert gate.wait(30)
        fg2 = runner.submit("train", foreground)
        time.sleep(0.3)
        st = runner.get(bg2)
        assert st.status == "running" and st.stage == YIELDED_STAGE
        step = st.step
        time.sleep(0.2)
        assert runner.get(bg2).step == step  # stands still
        assert runner.cancel(bg2)
        assert runner.wait(bg2, 30).status == "cancelled"
        release.set()
        assert runner.wait(fg2, 30).status == "done"
        assert not steps_during_fg


def test_model_result_names_a_first_model_and_its_refinement():
    assert presenters.model_result("gda", {"views": "plain"})[0] == "first model, on plain views"
    assert presenters.model_result("gda", {"refines": 7})[0] == "refines #7 with augmented views"
    assert not any("plain" in p for p in presenters.model_result("gda", {"alpha": 1.0}))
