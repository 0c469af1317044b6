"""Evaluation runs: every method trained and tested on the same folds of the user's examples
(`cross_validate`); the papers' K-shot protocol over seeds is in `protocol`."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..data import ImageRef, SupportSet
from ..errors import Cancelled, DataError, FewShotError
from ..progress import CancelFlag, Progress, ProgressFn
from .results import Comparison, EvalResult
from .splits import LOO_MAX, cv_folds, describe_folds, labels_array

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
                 progress, cancel, method=None) -> np.ndarray:
    """Fit `name` on `train` (or use the fitted `method`) and predict `test_refs`' classes."""
    if method is None:
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
