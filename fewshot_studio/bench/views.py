"""How many augmented views a method needs: held-out accuracy against `augment_views` on the
synthetic uninformative-names task (issue #14, item 6c), the measurement behind the defaults.

    python -m fewshot_studio bench --views [--methods tip gda proker graph] [--view-counts 0 1 2 4 10]
                                           [--view-shots 1 2 4] [--seeds 5] [--json FILE]

Task: five classes named alpha … echo (names that tell the text encoder nothing), each a
colour-shape of the tiny backbone's synthetic world (`shapes.render`, 64 px), `shots` support
images and `--test` held-out images per class, drawn afresh for each seed. Every method is
fitted with only `augment_views` changed (its other settings are its defaults) and scored on
the held-out images' plain views; a table of mean accuracy (and the worst seed) per method,
shots and views is printed. One feature cache serves every fit, so each view of each image is
encoded once.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import shapes
from ..backbone import load_backbone
from ..cache import FeatureCache
from ..data import ImageRef, SupportSet
from ..features import FeatureExtractor
from ..methods import make_method

NAMES = {"alpha": "red circle", "bravo": "blue square", "charlie": "green triangle",
         "delta": "yellow star", "echo": "purple cross"}


def task(shots: int, test_per_class: int, seed: int) -> tuple[SupportSet, list[ImageRef], torch.Tensor]:
    """(support, held-out refs, held-out labels) of the uninformative-names task."""
    rng = np.random.default_rng(seed)
    images, labels, test, test_labels = [], [], [], []
    for i, (name, look) in enumerate(NAMES.items()):
        spec = shapes.ShapeSpec(*look.split(" ", 1))
        refs = [ImageRef.from_pil(shapes.render(spec, rng, 64), f"{name}-{k}.png")
                for k in range(shots + test_per_class)]
        images += refs[:shots]
        labels += [i] * shots
        test += refs[shots:]
        test_labels += [i] * test_per_class
    return SupportSet(list(NAMES), images, labels), test, torch.tensor(test_labels)


def sweep(methods, views, shots, seeds: int, test_per_class: int, log=print) -> list[dict]:
    backbone = load_backbone("tiny", device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ex = FeatureExtractor(backbone, FeatureCache(Path(tmp)), decode="thread")
        for k in shots:
            for seed in range(seeds):
                support, test, y = task(k, test_per_class, 1000 * k + seed)
                for m in methods:
                    for v in views:
                        method = make_method(m, backbone, support.classnames, seed=seed, augment_views=v)
                        t0 = time.perf_counter()
                        method.fit(support, ex)
                        fit_s = time.perf_counter() - t0
                        acc = float((method.predict_proba(test, ex).argmax(1) == y).float().mean())
                        rows.append({"method": m, "shots": k, "seed": seed, "views": v, "accuracy": acc,
                                     "fit_seconds": fit_s})
                log(f"shots {k} seed {seed} done")
    return rows


def table(rows: list[dict], views) -> str:
    out = ["| method | shots | " + " | ".join(f"{v} views" for v in views) + " |",
           "|---|---|" + "---|" * len(views)]
    keys = sorted({(r["method"], r["shots"]) for r in rows}, key=lambda t: (t[0], t[1]))
    for m, k in keys:
        cells = []
        for v in views:
            acc = [r["accuracy"] for r in rows if (r["method"], r["shots"], r["views"]) == (m, k, v)]
            cells.append(f"{np.mean(acc):.1%} (min {min(acc):.0%})" if acc else "")
        out.append(f"| {m} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def run_views(methods, views, shots, seeds: int, test_per_class: int = 20, json_path: str | None = None) -> int:
    """The sweep, printed as a table (and written as JSON rows to `json_path`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small fits: one thread each is fastest on a shared CPU
    try:
        rows = sweep(methods, views, shots, seeds, test_per_class)
    finally:
        torch.set_num_threads(threads)
    print(table(rows, views))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0
