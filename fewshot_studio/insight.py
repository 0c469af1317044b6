"""What is wrong with the data: an embedding map, near-duplicates, likely label errors and pool
outliers, all from L2-normalised image features already computed (no store, no images).

* `embedding_map`: 2-D coordinates by UMAP (McInnes et al. 2018, `umap-learn`), the projection
  FiftyOne's Brain `compute_visualization` uses, on cosine distance; `random_state=seed` makes
  it deterministic (umap-learn then runs single-threaded). `extend_map` places a few new points
  with the fitted reducer's `transform` instead of refitting. Below MIN_UMAP points a 2-D PCA
  (SVD, signs fixed) is drawn instead: UMAP's spectral initialisation and k-NN graph need more.
* `near_duplicates`: pairs with cosine similarity >= a threshold, in row blocks of the N×N
  similarity matrix (memory O(block·N)); `duplicate_groups` joins them into connected components
  (scipy.sparse.csgraph). Pairs can be restricted to within/across sets by `groups`.
* `out_of_sample_probs`: each example's class probabilities from a model that never saw it: the
  project's own cross-validation folds (`evaluation.cv_folds`: leave-one-out up to 20 testable
  examples, else 5 stratified folds) and GDA's closed-form Gaussian heads (`methods.gda`, Wang
  et al. ICLR 2024; shared shrunk covariance), all folds in one batched estimate.
* `label_issues`: confident learning (Northcutt et al., JAIR 2021) by `cleanlab.filter.
  find_label_issues` on those probabilities, ranked by `cleanlab.rank.get_label_quality_scores`
  (self-confidence): an example is suspect when the classifier trained without it is confident
  of another class, beyond each class's own average confidence.
* `class_dispersion`: each class's mean cosine distance of its examples to their class mean.
* `outliers`: a pool image's score is its highest similarity to any class prototype or example;
  the threshold is calibrated on the examples themselves (`outlier_threshold`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DataError
from .evaluation.splits import cv_folds
from .progress import ProgressFn, Progress

#: Default cosine similarity at or above which two images count as near-duplicates. Measured
#: with the tiny backbone on assets/examples/shapes (35 images; the insight section of the
#: README): a copy re-encoded as JPEG (q=90) with 2% cropped off each side scores median 0.997,
#: 5th percentile 0.976 with its original; distinct images median 0.047, 99th percentile 0.980,
#: with 4 of 595 pairs at or above 0.985 (same-class renders the tiny model cannot tell apart).
#: The pipeline's own augmented views (random resized crop 50-100% + flip) score median 0.908:
#: a different crop of an image is not a duplicate of it. On assets/examples/textile the tiny
#: model places every pair above 0.9 (it was trained on shapes): a real backbone is needed there.
DUPLICATE_THRESHOLD = 0.985
#: Rows of the similarity matrix computed at once: 2048 × 10,000 float32 is 80 MB.
DUPLICATE_BLOCK = 2048
#: Fewer points than this get a PCA map instead of UMAP (UMAP's default 15 neighbours need more).
MIN_UMAP = 16
#: UMAP's neighbourhood size (umap-learn's default); smaller for a smaller map.
UMAP_NEIGHBORS = 15
#: From this many points on, UMAP optimises the layout for LARGE_MAP_EPOCHS epochs instead of
#: umap-learn's default (500 up to 10,000 points, 200 above). Measured on 2 shared CPU cores,
#: random 512-d features (`bench --insight`, numba already compiled): 10,000 points took 42 s at
#: the default 500 epochs and 19 s at 200 (1,000 points: 8.6 s at the default), so 200 —
#: umap-learn's own choice for large data — keeps a 10,000-image map under 30 s.
LARGE_MAP_FROM = 2000
LARGE_MAP_EPOCHS = 200
#: Quantile of the examples' leave-one-out best similarities below which a pool image is an
#: outlier (see `outlier_threshold`).
OUTLIER_QUANTILE = 0.05


def _as_features(x: Any, what: str = "features") -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if a.ndim != 2:
        raise DataError(f"The {what} must be a 2-D array (one row per image); got shape {a.shape}.")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


# ----------------------------------------------------------------------------------------- map


@dataclass
class EmbeddingMap:
    """2-D coordinates (N, 2) and the fitted reducer (None for the PCA fallback)."""

    coords: np.ndarray
    reducer: Any = None
    method: str = "umap"


def _pca2(x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    centred = x - x.mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(x), 2), dtype=np.float32)
    k = min(2, len(s))
    vt = vt[:k] * np.sign(vt[:k, np.abs(vt[:k]).argmax(1)].diagonal())[:, None]  # deterministic signs
    out[:, :k] = centred @ vt.T
    return out


def embedding_map(features, seed: int = 0, n_neighbors: int = UMAP_NEIGHBORS, n_epochs: int | None = None,
                  progress: ProgressFn | None = None) -> EmbeddingMap:
    """UMAP of L2-normalised `features` on cosine distance, deterministic for `seed` (module
    docstring); a PCA map below MIN_UMAP points. `n_epochs` None: umap-learn's default below
    LARGE_MAP_FROM points, LARGE_MAP_EPOCHS from there on."""
    x = _as_features(features)
    if len(x) < MIN_UMAP:
        return EmbeddingMap(_pca2(x), None, "pca")
    import umap  # 5 s import (numba): only when a map is drawn

    if progress is not None:
        progress(Progress("Drawing the map", 0, 1))
    if n_epochs is None and len(x) >= LARGE_MAP_FROM:
        n_epochs = LARGE_MAP_EPOCHS
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), metric="cosine",
                        random_state=int(seed), n_epochs=n_epochs, transform_seed=int(seed))
    import warnings

    with warnings.catch_warnings():  # "n_jobs overridden by random_state": the determinism asked for
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        coords = reducer.fit_transform(x).astype(np.float32)
    if progress is not None:
        progress(Progress("Drawing the map", 1, 1))
    return EmbeddingMap(coords, reducer, "umap")


def extend_map(m: EmbeddingMap, features) -> np.ndarray:
    """Coordinates of new points on an existing map (`UMAP.transform`: the new points' neighbours
    among the fitted ones, then a short optimisation of the new points only). A PCA map has no
    reducer to extend: the caller redraws it (it is below MIN_UMAP points, so it is instant)."""
    if m.reducer is None:
        raise DataError("This map is too small to extend; draw it again.")
    x = _as_features(features)
    if not len(x):
        return np.zeros((0, 2), dtype=np.float32)
    return np.asarray(m.reducer.transform(x), dtype=np.float32)


# ------------------------------------------------------------------------------- duplicates


def near_duplicates(features, threshold: float = DUPLICATE_THRESHOLD, groups: Sequence[int] | None = None,
                    across_only: bool = False, block: int = DUPLICATE_BLOCK) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity), i < j, with cosine similarity >= `threshold`, most similar first.

    `groups` (one int per row, e.g. 0 examples / 1 pool) tags each pair's sets for the caller;
    with `across_only` only pairs from different groups are returned. Vectorised: the upper
    triangle of X·Xᵀ in blocks of `block` rows."""
    x = torch.from_numpy(_as_features(features))
    n = len(x)
    g = None if groups is None else torch.as_tensor(np.asarray(groups, dtype=np.int64))
    if g is not None and len(g) != n:
        raise DataError("Give one group per image.")
    rows, cols, sims = [], [], []
    for a in range(0, n, block):
        s = x[a:a + block] @ x.T                                             # (b, N)
        i = torch.arange(a, min(a + block, n)).unsqueeze(1)
        keep = (s >= threshold) & (torch.arange(n).unsqueeze(0) > i)        # upper triangle only
        if across_only and g is not None:
            keep &= g[a:a + block].unsqueeze(1) != g.unsqueeze(0)
        r, c = torch.nonzero(keep, as_tuple=True)
        rows.append(r + a)
        cols.append(c)
        sims.append(s[r, c])
    if not rows:
        return []
    r, c, s = torch.cat(rows), torch.cat(cols), torch.cat(sims)
    order = torch.argsort(s, descending=True, stable=True)
    return [(int(i), int(j), float(v)) for i, j, v in zip(r[order], c[order], s[order])]


