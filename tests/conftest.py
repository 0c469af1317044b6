"""Shared fixtures: the offline `tiny` backbone and synthetic coloured-shape tasks."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch

from fewshot_studio import shapes
from fewshot_studio.backbone import load_backbone
from fewshot_studio.cache import FeatureCache
from fewshot_studio.data import ImageRef, SupportSet
from fewshot_studio.features import FeatureExtractor

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Uninformative names: the tiny backbone cannot solve these zero-shot.
NATO = {"alpha": "red circle", "bravo": "blue square", "charlie": "green triangle",
        "delta": "yellow star", "echo": "purple cross"}


def make_refs(label: str, n: int, rng: np.random.Generator, size: int = 64) -> list[ImageRef]:
    spec = shapes.ShapeSpec(*label.split(" ", 1))
    return [ImageRef.from_pil(shapes.render(spec, rng, size), f"{label}-{i}.png") for i in range(n)]


def make_task(mapping: dict[str, str], shots: int, test_per_class: int, seed: int = 0):
    """(support, test_refs, test_labels): `mapping` is class name -> colour-shape it depicts."""
    rng = np.random.default_rng(seed)
    names = list(mapping)
    images, labels, test, test_labels = [], [], [], []
    for i, n in enumerate(names):
        refs = make_refs(mapping[n], shots + test_per_class, rng)
        images += refs[:shots]
        labels += [i] * shots
        test += refs[shots:]
        test_labels += [i] * test_per_class
    return SupportSet(names, images, labels), test, torch.tensor(test_labels)


@pytest.fixture(scope="session")
def tiny():
    return load_backbone("tiny", device="cpu")


@pytest.fixture
def extractor(tiny, tmp_path):
    return FeatureExtractor(tiny, FeatureCache(tmp_path / "features"))


@pytest.fixture(scope="session")
def shared_extractor(tiny, tmp_path_factory):
    """One cache for the whole session: fast repeated feature look-ups across tests."""
    return FeatureExtractor(tiny, FeatureCache(tmp_path_factory.mktemp("features")))


@pytest.fixture(scope="session")
def nato_task():
    """5 classes with uninformative names, 4 shots each, 20 held-out images per class."""
    return make_task(NATO, shots=4, test_per_class=20, seed=7)


def accuracy(method, refs, labels, extractor) -> float:
    return float((method.predict_proba(refs, extractor).argmax(1) == labels).float().mean())


class CancelAfter:
    """A cancel flag that trips once `stage` has reported `steps` steps; also a progress callback."""

    def __init__(self, stage: str, steps: int):
        self.stage, self.steps, self.tripped, self.seen = stage, steps, False, []

    def __call__(self, p):
        self.seen.append(p)
        if p.stage.startswith(self.stage) and p.step >= self.steps:
            self.tripped = True

    def is_set(self) -> bool:
        return self.tripped


def state_of(method) -> dict:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def training_script(root, cache, before: str = "", then: str = "") -> str:
    """Python source for a subprocess that builds a project (2 classes x 3 shape images) in a
    ProjectStore at `root`, loads `tiny`, and runs `then` with `store`, `p`, `tiny`, `runner`
    and `ex` defined; `before` runs first (e.g. to patch something). For kill/restart tests."""
    import textwrap

    head = textwrap.dedent(f"""
        import io, os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        os.environ["HF_HUB_OFFLINE"] = "1"
        import numpy as np
        from fewshot_studio import shapes
        from fewshot_studio.backbone import load_backbone
        from fewshot_studio.cache import FeatureCache
        from fewshot_studio.features import FeatureExtractor
        from fewshot_studio.jobs import JobRunner
        from fewshot_studio.store import ProjectStore
    """)
    body = textwrap.dedent(f"""
        store = ProjectStore({str(root)!r})
        p = store.create_project("p")
        rng = np.random.default_rng(0)
        for label in ["red circle", "blue square"]:
            c = store.add_class(p.id, label)
            items = []
            for k in range(3):
                b = io.BytesIO(); shapes.render(shapes.ShapeSpec(*label.split()), rng, 64).save(b, "PNG")
                items.append((f"{{k}}.png", b.getvalue()))
            store.add_images(p.id, items, class_id=c.id)
        tiny = load_backbone("tiny", device="cpu")
        runner = JobRunner(store)
        ex = FeatureExtractor(tiny, FeatureCache({str(cache)!r}))
    """)
    return head + textwrap.dedent(before) + body + textwrap.dedent(then)
