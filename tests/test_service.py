"""Studio (the service layer the UI calls) end to end, without Gradio: examples, training,
the knowledge graph, pool labeling, accept/correct, exports and import, hosted isolation,
one-sentence errors, and the small helpers the UI relies on."""
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
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.data import ImageRef
from fewshot_studio.errors import DataError, FewShotError, ModelFileError, WeightsUnavailableError
from fewshot_studio.features import FeatureExtractor
from fewshot_studio.methods import load_model
from fewshot_studio.service import ASSETS, POOL, Studio, parse_image_ids
from fewshot_studio.store import NotFoundError

TINY = BackboneSpec("tiny", None, device="cpu")


def make_studio(root, tiny, hosted=False) -> Studio:
    s = Studio(root, TINY, hosted=hosted)
    s._backbones[(TINY.name, TINY.pretrained, TINY.checkpoint, TINY.device)] = tiny  # share the loaded model
    return s


def one_sentence(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and "Traceback" not in msg and msg.rstrip().endswith((".", ")"))


def wait_done(s: Studio, job_id: str):
    st = s.runner.wait(job_id, timeout=300)
    assert st.status == "done", st.message
    return st


def png(path: Path, label: str, seed: int) -> Path:
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 64).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """The shapes example with a GraphAdapter model."""
    s = make_studio(tmp_path_factory.mktemp("studio"), tiny)
    p = s.load_example("shapes")
    wait_done(s, s.start_training(p.id, "graph"))
    yield s, p
    s.close()


def truth() -> dict[str, str]:
    with open(ASSETS / "shapes" / "pool_truth.csv", newline="") as f:
        return {r["file"]: r["label"] for r in csv.DictReader(f)}


def test_examples_load(trained, tiny, tmp_path):
    s, p = trained
    rows = s.class_rows(p.id)
    assert [r[0] for r in rows[:-1]] == ["blue square", "green triangle", "purple hexagon", "red circle",
                                         "yellow star"]
    assert all(r[2] == 4 for r in rows[:-1]) and rows[-1] == [POOL, "", 15]
    s2 = make_studio(tmp_path, tiny)
    t = s2.load_example("textile")
    names = [c for _, c in s2.class_choices(t.id)]
    assert set(names) == {"nominal", "local defect", "global defect"}
    assert s2.class_by_name(t.id, "nominal").description.startswith("a fabric surface")
    assert s2.load_example("shapes").name == "Example: coloured shapes"
    assert s2.load_example("shapes").name == "Example: coloured shapes (2)"
    with pytest.raises(DataError):
        s2.load_example("nope")


def test_graph_with_visual_edges(trained):
    s, p = trained
    kg = s.knowledge_graph(p.id)
    assert kg.classes == [c for _, c in s.class_choices(p.id)]
    assert kg.counts == [4] * 5
    assert kg.visual_edges is not None and np.asarray(kg.visual_edges).shape == (5, 5)
    assert np.allclose(np.diag(np.asarray(kg.text_edges)), 1.0, atol=1e-4)


def test_zero_shot_graph_gets_visual_edges_from_prototypes(tiny, tmp_path):
    s = make_studio(tmp_path, tiny)
    p = s.load_example("shapes")
    wait_done(s, s.start_training(p.id, "zeroshot"))
    kg = s.knowledge_graph(p.id)
    assert kg.visual_edges is not None and np.asarray(kg.visual_edges).shape == (5, 5)


def test_label_pool_accuracy_and_active_learning_order(trained):
    s, p = trained
    rows = s.label_pool(p.id)
    t = truth()
    assert len(rows) == len(t) == 15
    acc = np.mean([t[r.name] == r.label for r in rows])
    assert acc >= 0.8, acc
    assert [r.confidence for r in rows] == sorted(r.confidence for r in rows)
    stored = s.pool_predictions(p.id)
    assert [(r.image_id, r.label) for r in stored] == [(r.image_id, r.label) for r in rows]
    assert all(r.top for r in stored)
    gallery = s.pool_gallery(p.id, rows)
    assert len(gallery) == 15 and gallery[0][1].startswith(f"#{rows[0].image_id} {rows[0].label}")
    assert all(Path(thumb).is_file() for thumb, _ in gallery)


