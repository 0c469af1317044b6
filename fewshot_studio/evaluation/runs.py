"""Evaluation runs: every method trained and tested on the same folds of the user's examples
(`cross_validate`), and the papers' K-shot protocol over seeds (`run_protocol`)."""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np

from ..data import ImageRef, SupportSet
from ..errors import Cancelled, DataError, FewShotError
from ..progress import CancelFlag, Progress, ProgressFn
from .results import Comparison, EvalResult, ProtocolReport
from .splits import LOO_MAX, cv_folds, describe_folds, few_shot_split, labels_array, usable_shots

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)


def _method_label(name: str) -> str:
    from ..methods import catalog

    return catalog.label(name)


def _check_cancel(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Evaluation was cancelled.")


def _make(name: str, backbone, support: SupportSet, seed: int, overrides: dict[str, dict] | None):
    from ..methods import catalog, make_method

    kw = catalog.coerce_settings(name, (overrides or {}).get(name))  # the one strict rule
    if "seed" in catalog.settings(name):
        kw.setdefault("seed", seed)
    return make_method(name, backbone, support.classnames, support.descriptions, **kw)


def _fit_predict(name, backbone, extractor, train: SupportSet, test_refs: Sequence[ImageRef], seed, overrides,
                 progress, cancel) -> np.ndarray:
    from ..methods import catalog

    if name == catalog.AUTO:
        # Auto cross-validates on `train` only (the test images never influence its choice), with
        # no time budget: the protocol's numbers must not depend on the machine's speed
        from .auto import choose_and_fit

        auto = catalog.coerce_settings(name, (overrides or {}).get(name))
        method = choose_and_fit(train, backbone, extractor, budget_s=None, with_mma=auto.get("with_mma", False),
                                seed=auto.get("seed", seed), overrides=overrides, progress=progress, cancel=cancel)
    else:
        method = _make(name, backbone, train, seed, overrides)
        method.fit(train, extractor, progress=progress, cancel=cancel)
    if not len(test_refs):
        return np.zeros(0, dtype=np.int64)
    return method.predict_proba(list(test_refs), extractor).argmax(1).numpy().astype(np.int64)


def _inner(progress: ProgressFn | None, outer: str, step: int, total: int) -> ProgressFn | None:
    """Forward a method's own progress as part of the evaluation's overall progress."""
    if progress is None:
        return None

    def report(p: Progress) -> None:
        inner = f"{p.stage} {p.step}/{p.total}" if p.total else p.stage
        progress(Progress(f"{outer}: {inner}", step, total, p.loss, p.accuracy))
    return report


def _check_methods(methods: Sequence[str], auto: bool = False) -> list[str]:
    """`methods` without repeats; an unknown one is a DataError naming the choices. `auto`: the
    protocol also takes the Auto choice (cross-validation does not: see evaluation.auto)."""
    from ..methods import catalog

    out = []
    for m in methods:
        if m == catalog.AUTO and not auto:
            raise DataError("Auto is not cross-validated itself: the comparison already scores its candidates "
                            "on the same folds, and the best of them is what Auto would train.")
        if m != catalog.AUTO:
            catalog.get_method_class(m)  # DataError naming the choices
        if m not in out:
            out.append(m)
    if not out:
        raise DataError("Choose at least one method to evaluate.")
    return out


def cross_validate(support: SupportSet, methods: Sequence[str], backbone, extractor, seed: int = 0,
                   overrides: dict[str, dict] | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None, max_folds: int = 5, loo_max: int = LOO_MAX,
                   budget_s: float | None = None) -> Comparison:
    """Cross-validate every method on the same folds of `support` (see `cv_folds`), pooling the
    predictions of all folds. A method that cannot run on this support set (e.g. one that needs
    an image in every class while a class is empty, or MMA on a ResNet) is listed in
    `Comparison.skipped` with the reason; the others still run. Cancel raises errors.Cancelled.

    `budget_s` (None: no limit) bounds the seconds of fits, counted from after the plain-view
    features: a method is not started once the budget is spent, and one whose remaining folds,
    at the pace of its fastest fold so far, would overrun it is stopped there (a partial result would be
    scored on other images than the rest). Both are listed in `skipped`; the first method to
    finish is never stopped, so there is always a result. Give `methods` cheapest first
    (`catalog.by_cost`) so the budget drops the expensive ones."""
    methods = _check_methods(methods)
    labels = labels_array(support.labels)
    folds = cv_folds(labels, seed=seed, max_folds=max_folds, loo_max=loo_max)
    if not folds:
        raise DataError("Cross-validation needs at least two images in some class; add more examples.")
    desc = describe_folds(folds, len(labels))
    skipped: dict[str, str] = {}
    empty = [c for c, k in zip(support.classnames, support.counts()) if k == 0]
    runnable = []
    for m in methods:
        from ..methods import get_method_class

        cls = get_method_class(m)
        if cls.needs_images and empty:
            skipped[m] = f"{cls.label} needs an image in every class; {', '.join(map(repr, empty))} has none"
        else:
            runnable.append(m)
    total = len(runnable) * len(folds)
    # plain-view features of every image once up front; later look-ups hit the cache
    extractor.image_features(support.images, views=(0,), progress=progress, cancel=cancel)
    results: dict[str, EvalResult] = {}
    done = 0
    start = time.perf_counter()
    for m in runnable:
        label = _method_label(m)
        y_true, y_pred, tested, fold_seconds = [], [], [], []
        t0 = time.perf_counter()
        if budget_s is not None and results and t0 - start >= budget_s:
            skipped[m] = f"the time budget of {budget_s:g} s was spent before it could start"
            done += len(folds)
            continue
        try:
            for f, (tr, te) in enumerate(folds):
                _check_cancel(cancel)
                if budget_s is not None and results and tested:
                    now = time.perf_counter()
                    # the fastest fold so far: one stalled by a busy machine does not stop it early
                    need = min(fold_seconds) * (len(folds) - len(tested))
                    if now - start + need > budget_s:
                        skipped[m] = (f"stopped after {len(tested)} of {len(folds)} folds: the rest would take "
                                      f"about {need:.0f} s more, past the time budget of {budget_s:g} s")
                        done += len(folds) - len(tested)
                        break
                t_fold = time.perf_counter()
                stage = f"Evaluating {label}, fold {f + 1}/{len(folds)}"
                if progress is not None:
                    progress(Progress(stage, done, total))
                pred = _fit_predict(m, backbone, extractor, support.subset(tr), [support.images[i] for i in te],
                                    seed, overrides, _inner(progress, stage, done, total), cancel)
                y_true.append(labels[te])
                y_pred.append(pred)
                tested.append(te)
                fold_seconds.append(time.perf_counter() - t_fold)
                done += 1
        except Cancelled:
            raise
        except FewShotError as e:
            skipped[m] = str(e)
            done += len(folds) - len(tested)
            continue
        if m in skipped:  # stopped by the time budget
            continue
        results[m] = EvalResult.from_predictions(m, support.classnames, np.concatenate(y_true), np.concatenate(y_pred),
                                                 time.perf_counter() - t0, np.concatenate(tested), label)
    if progress is not None:
        progress(Progress("Evaluation done", total, total))
    if not results:
        raise DataError("No method could be evaluated: " + "; ".join(f"{m}: {w}" for m, w in skipped.items()))
    return Comparison(results, desc, list(support.classnames), len(folds), seed, skipped)


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
                pred = _fit_predict(m, backbone, extractor, sub, refs, seed, overrides,
                                    _inner(progress, stage, done, total), cancel)
                acc = float((pred == y).mean()) if len(y) else math.nan
                runs.append({"method": m, "shots": k, "seed": seed, "accuracy": acc, "n_test": int(len(y)),
                             "seconds": round(time.perf_counter() - t0, 3)})
                done += 1
                if progress is not None:
                    progress(Progress(stage, done, total))
    return ProtocolReport(methods, labels, ok, seeds, runs, list(train.classnames), desc,
                          getattr(backbone, "id", ""), skipped)
