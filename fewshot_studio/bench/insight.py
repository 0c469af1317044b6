"""How long the data inspection takes (issue #16): the map, the near-duplicate search and the
label-issue pass on N feature vectors.

    python -m fewshot_studio bench --insight [--insight-sizes 1000,10000] [--insight-dim 512]

Features: N random unit vectors of `--dim` dimensions (512: ViT-B-32's; 64: tiny's) around
`--classes` random centres (noise 1.5× a centre's scale), labels their centres: the timings
depend on N, the dimension and the classes, not on what the vectors show. The first call of
each part (numba compiling umap-learn's kernels, cleanlab's imports) is timed apart as
"warm-up" on 300 points; the figures per N are warm. Prints a markdown table.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from .. import insight


def features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + 1.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(sizes=(1000, 10000), dim: int = 512, classes: int = 10, with_map: bool = True,
            map_epochs: tuple[int | None, ...] = (None, 500)) -> list[dict]:
    """One row per (N, part): {"n", "part", "seconds", "note"}; the first rows time the warm-up."""
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    x, y = features(300, dim, classes)
    _, t_labels = _timed(lambda: insight.label_issues(y, *insight.out_of_sample_probs(x, y, classes)))
    rows.append({"n": 300, "part": "warm-up: label issues (imports)", "seconds": t_labels, "note": ""})
    if with_map:
        # umap-learn computes exact neighbours below 4,096 points and NN-descent above: both compile
        m, t_map = _timed(lambda: insight.embedding_map(x, seed=0))
        big, _ = features(4500, dim, classes)
        _, t_big = _timed(lambda: insight.embedding_map(big, seed=0, n_epochs=5))
        _, t_ext = _timed(lambda: insight.extend_map(m, x[:5]))
        rows.append({"n": 300, "part": "warm-up: map (numba compiles umap-learn)", "seconds": t_map, "note": ""})
        rows.append({"n": 4500, "part": "warm-up: NN-descent (numba compiles pynndescent)", "seconds": t_big,
                     "note": "5 epochs"})
        rows.append({"n": 300, "part": "warm-up: extend (numba compiles transform)", "seconds": t_ext, "note": ""})
    for n in sizes:
        x, y = features(n, dim, classes)
        pairs, t = _timed(lambda: insight.near_duplicates(x))
        rows.append({"n": n, "part": "near-duplicates", "seconds": t, "note": f"{len(pairs)} pairs"})
        (probs, tested), t1 = _timed(lambda: insight.out_of_sample_probs(x, y, classes))
        issues, t2 = _timed(lambda: insight.label_issues(y, probs, tested))
        rows.append({"n": n, "part": "label issues", "seconds": t1 + t2,
                     "note": f"cross-validated GDA {t1:.2f} s + cleanlab {t2:.2f} s; {len(issues)} flagged"})
        if with_map:
            # None: the app's choice (insight.LARGE_MAP_EPOCHS from LARGE_MAP_FROM points); 500:
            # umap-learn's default up to 10,000 points, timed where the app does not use it
            for epochs in map_epochs if n >= insight.LARGE_MAP_FROM else (None,):
                m, t = _timed(lambda: insight.embedding_map(x, seed=0, n_epochs=epochs))
                used = epochs or (insight.LARGE_MAP_EPOCHS if n >= insight.LARGE_MAP_FROM else "umap default")
                rows.append({"n": n, "part": f"map (UMAP, n_epochs={used})" + ("" if epochs else ": the app's"),
                             "seconds": t, "note": ""})
            _, t = _timed(lambda: insight.extend_map(m, x[:10] + 0.01))
            rows.append({"n": n, "part": "map: place 10 new points (transform)", "seconds": t, "note": ""})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| images | part | seconds | note |", "|---:|---|---:|---|"]
    out += [f"| {r['n']:,} | {r['part']} | {r['seconds']:.2f} | {r['note']} |" for r in rows]
    return "\n".join(out)