def test_accept_correct_and_retrain_reuse_cache(tiny, tmp_path):
    s = make_studio(tmp_path, tiny)
    p = s.load_example("shapes")
    first = wait_done(s, s.start_training(p.id, "graph"))
    rows = s.label_pool(p.id)
    a, b = rows[0], rows[1]
    assert s.accept(p.id, [a.image_id]) == 1
    img = s.store.get_image(a.image_id)
    assert img.labeled_by == "accepted" and img.class_id == s.class_by_name(p.id, a.label).id
    other = next(n for n in ("red circle", "blue square") if n != b.label)
    assert s.correct(p.id, [b.image_id], other) == 1
    img = s.store.get_image(b.image_id)
    assert img.labeled_by == "corrected" and img.class_id == s.class_by_name(p.id, other).id
    assert {r.image_id for r in s.pool_predictions(p.id)}.isdisjoint({a.image_id, b.image_id})
    n = s.accept_confident(p.id, 0.0)
    assert n == 13 and s.pool_predictions(p.id) == []
    with pytest.raises(DataError):
        s.accept_confident(p.id, 0.5)  # nothing left to accept
    before = s.class_rows(p.id)
    again = wait_done(s, s.retrain(p.id))
    assert len(s.models(p.id)) == 2 and s.class_rows(p.id) == before
    assert again.elapsed < max(5.0, first.elapsed * 2)  # cached features: no slower than the first fit
    assert s.active_job(p.id) is None


