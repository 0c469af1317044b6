"""`label --ray` (fewshot_studio/scale.py, issue 18) on a local Ray cluster started once for the
module (ray.init(num_cpus=2)): the same rows as the local path (labels equal, probabilities
within 1e-5) and a bad file as an error row, not a failed job."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from fewshot_studio import labeling
from fewshot_studio.methods import load_model

from helpers import labeling_set

ray = pytest.importorskip("ray", reason="the [scale] extra (Ray Data) is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return labeling_set(tmp_path_factory.mktemp("scale"), 40)


def rows(folder) -> dict:
    t = pq.read_table(folder)
    return {r["path"]: r for r in t.to_pylist()}


def test_ray_path_equals_the_local_path(cluster, files, tmp_path, extractor):
    from fewshot_studio.scale import label_ray

    method = load_model(files["model"], backbone=extractor.backbone)
    meta = labeling.model_meta(method, files["model"])
    paths = labeling.expand_inputs([files["images"]])
    local, _ = labeling.prepare_output(tmp_path / "local", False)
    s = labeling.label_local(method, extractor, paths, local, top_k=3, embeddings=True, meta=meta)
    assert (s.labeled, s.errors) == (40, 3)
    far, _ = labeling.prepare_output(tmp_path / "ray", False)
    r = label_ray(files["model"], method.backbone.image_size, paths, far, meta=meta, top_k=3, embeddings=True,
                  batch_size=16, concurrency=1)
    assert (r["rows"], r["errors"], r["actors"]) == (43, 3, 1)
    a, b = rows(local), rows(far)
    assert a.keys() == b.keys() == set(paths)
    for p in paths:
        x, y = a[p], b[p]
        assert (x["label"], x["sha256"], x["error"]) == (y["label"], y["sha256"], y["error"])
        if x["error"] is None:
            assert np.abs(np.subtract(x["probs"], y["probs"])).max() < 1e-5
            assert np.abs(np.subtract(x["embedding"], y["embedding"])).max() < 1e-5
            assert [t["class"] for t in x["topk"]] == [t["class"] for t in y["topk"]]
        else:
            assert x["label"] is None and y["probs"] is None  # a bad file: an error row on Ray too
    assert set(files["bad"]) == {p for p in paths if b[p]["error"]}
    assert pq.read_table(far).schema.metadata == pq.read_table(local).schema.metadata  # the classes travel


def test_ray_resume_skips_what_is_done(cluster, files, tmp_path):
    from fewshot_studio.cli import main

    out = tmp_path / "out"
    listing = tmp_path / "first.txt"
    listing.write_text("\n".join(files["good"][:10]))  # only readable files: no error in any batch
    assert main(["label", "--model", files["model"], "--input", str(listing), "--output", str(out), "--ray",
                 "--quiet"]) == 0
    first = pq.read_table(out)
    assert first.column("error").null_count == 10 and first.column("label").null_count == 0
    assert main(["label", "--model", files["model"], "--input", files["images"], "--output", str(out), "--ray",
                 "--resume", "--quiet"]) == 0
    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(files["good"] + files["bad"])
