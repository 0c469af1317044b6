"""Dataset formats other tools load (issue #17): Hugging Face imagefolder (loaded back with
`datasets`), FiftyOne's image classification layout (its documented schema), Label Studio tasks
with the model's predictions (export -> import keeps every label), the model card in every
model zip, and class names that are unicode, 200 characters long, reserved or hold a slash
giving valid files in every format."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import exports, library, modeling, projects
from fewshot_studio.errors import DataError
from fewshot_studio.ui import presenters

from test_service import make_ws, one_sentence, wait_done
from test_exports import valid_on_windows

NAMES = ["CON", "a/b", "ünïcødé", "x" * 200, "plain <&> \"quoted\""]
DRAWN = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]


def png(seed: int, label: str) -> bytes:
    b = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 32).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def project(tiny, tmp_path_factory):
    """Five awkwardly named classes with two images each (two with the same file name), three
    pool images, a zero-shot model and its pool predictions."""
    ws = make_ws(tmp_path_factory.mktemp("formats") / "data", tiny)
    p = projects.create_project(ws, "Formats ✓")
    sc = ws.scope(p.id)
    for k, (name, drawn) in enumerate(zip(NAMES, DRAWN)):
        c = library.add_class(sc, name)
        added, errors = library.add_images(sc, [(f"{name[:20].replace('/', '_')}-{k}.png", png(k, drawn)),
                                                ("same.png", png(50 + k, drawn))], class_id=c.id)
        assert errors == [] and len(added) == 2
    library.add_images(sc, [(f"pool-{k}.png", png(90 + k, DRAWN[k])) for k in range(3)])
    wait_done(ws, modeling.start_training(sc, "zeroshot"))
    wait_done(ws, modeling.start_labeling(sc))
    yield ws, sc
    ws.close()


def labels_of(sc) -> dict[str, str | None]:
    names = {c.id: c.name for c in sc.store.list_classes(sc.id)}
    return {i.hash: names.get(i.class_id) for i in sc.store.list_images(sc.id)}


def unzip(path: Path, to: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            assert all(valid_on_windows(part) for part in PurePosixPath(n).parts), n
        z.extractall(to)
    return to


def test_hf_imagefolder_loads_back_with_datasets(project, tmp_path):
    import datasets

    _, sc = project
    folder = unzip(exports.export_hf_imagefolder(sc), tmp_path / "hf")
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == 2 * len(NAMES)
    got = sorted((row["sha256"], row["label"]) for row in ds)
    want = sorted((h, c) for h, c in labels_of(sc).items() if c is not None)
    assert got == want  # every labeled image, its class name exact
    for row in ds.select(range(2)):
        assert row["image"].size == (32, 32)
    ids = {hashlib.sha256((folder / json.loads(line)["file_name"]).read_bytes()).hexdigest()
           for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()}
    assert ids == {h for h, _ in want}  # file_name points at the right bytes


def test_fiftyone_layout_matches_its_schema(project, tmp_path):
    _, sc = project
    folder = unzip(exports.export_fiftyone(sc), tmp_path / "fo")
    assert sorted(p.name for p in folder.iterdir()) == ["data", "labels.json"]
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    assert set(labels) == {"classes", "labels"} and labels["classes"] == NAMES
    files = {p.stem: p for p in (folder / "data").iterdir()}
    assert set(labels["labels"]) == set(files) and len(files) == 2 * len(NAMES)  # one key per file stem
    assert all(isinstance(t, int) and 0 <= t < len(NAMES) for t in labels["labels"].values())
    truth = labels_of(sc)
    for stem, target in labels["labels"].items():
        digest = hashlib.sha256(files[stem].read_bytes()).hexdigest()
        assert labels["classes"][target] == truth[digest]


def test_label_studio_tasks_config_and_round_trip(project, tmp_path):
    ws, sc = project
    folder = unzip(exports.export_label_studio(sc), tmp_path / "ls")
    tasks = json.loads((folder / "tasks.json").read_text(encoding="utf-8"))
    assert len(tasks) == 2 * len(NAMES) + 3
    config = ElementTree.fromstring((folder / "labeling_config.xml").read_text(encoding="utf-8"))
    choices = config.find("Choices")
    assert choices.get("toName") == config.find("Image").get("name") and choices.get("choice") == "single"
    assert [c.get("value") for c in choices.findall("Choice")] == NAMES  # escaped and read back exactly
    truth = labels_of(sc)
    predicted = 0
    for t in tasks:
        image = t["data"]["image"]
        assert image.startswith(exports.LS_PREFIX) and (folder / image[len(exports.LS_PREFIX):]).is_file()
        label = truth[t["data"]["sha256"]]
        if label is None:
            assert "annotations" not in t
        else:
            assert t["annotations"][0]["result"][0]["value"]["choices"] == [label]
        for pred in t.get("predictions", []):
            predicted += 1
            r = pred["result"][0]
            assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "choices")
            assert r["value"]["choices"][0] in NAMES and 0 <= pred["score"] <= 1
    assert predicted == 3  # the pool's predictions as pre-annotations

    # a fresh project with the same images, unlabeled, takes every label back from the tasks
    p2 = projects.create_project(ws, "Round trip")
    sc2 = ws.scope(p2.id)
    for name in NAMES:
        library.add_class(sc2, name)
    library.add_images(sc2, [(i.original_name, i.path.read_bytes()) for i in sc.store.list_images(sc.id)])
    result = exports.import_label_studio(sc2, (folder / "tasks.json").read_bytes())
    assert (result.labeled, result.unchanged, result.unlabeled, result.unmatched) == (10, 0, 3, 0)
    assert labels_of(sc2) == truth
    assert "Imported 10 labels" in presenters.label_import(result)
    again = exports.import_label_studio(sc2, (folder / "tasks.json").read_bytes())
    assert (again.labeled, again.unchanged) == (0, 10)


def test_label_studio_import_matches_by_file_name_and_refuses_bad_files(project):
    ws, sc = project
    p = projects.create_project(ws, "By name")
    s2 = ws.scope(p.id)
    library.add_class(s2, "ünïcødé")
    library.add_images(s2, [("photo one.png", png(1, "red circle")), ("other.png", png(2, "blue square"))])

    def task(url, choice, cancelled=False):
        return {"id": 1, "data": {"image": url}, "annotations": [
            {"was_cancelled": cancelled, "result": [
                {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]}]}

    export = [task("/data/upload/3/0a1b2c3d-photo%20one.png", "ünïcødé"),  # Label Studio's upload prefix
              task("/data/local-files/?d=imgs/other.png", "ünïcødé", cancelled=True),
              task("https://example.com/elsewhere.png", "ünïcødé")]
    r = exports.import_label_studio(s2, json.dumps(export).encode())
    assert (r.labeled, r.unlabeled, r.unmatched) == (1, 1, 1)
    assert {i.original_name: i.class_id is not None for i in s2.store.list_images(s2.id)} == \
        {"photo one.png": True, "other.png": False}

    before = labels_of(s2)
    for bad in (b"\xff\xfe not json", b"{\"data\": 1}", b"[1, 2]", b"[" * 100_000,
                json.dumps([task("x/other.png", "not a class")]).encode()):
        with pytest.raises(DataError) as e:
            exports.import_label_studio(s2, bad)
        assert one_sentence(str(e.value)), str(e.value)
    assert labels_of(s2) == before  # a refused file changes nothing


def test_model_zip_carries_a_model_card(project):
    _, sc = project
    with zipfile.ZipFile(exports.export_model(sc)) as z:
        card = z.read("model/README.md").decode("utf-8")
    for needle in ("Zero-shot CLIP", "`zeroshot`", "tiny", "Hyper-parameters", "Cross-validated accuracy",
                   "Intended use and limits", "few examples", "export-onnx", "load_model", "trained 20"):
        assert needle in card, needle
    for name in NAMES:  # every class with its count; the table stays one row per class
        cell = name.replace("|", "\\|").replace("<", "&lt;")
        assert f"| {cell} | 2 |" in card


@pytest.mark.slow
def test_onnx_export_runs_as_a_job(project):
    ws, sc = project
    st = wait_done(ws, exports.start_onnx_export(sc))
    path = Path(st.result)
    assert path.suffix == ".onnx" and path.stat().st_size > 100_000
    from fewshot_studio.onnx_predict import OnnxClassifier

    assert OnnxClassifier(str(path)).classes == NAMES
