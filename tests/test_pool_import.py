"""Importing a labeled Parquet file (`python -m fewshot_studio label`) as the pool predictions of
the project's current model (app/pool_import.py, issue 18): matched by SHA-256, probabilities
reordered to the model's classes, least confident first in the station's queue, the untrusted
file checked with one-sentence errors and nothing stored unless every file passes."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewshot_studio import labeling
from fewshot_studio.app import Workspace, modeling, pool_import, station
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.errors import DataError

TINY = BackboneSpec("tiny", None, device="cpu")
CLASSES = ["circle", "square", "star"]
PROBS = [[.50, .49, .01], [.40, .30, .30], [.90, .05, .05], [.45, .45, .10], [.20, .70, .10]]
FILE_ORDER = ["star", "circle", "square"]  # the file's classes in another order than the model's


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def project(tmp_path, tiny):
    """Three classes, five pool images and a current model with those classes (no predictions)."""
    ws = Workspace.at(tmp_path / "data", TINY, loader=lambda spec: tiny)
    store = ws.store
    p = store.create_project("Import")
    cls = [store.add_class(p.id, c) for c in CLASSES]
    for n, c in enumerate(cls):
        store.add_images(p.id, [(f"ex{n}.png", png(100 + n))], class_id=c.id)
    pool = [png(n) for n in range(len(PROBS))]
    imgs, _ = store.add_images(p.id, [(f"pool{n}.png", d) for n, d in enumerate(pool)])
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    model = store.register_model(p.id, "gda", "tiny", {"classes": CLASSES}, {}, d)
    yield ws, ws.scope(p.id), pool, [i.id for i in imgs], model
    ws.close()


def labeled_file(path, hashes, probs, classes=FILE_ORDER, errors=None, meta=True):
    """A file as `label` writes it (labeling.schema), probabilities given in CLASSES order."""
    n = len(hashes)
    errors = errors or [None] * n
    perm = [CLASSES.index(c) if c in CLASSES else 0 for c in classes]
    rows = [None if e else [float(p[j]) for j in perm] for p, e in zip(probs, errors)]
    sch = labeling.schema(3, meta={"classes": classes} if meta else None)
    if not meta:
        sch = sch.remove_metadata()
    table = pa.table({"path": [f"/far/away/{i}.png" for i in range(n)], "sha256": hashes,
                      "label": [None] * n, "confidence": [None] * n, "topk": [None] * n,
                      "probs": rows, "error": errors}, schema=sch)
    pq.write_table(table, path)
    return path


def test_import_matches_by_hash_and_ranks_least_confident_first(project, tmp_path):
    ws, sc, pool, ids, model = project
    outsider = png(999)
    f = labeled_file(tmp_path / "a.parquet", [sha(d) for d in pool] + [sha(outsider), None],
                     PROBS + [[1, 0, 0], [0, 0, 0]], errors=[None] * 6 + ["x.png: the file is not an image."])
    r = pool_import.import_predictions(sc, f)
    assert (r.matched, r.not_in_pool, r.errors) == (5, 1, 1)
    page = station.queue(sc, "least-confident")
    assert [ids.index(it.image_id) for it in page.items] == [1, 3, 0, 4, 2]
    first = page.items[0]
    assert first.label == "circle" and first.confidence == pytest.approx(.40)
    assert [c for c, _ in first.top] == ["circle", "square", "star"]
    # the rows label_pool would have stored: the model's class order, label = most probable
    rows = {p.image_id: p for p in ws.store.list_predictions(model.id)}
    assert np.allclose(rows[ids[4]].probs, PROBS[4])
    assert [r.label for r in modeling.pool_predictions(sc)][:1] == ["circle"]
    assert "5 pool images" in pool_import_text(r) and "not in this project's pool" in pool_import_text(r)


def pool_import_text(r) -> str:
    from fewshot_studio.ui.presenters import imported_text

    return imported_text(r)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"PAR1 not really"), "not a readable Parquet file"),
    (lambda p: pq.write_table(pa.table({"sha256": ["a"]}), p), "no 'error' column"),
    (lambda p: labeled_file(p, ["a" * 64], [PROBS[0]], meta=False), "does not record the model's classes"),
    (lambda p: labeled_file(p, ["a" * 64], [PROBS[0]], classes=["circle", "square", "moon"]),
     "the current model has circle, square, star"),
    (lambda p: labeled_file(p, ["a" * 64], [[float("nan"), .5, .5]]), "not a distribution"),
    (lambda p: labeled_file(p, ["a" * 64], [[.9, .9, .9]]), "not a distribution"),
    (lambda p: labeled_file(p, ["short"], [PROBS[0]]), "no SHA-256"),
])
def test_untrusted_files_are_refused_in_one_sentence_and_nothing_is_stored(project, tmp_path, make, words):
    ws, sc, pool, ids, model = project
    good = labeled_file(tmp_path / "good.parquet", [sha(d) for d in pool], PROBS)
    bad = tmp_path / "bad.parquet"
    make(bad)
    with pytest.raises(DataError) as e:
        pool_import.import_predictions(sc, [good, bad])  # the good file first: all or nothing
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.endswith(".") and "Traceback" not in msg
    assert ws.store.list_predictions(model.id) == []


def test_import_needs_a_model(tmp_path, tiny):
    ws = Workspace.at(tmp_path / "data", TINY, loader=lambda spec: tiny)
    p = ws.store.create_project("Empty")
    f = labeled_file(tmp_path / "a.parquet", ["a" * 64], [PROBS[0]])
    with pytest.raises(DataError, match="Train or import a model first"):
        pool_import.import_predictions(ws.scope(p.id), f)
    ws.close()


@pytest.mark.slow
def test_label_cli_output_imports_as_label_pool_would_store_it(tmp_path, tiny):
    """End to end: the shapes example, a GDA model, its model folder labeled by the `label`
    command over the example's pool folder, imported: the same predictions as label_pool's."""
    import glob

    from fewshot_studio.app import projects
    from fewshot_studio.cli import main

    from helpers import ROOT

    ws = Workspace.at(tmp_path / "data", TINY, loader=lambda spec: tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    assert ws.runner.wait(modeling.start_training(sc, "gda"), timeout=300).status == "done"
    info = modeling.current_model_info(sc)
    rows = modeling.label_pool(sc)
    stored = {r.image_id: r for r in ws.store.list_predictions(info.id)}
    ws.store.save_predictions(info.id, [(i, None, 0.0, None) for i in stored])  # forget them
    out = tmp_path / "labeled"
    assert main(["label", "--model", str(info.path), "--input", str(ROOT / "assets" / "examples" / "shapes" / "pool"),
                 "--output", str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    r = pool_import.import_predictions(sc, sorted(glob.glob(str(out / "*.parquet"))))
    assert (r.matched, r.not_in_pool, r.errors) == (len(rows), 0, 0)
    again = {x.image_id: x for x in ws.store.list_predictions(info.id)}
    for i, x in stored.items():
        assert again[i].label == x.label and again[i].confidence == pytest.approx(x.confidence, abs=1e-5)
        assert np.allclose(again[i].probs, x.probs, atol=1e-5)
    assert [row.image_id for row in modeling.pool_predictions(sc)] == [row.image_id for row in rows]
    ws.close()
