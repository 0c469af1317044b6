"""Helpers shared by test modules (test modules import these and conftest's fixtures, never
each other)."""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import torch

from fewshot_studio import shapes
from fewshot_studio.data import ImageRef, SupportSet
from fewshot_studio.methods import make_method

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red circle", "blue square", "green triangle", "yellow star"]
CHROMIUM = os.environ.get("FEWSHOT_STUDIO_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
NO_CHROMIUM = f"Chromium is not installed at {CHROMIUM} (CI installs it with apt-get install chromium)"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage",
                 # a synthetic camera, granted without a prompt (the webcam test)
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--autoplay-policy=no-user-gesture-required"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(path: Path, label: str, seed: int) -> str:
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 64).save(path)
    return str(path)


def launch(ws):
    """The app of the Workspace `ws` on a free loopback port (close it with .close())."""
    from fewshot_studio.ui.app import build_app

    demo = build_app(ws)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo


class Endpoint:
    """Arguments of a named endpoint by label, starting from the components' defaults."""

    def __init__(self, client, name: str):
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][name]
        self.client, self.name, self.params = client, name, info["parameters"]

    def args(self, by_label: dict) -> list:
        out = []
        for p in self.params:
            label = p["label"]
            hit = [k for k in by_label if k in label]
            out.append(by_label[hit[0]] if hit else p.get("parameter_default"))
        return out

    def __call__(self, **by_label):
        return self.client.predict(*self.args(by_label), api_name=self.name)

    def submit(self, **by_label):
        """Start the call without waiting: a gradio_client Job."""
        return self.client.submit(*self.args(by_label), api_name=self.name)


def wait_training(client, timeout: float = 180.0) -> str:
    """Poll the progress endpoint (what the page's timer does) until the job finishes."""
    seen = []
    end = time.time() + timeout
    while time.time() < end:
        out = client.predict(api_name="/training_status")
        html = next((o for o in out if isinstance(o, str) and "fs-progress" in o), "")
        status = re.search(r'data-status="(\w+)"', html)
        if status:
            seen.append(status.group(1))
            if status.group(1) in ("done", "failed", "cancelled"):
                return html
        time.sleep(0.3)
    raise AssertionError(f"training did not finish; statuses seen: {seen[-5:]}")


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


def accuracy(method, refs, labels, extractor) -> float:
    return float((method.predict_proba(refs, extractor).argmax(1) == labels).float().mean())


def seeded_accuracies(backbone, extractor, methods, seeds, mapping=None, shots: int = 4,
                      test_per_class: int = 10) -> list[dict[str, float]]:
    """Held-out accuracy of each default-configured method on one generated task per seed
    (uninformative names by default: NATO), {method: accuracy} per seed."""
    out = []
    for seed in seeds:
        support, test, labels = make_task(mapping or NATO, shots=shots, test_per_class=test_per_class,
                                          seed=100 + seed)
        out.append({name: accuracy(make_method(name, backbone, support.classnames).fit(support, extractor),
                                   test, labels, extractor) for name in methods})
    return out


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


def labeling_set(root: Path, n: int, size: int = 32) -> dict:
    """For the `label` tests: a GDA model (tiny backbone) saved under root/model, `n` small
    shape images under root/images (half in a sub-folder) and planted bad files (plain text,
    a truncated PNG, an empty file). Returns {"model", "images", "good", "bad"} (paths as str)."""
    from fewshot_studio.backbone import load_backbone
    from fewshot_studio.features import FeatureExtractor

    bb = load_backbone("tiny", device="cpu")
    support, _, _ = make_task({c: c for c in CLASSES}, shots=3, test_per_class=0)
    method = make_method("gda", bb, support.classnames)
    method.fit(support, FeatureExtractor(bb, decode="thread"))
    method.save(root / "model")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(n):
        p = (images / "sub" if i % 2 else images) / f"img{i:04d}.png"
        shapes.render(shapes.ShapeSpec(*CLASSES[i % len(CLASSES)].split(" ", 1)), rng, size).save(p)
        good.append(str(p))
    bad = [images / "notes.png", images / "sub" / "cut.png", images / "empty.jpg"]
    bad[0].write_text("not an image")
    bad[1].write_bytes(Path(good[1]).read_bytes()[:60])
    bad[2].write_bytes(b"")
    return {"model": str(root / "model"), "images": str(images), "good": good, "bad": [str(b) for b in bad]}