def test_exports(trained, tmp_path):
    s, p = trained
    a, b = s.export_labels_csv(p.id), s.export_labels_csv(p.id)
    assert a.parent != b.parent and a.parent.parent == s.exports_dir and len(a.parent.name) > 12
    with open(a, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 35 and set(rows[0]) == {"image_id", "file", "sha256", "label", "labeled_by"}
    assert sum(r["label"] == "red circle" for r in rows) >= 4
    data = json.loads(s.export_labels_json(p.id).read_text(encoding="utf-8"))
    assert data["project"] == p.name and len(data["classes"]) == 5 and len(data["images"]) == 35
    with zipfile.ZipFile(s.export_imagefolder(p.id)) as z:
        names = z.namelist()
    folders = {n.split("/")[0] for n in names}
    assert folders == {"blue square", "green triangle", "purple hexagon", "red circle", "yellow star"}
    assert all(n.count("/") == 1 and n.endswith(".png") for n in names) and len(names) >= 20

    zpath = s.export_model(p.id)
    with zipfile.ZipFile(zpath) as z:
        assert {"model/config.json", "model/model.safetensors", "model/USAGE.md"} <= set(z.namelist())
        z.extractall(tmp_path)
    info, method = s.current_model(p.id)
    loaded = load_model(tmp_path / "model", backbone=method.backbone)
    refs = [ImageRef.from_pil(shapes.render(shapes.ShapeSpec("red", "circle"), np.random.default_rng(i), 64))
            for i in range(3)]
    ex = FeatureExtractor(method.backbone, s.cache)
    assert torch.equal(loaded.predict_proba(refs, ex), method.predict_proba(refs, ex))
    snippet = s.usage(p.id)
    assert "load_model" in snippet and "GraphAdapter" in snippet


def test_import_model(trained, tiny, tmp_path):
    s, p = trained
    zpath = s.export_model(p.id)
    other = make_studio(tmp_path / "other", tiny)
    q = other.create_project("Same classes")
    for c in ["blue square", "green triangle", "purple hexagon", "red circle", "yellow star"]:
        other.add_class(q.id, c)
    info = other.import_model(q.id, zpath)
    assert info.method == "graph" and other.current_model(q.id)[0].id == info.id
    img = png(tmp_path / "star.png", "yellow star", 11)
    assert other.predict(q.id, str(img)) == pytest.approx(s.predict(p.id, str(img)))

    r = other.create_project("Different classes")
    other.add_class(r.id, "cat")
    with pytest.raises(ModelFileError) as e:
        other.import_model(r.id, zpath)
    assert one_sentence(str(e.value)) and "differ" in str(e.value)
    assert other.models(r.id) == []

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        dst.writestr("../../outside.txt", b"gotcha")
    with pytest.raises(FewShotError) as e:
        other.import_model(q.id, evil)
    assert one_sentence(str(e.value)) and "nothing was imported" in str(e.value)
    assert not (tmp_path / "outside.txt").exists() and len(other.models(q.id)) == 1


def test_hosted_isolation(tiny, tmp_path):
    s = make_studio(tmp_path, tiny, hosted=True)
    a = s.create_project("A's project", owner="alice")
    s.add_class(a.id, "red circle", owner="alice")
    assert [p.name for p in s.list_projects("alice")] == ["A's project"]
    assert s.list_projects("bob") == [] and s.list_projects(None) == []
    for call in (lambda: s.project(a.id, "bob"), lambda: s.add_class(a.id, "x", owner="bob"),
                 lambda: s.class_rows(a.id, "bob"), lambda: s.export_labels_csv(a.id, "bob"),
                 lambda: s.delete_project(a.id, "bob"), lambda: s.rename_project(a.id, "mine", "bob")):
        with pytest.raises(NotFoundError) as e:
            call()
        assert one_sentence(str(e.value))
    assert s.last_project("bob", preferred=a.id) is None
    assert s.last_project("alice", preferred=a.id).id == a.id
    assert s.project(a.id, "alice").name == "A's project"


def test_errors_are_one_sentence(tiny, tmp_path):
    s = make_studio(tmp_path, tiny)
    p = s.create_project("Empty")
    with pytest.raises(FewShotError) as e:
        s.start_training(p.id, "graph")
    assert one_sentence(str(e.value))
    s.add_class(p.id, "red circle")
    s.add_images(p.id, [png(tmp_path / "r.png", "red circle", 1)], class_id=s.class_by_name(p.id, "red circle").id)
    s.add_class(p.id, "blue square")
    with pytest.raises(DataError) as e:
        s.start_training(p.id, "graph")
    assert one_sentence(str(e.value)) and "blue square" in str(e.value)
    for call in (lambda: s.predict(p.id, str(tmp_path / "r.png")), lambda: s.knowledge_graph(p.id),
                 lambda: s.label_pool(p.id), lambda: s.export_model(p.id), lambda: s.project(None),
                 lambda: s.add_class(p.id, "RED CIRCLE"), lambda: s.add_class(p.id, POOL),
                 lambda: s.remove_images(p.id, []),
                 lambda: s.correct(p.id, [], "nope"), lambda: s.add_uploads(p.id, [], None)):
        with pytest.raises(FewShotError) as e:
            call()
        assert one_sentence(str(e.value)), str(e.value)
    bad = s.spec_for("ViT-B-32/openai", None, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsUnavailableError) as e:
        s.start_training(p.id, "zeroshot", bad)
    assert one_sentence(str(e.value))
    with pytest.raises(DataError) as e:
        s.coerce_settings("mma", {"steps": "many"})
    assert one_sentence(str(e.value))


def test_uploads_files_and_zips(tiny, tmp_path):
    s = make_studio(tmp_path / "d", tiny)
    p = s.create_project("Uploads")
    s.add_class(p.id, "red circle")
    files = [png(tmp_path / f"r{i}.png", "red circle", i) for i in range(2)]
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    added, errors = s.add_uploads(p.id, files + [junk], "red circle")
    assert added == 2 and len(errors) == 1 and "notes.png" in errors[0]
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(png(tmp_path / "b.png", "blue square", 3), "blue square/b.png")
        zf.write(png(tmp_path / "r9.png", "red circle", 9), "red circle/r9.png")
        zf.write(png(tmp_path / "g.png", "green triangle", 4), "loose.png")
    added, errors = s.add_uploads(p.id, [z], None)
    assert added == 3 and errors == []
    rows = {r[0]: r[2] for r in s.class_rows(p.id)}
    assert rows == {"red circle": 3, "blue square": 1, POOL: 1}
    s.add_class(p.id, "mixed")
    with zipfile.ZipFile(tmp_path / "pool.zip", "w") as zf:
        for i in range(3):
            zf.write(png(tmp_path / f"y{i}.png", "yellow star", 20 + i), f"some/folder/y{i}.png")
    added, _ = s.add_uploads(p.id, [tmp_path / "pool.zip"], POOL)
    assert added == 3 and {r[0]: r[2] for r in s.class_rows(p.id)}[POOL] == 4
    added, _ = s.add_uploads(p.id, [z], "mixed")
    assert added == 3 and {r[0]: r[2] for r in s.class_rows(p.id)}["mixed"] == 3
    gal, gal_ids = s.gallery_items(p.id, "red circle")
    assert len(gal) == 3 and gal[0][1].startswith("#") and gal == s.image_gallery(p.id, "red circle")
    assert [int(c.split()[0][1:]) for _, c in gal] == gal_ids  # the ids in gallery order
    ids = gal_ids[:2]
    assert s.remove_images(p.id, ids) == 2 and len(s.image_gallery(p.id, "red circle")) == 1


def test_helpers(tiny, tmp_path):
    s = make_studio(tmp_path, tiny)
    assert parse_image_ids("#12, 15 16 #12") == [12, 15, 16] and parse_image_ids(None) == []
    assert parse_image_ids([3, "4"]) == [3, 4]
    for caption in ("#3 oc_2.png", "#20 tmp_pz1.png", "cs_0.jpg"):  # captions are not ids
        with pytest.raises(DataError) as e:
            parse_image_ids(caption)
        assert one_sentence(str(e.value))
    assert [v for _, v in s.method_choices()] == ["graph", "mma", "tip", "tip-f", "zeroshot"]
    graph = s.method_settings("graph")
    assert graph["alpha"] == 0.7 and graph["steps"] == 300 and "templates" not in graph
    mma = s.method_settings("mma")
    assert mma["rank"] == 32 and mma["scale"] == 0.001 and mma["steps"] is None and mma["lr"] == 0.0015
    assert s.coerce_settings("mma", {"steps": 30.0, "lr": "0.01", "start_block": None,
                                     "cache_lower": 1}) == {"steps": 30, "lr": 0.01, "cache_lower": True}
    with pytest.raises(DataError, match="MMA has no setting 'bogus'"):  # strict now: unknown names are refused
        s.coerce_settings("mma", {"steps": 30, "bogus": 1})
    choices = dict((v, label) for label, v in s.backbone_choices())
    assert s.backbone_choices()[0][1] == "tiny" == s.default_backbone_value()
    assert "only knows coloured shapes" in choices["tiny"] and "ViT-B-32/openai" in choices
    assert s.spec_for("ViT-B-16/openai").pretrained == "openai" and s.spec_for("tiny").name == "tiny"
    ok, line = s.backbone_status()
    assert ok and "tiny" in line and "CPU" in line
    secret = s.browser_secret()
    assert len(secret) >= 16 and Studio(tmp_path, TINY).browser_secret() == secret
    assert s.last_project() is None
    a = s.create_project("A")
    time.sleep(0.01)
    b = s.create_project("B")
    assert s.last_project().id == b.id and s.last_project(preferred=a.id).id == a.id
    assert s.last_project(preferred=999).id == b.id
    assert "No model yet" in s.model_summary(a.id) and s.model_history(a.id) == []


def test_status_banner_when_weights_are_missing(tmp_path):
    s = Studio(tmp_path, BackboneSpec(name="ViT-B-32", checkpoint="/no/such/file.pt", device="cpu"))
    ok, line = s.backbone_status()
    assert not ok and "unavailable" in line and "does not exist" in line and "tiny" in line and "Device" in line
    assert s.default_backbone_value() == "ViT-B-32/openai"
    assert s.backbone_choices()[0][1] == "ViT-B-32/openai"


def test_too_many_loose_files_is_one_sentence(tmp_path):
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.errors import DataError
    from fewshot_studio.service import MAX_UPLOAD_FILES, Studio

    studio = Studio(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"))
    try:
        p = studio.create_project("p")
        with pytest.raises(DataError, match=f"at most {MAX_UPLOAD_FILES}"):
            studio.add_images(p.id, [("x.png", b"x")] * (MAX_UPLOAD_FILES + 1))
        assert studio.store.list_images(p.id) == []
    finally:
        studio.close()


def test_a_project_link_shares_a_hosted_project(tiny, tmp_path):
    s = make_studio(tmp_path, tiny, hosted=True)
    a = s.create_project("A's project", owner="alice")
    s.add_class(a.id, "red circle", owner="alice")
    with pytest.raises(NotFoundError):
        s.project_link(a.id, "bob")  # only who sees a project can share it
    token = s.project_link(a.id, "alice")
    assert s.project_link(a.id, "alice") == token
    assert s.open_link(token, "bob").id == a.id
    assert [p.id for p in s.list_projects("bob")] == [a.id] and s.last_project("bob").id == a.id
    s.add_class(a.id, "blue square", owner="bob")  # bob works on it like alice
    assert [r[0] for r in s.class_rows(a.id, "alice")][:2] == ["red circle", "blue square"]
    with pytest.raises(FewShotError) as e:
        s.delete_project(a.id, "bob")
    assert one_sentence(str(e.value)) and s.project(a.id, "alice")
    renewed = s.project_link(a.id, "alice", renew=True)
    with pytest.raises(NotFoundError) as e:
        s.open_link(token, "carol")  # the old link stops working...
    assert one_sentence(str(e.value)) and s.list_projects("carol") == []
    assert s.project(a.id, "bob").id == a.id  # ...but bob keeps the project
    assert s.open_link(renewed, "carol").id == a.id
    assert s.open_link(renewed, "alice").id == a.id and s.list_projects("alice")[0].id == a.id
    s.delete_project(a.id, "alice")
    assert s.list_projects("bob") == [] and s.list_projects("carol") == []


def test_a_gallery_thumbnail_names_its_image(tiny, tmp_path):
    s = make_studio(tmp_path, tiny)
    p = s.create_project("Thumbs")
    red = s.add_class(p.id, "red circle")
    s.add_images(p.id, [png(tmp_path / "r0.png", "red circle", 1), png(tmp_path / "r1.png", "red circle", 2)],
                 class_id=red.id)
    s.add_uploads(p.id, [png(tmp_path / "pool.png", "blue square", 3)], POOL)
    shown = s.image_gallery(p.id, "red circle")
    for thumb, caption in shown:
        img = s.image_by_thumbnail(p.id, "red circle", Path(thumb).name)
        assert caption == f"#{img.id} {img.original_name}"
    pool_thumb = Path(s.image_gallery(p.id, POOL)[0][0]).name
    assert s.image_by_thumbnail(p.id, POOL, pool_thumb).original_name.endswith("pool.png")
    for cls, thumb in (("red circle", pool_thumb), ("red circle", "nonsense.png"), (POOL, Path(shown[0][0]).name)):
        with pytest.raises(NotFoundError) as e:  # another class's image, or none at all
            s.image_by_thumbnail(p.id, cls, thumb)
        assert one_sentence(str(e.value))


def test_a_hugging_face_space_is_hosted_unless_told_otherwise(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_STUDIO_HOSTED", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not make_studio(tmp_path / "a", tiny, hosted=None).hosted  # locally: one user, every project
    monkeypatch.setenv("SPACE_ID", "someone/fewshot-studio")
    assert make_studio(tmp_path / "b", tiny, hosted=None).hosted
    monkeypatch.setenv("FEWSHOT_STUDIO_HOSTED", "0")
    assert not make_studio(tmp_path / "c", tiny, hosted=None).hosted
    monkeypatch.setenv("FEWSHOT_STUDIO_HOSTED", "1")
    monkeypatch.delenv("SPACE_ID")
    assert make_studio(tmp_path / "d", tiny, hosted=None).hosted


def test_a_blank_checkpoint_means_the_configured_one(tmp_path, tiny):
    """FEWSHOT_STUDIO_CHECKPOINT (the default spec's checkpoint) is used when the form's
    Local-checkpoint box is blank and the form names the default backbone."""
    s = Studio(tmp_path / "d", BackboneSpec("ViT-B-32", "openai", "/models/b32.safetensors", "cpu"))
    try:
        for name in ("", "ViT-B-32/openai", None):
            assert s.spec_for(name, None, "").checkpoint == "/models/b32.safetensors"
        assert s.spec_for("ViT-B-32/openai", None, "/other.pt").checkpoint == "/other.pt"
        assert s.spec_for("ViT-B-16/openai", None, "").checkpoint is None  # another backbone: not that file
        assert s.spec_for("tiny", None, "").checkpoint is None
    finally:
        s.close()


def test_the_current_model_is_chosen_and_survives(tmp_path, tiny):
    s = make_studio(tmp_path, tiny)
    p = s.load_example("shapes")
    ids = []
    for method in ("zeroshot", "tip"):
        s.runner.wait(s.start_training(p.id, method, s.spec_for("tiny"), {}))
        ids.append(s.current_model_info(p.id).id)  # a new model becomes the one in use
    assert ids[1] > ids[0] and s.model_summary(p.id).startswith(f"**Model #{ids[1]}**")
    assert s.set_current_model(p.id, ids[0]).id == ids[0]
    assert s.current_model(p.id)[0].id == ids[0] and s.retrain(p.id)  # retrains the chosen one's method
    s.runner.wait(s.runner.jobs(p.id)[-1].id)
    assert s.current_model_info(p.id).method == "zeroshot"
    labels, current = s.model_choices(p.id)
    assert current == s.current_model_info(p.id).id and [v for _, v in labels] == sorted(
        (v for _, v in labels), reverse=True)
    tip_label = next(l for l, v in labels if v == ids[1])
    assert "Tip-Adapter" in tip_label and "leave-one-out accuracy" in tip_label and "steps" not in tip_label
    q = s.create_project("other")
    with pytest.raises(NotFoundError) as e:  # another project's model
        s.set_current_model(q.id, ids[0])
    assert one_sentence(str(e.value))
    s.store.delete_model(s.current_model_info(p.id).id)  # the one in use goes: the newest is used
    assert s.current_model_info(p.id).id == max(m.id for m in s.models(p.id))


def test_an_interrupted_training_is_found_after_a_restart(tmp_path, tiny):
    from fewshot_studio.store import ProjectStore

    with ProjectStore(tmp_path / "d") as store:
        p = store.create_project("p")
        store.create_job(p.id, "train", status="running")
    s = Studio(tmp_path / "d", BackboneSpec("tiny", None, device="cpu"))
    try:
        job = s.interrupted_training(p.id)
        assert job is not None and job.status == "failed"
    finally:
        s.close()


def test_progress_text_gives_the_time_left():
    from types import SimpleNamespace

    from fewshot_studio.ui.common import duration_text, eta_text

    state = SimpleNamespace(stage_started=100.0, fraction=0.25)
    assert eta_text(state, now=130.0) == " · about 1 min 30 s left"
    assert eta_text(state, now=101.0) == ""  # too early to know the pace
    assert eta_text(SimpleNamespace(stage_started=None, fraction=0.5), now=200.0) == ""
    assert duration_text(7265) == "2 h 1 min" and duration_text(0.2) == "1 s"


def test_an_example_is_found_again_before_copying(tmp_path, tiny):
    s = make_studio(tmp_path, tiny)
    assert s.example_project("shapes") is None
    p = s.load_example("shapes")
    assert s.example_project("shapes").id == p.id
    q = s.load_example("shapes")
    assert q.name.endswith("(2)") and s.example_project("shapes").id in (p.id, q.id)
