"""Few-shot splits and cross-validation folds (the rules: the package docstring)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data import SupportSet
from ..errors import DataError

LOO_MAX = 20


def labels_array(labels) -> np.ndarray:
    if hasattr(labels, "labels") and not isinstance(labels, np.ndarray):  # a SupportSet
        labels = labels.labels
    if hasattr(labels, "numpy"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)



def few_shot_split(support: SupportSet | Sequence[int], shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): K = `shots` images per class sampled by `seed`, the rest for testing.

    The sample is the first K of a per-class permutation that depends only on the seed, so the
    K-shot sets of one seed are nested. A class with exactly K images goes entirely to training
    (nothing of it left to test); a class with fewer than K raises DataError.
    """
    labels = labels_array(support)
    names = list(getattr(support, "classnames", [])) or [str(c) for c in range(labels.max(initial=-1) + 1)]
    if int(shots) < 1:
        raise DataError(f"The number of shots must be at least 1, not {shots}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)  # drawn for every class, whatever K, so the sets nest
        if len(idx) < shots:
            raise DataError(f"Class {name!r} has {len(idx)} images, fewer than the {shots} shots asked for.")
        train.append(perm[:shots])
        test.append(perm[shots:])
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(test)


def usable_shots(counts: Sequence[int], classnames: Sequence[str], shots: Sequence[int],
                 holdout: bool) -> tuple[list[int], list[str]]:
    """Split `shots` into those every class can supply and one message per skipped value.
    `holdout`: the test images come from the same pool, so each class needs K + 1 images."""
    ok, skipped = [], []
    if not len(counts):
        return ok, [f"skipping {k} shots: there are no classes" for k in shots]
    c = int(np.argmin(counts))
    smallest, name = int(counts[c]), classnames[c]
    for k in shots:
        need = k + 1 if holdout else k
        if smallest >= need:
            ok.append(k)
        else:
            why = " (one must stay for testing)" if holdout else ""
            skipped.append(f"skipping {k} shots: class {name!r} has only {smallest} images{why}")
    return ok, skipped


def cv_folds(labels, seed: int = 0, max_folds: int = 5, loo_max: int = LOO_MAX) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds over `labels` (a sequence of class indices, or a SupportSet):
    a list of (train_idx, test_idx) sorted int arrays. See the module docstring for the rule:
    leave-one-out for at most `loo_max` testable images, else stratified `max_folds`-fold;
    single-image classes are never tested; every index of a testable class is tested exactly once."""
    labels = labels_array(labels)
    n = len(labels)
    if n == 0:
        return []
    counts = np.bincount(labels)
    testable = np.flatnonzero(counts[labels] >= 2)
    everything = np.arange(n)
    if len(testable) == 0:
        return []
    if len(testable) <= loo_max:
        return [(np.delete(everything, i), np.array([i], dtype=np.int64)) for i in testable]
    k = max(2, min(int(max_folds), len(testable)))
    rng = np.random.default_rng(seed)
    fold_of = np.full(n, -1, dtype=np.int64)
    start = 0
    for c in np.flatnonzero(counts >= 2):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold_of[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def describe_folds(folds: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> str:
    """One line saying which scheme the folds are."""
    if not folds:
        return "no folds"
    tested = sum(len(te) for _, te in folds)
    untested = n - tested
    tail = f"; {untested} image{'s' if untested != 1 else ''} of single-image classes only trained on" if untested else ""
    if all(len(te) == 1 for _, te in folds):
        return f"leave-one-out over {tested} images ({len(folds)} folds){tail}"
    return f"stratified {len(folds)}-fold over {tested} images{tail}"
