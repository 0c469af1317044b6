"""Faults: a full disk, a process killed while writing a model, tampered model files."""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.cache import FeatureCache
from fewshot_studio.errors import ModelFileError
from fewshot_studio.features import FeatureExtractor
from fewshot_studio.jobs import DONE, FAILED, JobRunner
from fewshot_studio.methods import load_model, make_method
from fewshot_studio.store import ProjectStore, StoreError

from helpers import make_task, training_script

pytestmark = pytest.mark.slow  # kills training subprocesses


def png(label: str, rng) -> bytes:
    buf = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), rng, 64).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def project(tmp_path):
    store = ProjectStore(tmp_path / "data")
    p = store.create_project("p")
    rng = np.random.default_rng(0)
    for label in ["red circle", "blue square"]:
        c = store.add_class(p.id, label)
        store.add_images(p.id, [(f"{label}{k}.png", png(label, rng)) for k in range(3)], class_id=c.id)
    yield store, p
    store.close()


def test_full_disk_during_model_save_fails_cleanly(project, tiny, tmp_path, monkeypatch):
    store, p = project
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    assert runner.wait(runner.submit_training(p.id, "graph", tiny, ex), 300).status == DONE
    (good,) = store.list_models(p.id)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch  # Method.save imports save_file from here at call time
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    state = runner.wait(runner.submit_training(p.id, "tip-f", tiny, ex), 300)
    assert state.status == FAILED and "disk is full" in state.message and "\n" not in state.message
    assert [m.id for m in store.list_models(p.id)] == [good.id]
    assert load_model(good.path, backbone=tiny).classnames == ["red circle", "blue square"]
    assert not any(store.staging_dir().iterdir())
    assert len(store.list_images(p.id)) == 6


def test_full_disk_during_upload_loses_nothing(project, monkeypatch):
    store, p = project
    before = store.list_images(p.id)
    import fewshot_studio.store as store_mod

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", no_space)
    with pytest.raises(StoreError) as e:
        store.add_images(p.id, [("new.png", png("green star", np.random.default_rng(5)))])
    assert "free disk space" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    assert store.list_images(p.id) == before
    assert all(i.path.exists() for i in before)
    assert store.check_integrity() == []


def test_killed_while_writing_model_leaves_no_partial_model(tmp_path):
    root = tmp_path / "data"
    script = training_script(root, tmp_path / "c", before="""
        from fewshot_studio.methods import base
        def slow_save(self, directory):
            (base.Path(directory).parent / "partial.bin").write_bytes(b"x" * 1000)
            print("WRITING", flush=True)
            time.sleep(600)
        base.Method.save = slow_save
    """, then="""
        runner.submit_training(p.id, "graph", tiny, ex)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("WRITING")
    finally:
        proc.kill()
        proc.wait()
    store = ProjectStore(root)
    try:
        assert store.mark_interrupted_jobs() == 1
        (p,) = store.list_projects()
        assert store.list_models(p.id) == []
        assert not (root / "models").exists() or not any((root / "models").iterdir())
        assert len(store.list_images(p.id)) == 6 and [c.name for c in store.list_classes(p.id)] == [
            "red circle", "blue square"]
        assert store.support_set(p.id).counts() == [3, 3]
        store.collect_garbage()
        assert not any(store.staging_dir().iterdir())
    finally:
        store.close()


@pytest.fixture
def saved_graph(tiny, tmp_path):
    support, test, _ = make_task({"red circle": "red circle", "blue square": "blue square",
                                  "green triangle": "green triangle"}, shots=2, test_per_class=1)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    m = make_method("graph", tiny, support.classnames, steps=5).fit(support, ex)
    return m.save(tmp_path / "model")


def test_tampered_weights_shape_is_refused(saved_graph, tiny):
    from safetensors.torch import load_file, save_file
    t = load_file(str(saved_graph / "model.safetensors"))
    t["b_text"] = t["b_text"][:2].contiguous()  # weights for 2 classes, config says 3
    save_file(t, str(saved_graph / "model.safetensors"))
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(saved_graph, backbone=tiny)


def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(saved_graph, tiny, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (saved_graph / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        load_model(saved_graph, backbone=tiny)
    assert not marker.exists()


def test_nan_weights_and_wrong_backbone_are_refused(saved_graph, tiny):
    import json
    from safetensors.torch import load_file, save_file
    cfg = json.loads((saved_graph / "config.json").read_text())
    cfg["backbone"]["id"] = "ViT-B-32/openai"
    (saved_graph / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="trained on backbone"):
        load_model(saved_graph, backbone=tiny)
    cfg["backbone"]["id"] = tiny.id
    (saved_graph / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(saved_graph / "model.safetensors"))
    t["W_text"][0, 0] = float("nan")
    save_file(t, str(saved_graph / "model.safetensors"))
    with pytest.raises(ModelFileError, match="NaN"):
        load_model(saved_graph, backbone=tiny)
