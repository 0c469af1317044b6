"""The papers' K-shot protocol over seeds (`run_protocol`): sample K images per class by seed,
train every method (or Auto) on them, test on held-out images, report mean ± std."""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np

from ..data import ImageRef, SupportSet
from ..errors import DataError
from ..progress import CancelFlag, Progress, ProgressFn
from .auto import choose_and_fit
from ..config import DEFAULT_SEEDS, DEFAULT_SHOTS
from .results import ProtocolReport
from .runs import _check_cancel, _check_methods, _fit_predict, _inner, _method_label
from .splits import few_shot_split, labels_array, usable_shots



def _protocol_fit_predict(name, backbone, extractor, train: SupportSet, test_refs: Sequence[ImageRef], seed,
                          overrides, progress, cancel) -> np.ndarray:
    from ..methods import catalog

    method = None
    if name == catalog.AUTO:
        # Auto cross-validates on `train` only (the test images never influence its choice), with
        # no time budget: the protocol's numbers must not depend on the machine's speed
        auto = catalog.coerce_settings(name, (overrides or {}).get(name))
        method = choose_and_fit(train, backbone, extractor, budget_s=None, with_mma=auto.get("with_mma", False),
                                seed=auto.get("seed", seed), overrides=overrides, progress=progress, cancel=cancel)
    return _fit_predict(name, backbone, extractor, train, test_refs, seed, overrides, progress, cancel, method)


def run_protocol(train: SupportSet, test: tuple[Sequence[ImageRef], Any] | None, shots: Sequence[int],
                 seeds: Sequence[int], methods: Sequence[str], backbone, extractor,
                 overrides: dict[str, dict] | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> ProtocolReport:
    """For each seed and shot count K: sample K images per class of `train` (`few_shot_split`), train
    every method on them (method seed = the protocol seed unless `overrides` sets one), and test on
    `test` = (refs, labels indexing train.classnames) or, when None, on the images not sampled.
    Shot counts some class cannot supply are skipped (`report.skipped`); none usable → DataError.
    "auto" among `methods` cross-validates its candidates on each K-shot training set, with no
    time budget, and is scored on the same test images (evaluation.auto)."""
    methods = _check_methods(methods, auto=True)
    shots = sorted({int(k) for k in shots})
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not shots or shots[0] < 1:
        raise DataError("Shot counts must be positive whole numbers.")
    if not seeds:
        raise DataError("Give at least one seed.")
    ok, skipped = usable_shots(train.counts(), train.classnames, shots, holdout=test is None)
    if not ok:
        raise DataError(f"No requested shot count fits the data ({skipped[-1].removeprefix('skipping ')}).")
    if test is not None:
        test_refs, test_labels = list(test[0]), labels_array(test[1])
        if len(test_refs) != len(test_labels):
            raise DataError("The test set needs exactly one label per image.")
        if not len(test_refs):
            raise DataError("The test set is empty.")
        if test_labels.min() < 0 or test_labels.max() >= train.num_classes:
            raise DataError("A test label points at a class the training data does not have.")
        desc = f"{len(test_refs)} held-out images"
    else:
        test_refs, test_labels = [], np.zeros(0, dtype=np.int64)
        desc = "the images not sampled for training"
    all_labels = labels_array(train.labels)
    extractor.image_features(list(train.images) + test_refs, views=(0,), progress=progress, cancel=cancel)
    labels = {m: _method_label(m) for m in methods}
    runs: list[dict] = []
    total = len(seeds) * len(ok) * len(methods)
    done = 0
    for seed in seeds:
        for k in ok:
            tr, te = few_shot_split(train, k, seed)
            sub = train.subset(tr)
            if test is None:
                refs, y = [train.images[i] for i in te], all_labels[te]
            else:
                refs, y = test_refs, test_labels
            for m in methods:
                _check_cancel(cancel)
                stage = f"Seed {seed}, {k} shot{'s' if k != 1 else ''}: {labels[m]}"
                if progress is not None:
                    progress(Progress(stage, done, total))
                t0 = time.perf_counter()
                pred = _protocol_fit_predict(m, backbone, extractor, sub, refs, seed, overrides,
                                             _inner(progress, stage, done, total), cancel)
                acc = float((pred == y).mean()) if len(y) else math.nan
                runs.append({"method": m, "shots": k, "seed": seed, "accuracy": acc, "n_test": int(len(y)),
                             "seconds": round(time.perf_counter() - t0, 3)})
                done += 1
                if progress is not None:
                    progress(Progress(stage, done, total))
    return ProtocolReport(methods, labels, ok, seeds, runs, list(train.classnames), desc,
                          getattr(backbone, "id", ""), skipped)