def duplicate_groups(pairs: Sequence[tuple[int, int, float]], n: int) -> list[list[int]]:
    """Connected components of the duplicate pairs (each a sorted list of row indices, two or
    more), the group holding the most similar pair first."""
    if not pairs:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    p = np.asarray([(i, j) for i, j, _ in pairs], dtype=np.int64)
    graph = coo_matrix((np.ones(len(p)), (p[:, 0], p[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    out: list[list[int]] = []
    seen: set[int] = set()
    for i, _, _ in pairs:  # pairs are most similar first
        c = int(comp[i])
        if c not in seen:
            seen.add(c)
            out.append(np.flatnonzero(comp == c).tolist())
    return out


# ------------------------------------------------------------------------------ label issues


def out_of_sample_probs(features, labels: Sequence[int], num_classes: int, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) class probabilities of each example from GDA heads fitted on the other folds
    (module docstring), and the (N,) mask of examples that were held out (an example whose
    class has a single image never is: its row is uniform and must not be judged)."""
    from .methods.gda import gaussian_heads

    x = torch.from_numpy(_as_features(features))
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    probs = np.full((n, num_classes), 1.0 / max(num_classes, 1))
    tested = np.zeros(n, dtype=bool)
    folds = cv_folds(y, seed=seed)
    if not folds or num_classes < 2:
        return probs, tested
    keep = torch.ones(len(folds), n, dtype=torch.float32)
    fold_of = np.full(n, -1, dtype=np.int64)
    for f, (_, te) in enumerate(folds):
        keep[f, te] = 0
        fold_of[te] = f
    yt = torch.from_numpy(y)
    w, b, _ = gaussian_heads(x, yt, num_classes, keep)                      # (F, C, d), (F, C)
    held = np.flatnonzero(fold_of >= 0)
    f = torch.from_numpy(fold_of[held])
    logits = torch.einsum("qd,qcd->qc", x[held], w[f]) + b[f]
    # a class absent from a fold's training part has no Gaussian there
    present = (keep @ torch.nn.functional.one_hot(yt, num_classes).float()) > 0   # (F, C)
    logits = logits.masked_fill(~present[f], float("-inf"))
    probs[held] = torch.softmax(logits.double(), dim=1).numpy()
    tested[held] = True
    return probs, tested


@dataclass(frozen=True)
class LabelIssue:
    index: int
    given: int
    suggested: int
    score: float        # 1 - the out-of-sample probability of the given class: higher = more likely wrong
    confidence: float   # the out-of-sample probability of the suggested class


def label_issues(labels: Sequence[int], probs: np.ndarray, tested: np.ndarray | None = None) -> list[LabelIssue]:
    """Examples whose label is likely wrong, most likely first: `cleanlab.filter.
    find_label_issues` (confident learning, prune by noise rate) on the out-of-sample `probs`,
    ranked by `cleanlab.rank.get_label_quality_scores` (self-confidence). Only `tested` rows are
    judged; classes with no tested example are left out of the pass."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    idx = np.arange(len(y)) if tested is None else np.flatnonzero(tested)
    if len(idx) < 2:
        return []
    classes = np.unique(y[idx])
    if len(classes) < 2:
        return []
    # cleanlab wants labels 0..K-1 with every class present: re-index the tested classes
    sub = p[np.ix_(idx, classes)]
    sub = sub / np.maximum(sub.sum(1, keepdims=True), 1e-12)
    yy = np.searchsorted(classes, y[idx])
    import warnings

    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    with warnings.catch_warnings():  # cleanlab warns about tiny classes; a few-shot set is all tiny classes
        warnings.simplefilter("ignore")
        # n_jobs=1: cleanlab's default process pool costs seconds to start, more than the pass itself
        flagged = find_label_issues(yy, sub, filter_by="prune_by_noise_rate", n_jobs=1)
        quality = get_label_quality_scores(yy, sub, method="self_confidence")
    out = []
    for k in np.flatnonzero(flagged):
        suggested = int(classes[int(np.argmax(sub[k]))])
        out.append(LabelIssue(int(idx[k]), int(y[idx[k]]), suggested, float(1.0 - quality[k]),
                              float(sub[k].max())))
    return sorted(out, key=lambda e: (-e.score, e.index))


def class_dispersion(features, labels: Sequence[int], num_classes: int) -> np.ndarray:
    """(C,) mean cosine distance 1 − cos(x, μ̂_c) of each class's examples to their normalised
    class mean; NaN for a class with fewer than two examples. A class spread much wider than the
    others (e.g. above twice the median) mixes looks or holds wrong examples."""
    x = torch.from_numpy(_as_features(features))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    onehot = torch.nn.functional.one_hot(y, num_classes).float() if len(y) else torch.zeros(0, num_classes)
    counts = onehot.sum(0)
    means = torch.nn.functional.normalize(onehot.T @ x, dim=1)
    dist = 1.0 - (x * means[y]).sum(1) if len(y) else torch.zeros(0)
    out = (onehot.T @ dist) / counts.clamp_min(1)
    return torch.where(counts >= 2, out, torch.full_like(out, float("nan"))).numpy()


# --------------------------------------------------------------------------------- outliers


def _prototypes(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    sums = onehot.T @ x
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def outlier_threshold(examples, labels: Sequence[int], num_classes: int, quantile: float = OUTLIER_QUANTILE
                      ) -> float:
    """The similarity below which a pool image is unlike every class: the `quantile` of the
    examples' own leave-one-out best similarities (each example against every OTHER example and
    every class mean computed without it). An example is, by definition, an image of one of the
    classes; a pool image less similar to all of them than (nearly) every example is to the
    rest is not. The 5% quantile rather than the minimum: one odd example does not lower it."""
    x = _as_features(examples, "example features")
    y = np.asarray(labels, dtype=np.int64)
    if len(x) < 2:
        return -1.0  # nothing to calibrate on: flag nothing
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    best_example = s.max(1)
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    sums = onehot.T @ x                                                     # (C, d)
    loo = sums[None, :, :] - onehot[:, :, None] * x[:, None, :]             # (N, C, d) class sums without i
    counts = onehot.sum(0)[None, :] - onehot                                # (N, C)
    norms = np.linalg.norm(loo, axis=2)
    sim = np.einsum("nd,ncd->nc", x, loo) / np.maximum(norms, 1e-12)
    sim[counts < 1] = -np.inf
    best = np.maximum(best_example, sim.max(1))
    return float(np.quantile(best, quantile))


def outlier_scores(pool, examples, labels: Sequence[int], num_classes: int, extra_prototypes=None) -> np.ndarray:
    """(P,) each pool image's best cosine similarity to any example, any class mean of the
    examples and any row of `extra_prototypes` (e.g. the model's class weights)."""
    p = _as_features(pool, "pool features")
    x = _as_features(examples, "example features")
    y = np.asarray(labels, dtype=np.int64)
    refs = [x, _prototypes(x, y, num_classes)] if len(x) else []
    if extra_prototypes is not None:
        refs.append(_as_features(extra_prototypes, "class weights"))
    if not refs or not len(p):
        return np.full(len(p), 1.0, dtype=np.float32)
    r = torch.from_numpy(np.concatenate(refs))
    best = torch.full((len(p),), -1.0)
    pt = torch.from_numpy(p)
    for a in range(0, len(p), DUPLICATE_BLOCK):
        best[a:a + DUPLICATE_BLOCK] = (pt[a:a + DUPLICATE_BLOCK] @ r.T).max(1).values
    return best.numpy()


def outliers(pool, examples, labels: Sequence[int], num_classes: int, extra_prototypes=None,
             threshold: float | None = None) -> tuple[list[tuple[int, float]], float]:
    """Pool images unlike every class, most unlike first: [(pool index, score)] with score
    1 − best similarity, and the similarity threshold used (`outlier_threshold` unless given)."""
    best = outlier_scores(pool, examples, labels, num_classes, extra_prototypes)
    t = outlier_threshold(examples, labels, num_classes) if threshold is None else float(threshold)
    idx = np.flatnonzero(best < t)
    idx = idx[np.argsort(best[idx], kind="stable")]
    return [(int(i), float(1.0 - best[i])) for i in idx], t
