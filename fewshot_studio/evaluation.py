"""Evaluation: few-shot splits, cross-validation on the user's examples, the standard
K-shot protocol, metrics, and the `eval` command (policy: docs/design.md, "Evaluation").

Two questions, two entry points:

* `cross_validate(support, methods, ...)` — "how well does each method do on *my* examples?"
  Every method is trained and tested on the SAME folds of the support set (see `cv_folds`);
  the predictions of all folds are pooled into one accuracy, per-class accuracy and confusion
  matrix per method. `Comparison.best` names the method to use.
* `run_protocol(train, test, shots, seeds, methods, ...)` — the papers' protocol: for each seed
  and shot count K, sample K images per class (`few_shot_split`), train, test on a held-out set
  (or on the images not sampled), and report mean ± std over the seeds.

Fold rule (`cv_folds`):

* Images of a class that has a single image are never held out: testing one would leave its
  class without a training image, which GraphAdapter and Tip-Adapter cannot train without. They
  stay in every training split and that class's per-class accuracy is None.
* The remaining ("testable") images, T of them: if T <= `loo_max` (20), leave-one-out: T folds,
  each trains on every other image. With a handful of shots, every image matters, and 20 fits
  per method stay cheap because features are cached.
* Otherwise stratified k-fold with k = `max_folds` (5): each class's images, shuffled by the
  seed, are dealt round-robin over the folds, continuing where the previous class stopped (so
  fold sizes differ by at most one). A class with fewer than k images therefore loses at most
  one image per fold, i.e. every training split keeps n_c - ceil(n_c / k) >= 1 images of every
  class. (k is not capped at the smallest class count: a 2-image class would otherwise force
  2-fold CV, which trains every class on half of its images.)
* Deterministic: the same labels and seed give the same folds; LOO does not depend on the seed.

Shot counts (`few_shot_split`, `usable_shots`): the K-shot training set of a class is the first K
images of a per-class permutation drawn from the seed, so for one seed the 1-shot set is inside
the 2-shot set and so on (less noise between shot counts). A shot count larger than some class's
image count cannot be sampled; with no separate test set, a class also needs one image left over
to test on. Such shot counts are skipped with a message (the `eval` command prints it); only when
no requested shot count fits is it an error.

Statistics: accuracies are fractions in [0, 1] in every data structure and JSON; the markdown
tables show percentages. The spread over seeds is the population standard deviation (ddof=0,
`np.std`, as in the CoOp/Dassl result parser), 0 for a single seed.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import ImageRef, SupportSet
from .errors import Cancelled, DataError, FewShotError
from .progress import CancelFlag, Progress, ProgressFn

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
LOO_MAX = 20


def __getattr__(name: str):
    """COST_ORDER (every registered method, cheapest first: ties in accuracy go to the earlier
    one) and DEFAULT_METHODS (the same), read from the method catalog when asked for."""
    if name in ("COST_ORDER", "DEFAULT_METHODS"):
        from .methods import catalog

        return tuple(catalog.by_cost(catalog.method_ids()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cost_rank(method: str) -> int:
    from .methods import catalog

    order = catalog.by_cost(catalog.method_ids())
    return order.index(method) if method in order else len(order)


def _labels_array(labels) -> np.ndarray:
    if hasattr(labels, "labels") and not isinstance(labels, np.ndarray):  # a SupportSet
        labels = labels.labels
    if hasattr(labels, "numpy"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _method_label(name: str) -> str:
    from .methods import catalog

    return catalog.label(name)


def _check_cancel(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Evaluation was cancelled.")


# ---- splits ---------------------------------------------------------------------------------------

def few_shot_split(support: SupportSet | Sequence[int], shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): K = `shots` images per class sampled by `seed`, the rest for testing.

    The sample is the first K of a per-class permutation that depends only on the seed, so the
    K-shot sets of one seed are nested. A class with exactly K images goes entirely to training
    (nothing of it left to test); a class with fewer than K raises DataError.
    """
    labels = _labels_array(support)
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
    labels = _labels_array(labels)
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


# ---- results ---------------------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """C×C counts, rows = true class, columns = predicted class."""
    t, p = _labels_array(y_true), _labels_array(y_pred)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class EvalResult:
    """One method's pooled predictions on a set of test images."""

    method: str
    accuracy: float
    per_class_accuracy: dict[str, float | None]
    confusion: np.ndarray  # C×C ints, rows true, columns predicted
    n: int
    seconds: float
    label: str = ""
    classnames: list[str] = field(default_factory=list)
    indices: np.ndarray | None = None  # which support images were tested (cross-validation)
    y_true: np.ndarray | None = None
    y_pred: np.ndarray | None = None

    @classmethod
    def from_predictions(cls, method: str, classnames: Sequence[str], y_true, y_pred, seconds: float,
                         indices=None, label: str = "") -> "EvalResult":
        t, p = _labels_array(y_true), _labels_array(y_pred)
        C = len(classnames)
        conf = confusion_matrix(t, p, C)
        rows = conf.sum(1)
        per_class = {c: (float(conf[i, i] / rows[i]) if rows[i] else None) for i, c in enumerate(classnames)}
        acc = float(np.trace(conf) / len(t)) if len(t) else 0.0
        return cls(method, acc, per_class, conf, int(len(t)), float(seconds), label or method, list(classnames),
                   None if indices is None else _labels_array(indices), t, p)

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    def misclassified(self) -> list[dict]:
        """The wrong predictions: support index (when known), true and predicted class."""
        if self.y_true is None or self.y_pred is None:
            return []
        out = []
        for k in np.flatnonzero(self.y_true != self.y_pred):
            out.append({"index": None if self.indices is None else int(self.indices[k]),
                        "true": self.classnames[self.y_true[k]], "predicted": self.classnames[self.y_pred[k]]})
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "label": self.label, "accuracy": round(self.accuracy, 6),
                "correct": self.correct, "n": self.n, "seconds": round(self.seconds, 3),
                "per_class_accuracy": {k: (None if v is None else round(v, 6)) for k, v in self.per_class_accuracy.items()},
                "classes": list(self.classnames), "confusion": self.confusion.astype(int).tolist(),
                "misclassified": self.misclassified()}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


@dataclass
class Comparison:
    """Several methods cross-validated on the same folds."""

    results: dict[str, EvalResult]
    folds: str  # e.g. "leave-one-out over 12 images (12 folds)"
    classnames: list[str]
    n_folds: int = 0
    seed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it was not evaluated

    @property
    def best(self) -> str | None:
        """The most accurate method; ties go to the cheaper one (zeroshot < tip < graph < tip-f < mma)."""
        if not self.results:
            return None
        return min(self.results.values(), key=lambda r: (-r.correct / max(1, r.n), _cost_rank(r.method))).method

    def ranking(self) -> list[str]:
        return sorted(self.results, key=lambda m: (-self.results[m].correct / max(1, self.results[m].n), _cost_rank(m)))

    def to_markdown(self, per_class: bool | None = None) -> str:
        """Caption line plus a table: one row per method, accuracy (%), per-class accuracy (%) when
        there are at most 8 classes (or `per_class=True`), seconds; the best method is marked."""
        if per_class is None:
            per_class = len(self.classnames) <= 8
        head = ["Method", "Accuracy (%)", "Correct"]
        if per_class:
            head += [_md_cell(c) for c in self.classnames]
        head.append("Time (s)")
        lines = [f"Cross-validation: {self.folds}.", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        best = self.best
        for m in self.ranking():
            r = self.results[m]
            name = _md_cell(r.label) + (" (best)" if m == best else "")
            row = [name, _pct(r.accuracy), f"{r.correct}/{r.n}"]
            if per_class:
                row += [_pct(r.per_class_accuracy.get(c)) for c in self.classnames]
            row.append(f"{r.seconds:.1f}")
            lines.append("| " + " | ".join(row) + " |")
        for m, why in self.skipped.items():
            lines.append(f"\n{m}: not evaluated ({why})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folds": self.folds, "n_folds": self.n_folds, "seed": self.seed, "classes": list(self.classnames),
                "best": self.best, "ranking": self.ranking(),
                "results": {m: r.to_dict() for m, r in self.results.items()}, "skipped": dict(self.skipped)}


# ---- training and predicting one method ----------------------------------------------------------

def _make(name: str, backbone, support: SupportSet, seed: int, overrides: dict[str, dict] | None):
    from .methods import catalog, make_method

    kw = catalog.coerce_settings(name, (overrides or {}).get(name))  # the one strict rule
    if "seed" in catalog.settings(name):
        kw.setdefault("seed", seed)
    return make_method(name, backbone, support.classnames, support.descriptions, **kw)


def _fit_predict(name, backbone, extractor, train: SupportSet, test_refs: Sequence[ImageRef], seed, overrides,
                 progress, cancel) -> np.ndarray:
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


def _check_methods(methods: Sequence[str]) -> list[str]:
    from .methods import catalog

    out = []
    for m in methods:
        catalog.get_method_class(m)  # DataError naming the choices
        if m not in out:
            out.append(m)
    if not out:
        raise DataError("Choose at least one method to evaluate.")
    return out


# ---- cross-validation ----------------------------------------------------------------------------

def cross_validate(support: SupportSet, methods: Sequence[str], backbone, extractor, seed: int = 0,
                   overrides: dict[str, dict] | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None, max_folds: int = 5, loo_max: int = LOO_MAX) -> Comparison:
    """Cross-validate every method on the same folds of `support` (see `cv_folds`), pooling the
    predictions of all folds. A method that cannot run on this support set (e.g. one that needs
    an image in every class while a class is empty, or MMA on a ResNet) is listed in
    `Comparison.skipped` with the reason; the others still run. Cancel raises errors.Cancelled."""
    methods = _check_methods(methods)
    labels = _labels_array(support.labels)
    folds = cv_folds(labels, seed=seed, max_folds=max_folds, loo_max=loo_max)
    if not folds:
        raise DataError("Cross-validation needs at least two images in some class; add more examples.")
    desc = describe_folds(folds, len(labels))
    skipped: dict[str, str] = {}
    empty = [c for c, k in zip(support.classnames, support.counts()) if k == 0]
    runnable = []
    for m in methods:
        from .methods import get_method_class

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
    for m in runnable:
        label = _method_label(m)
        y_true, y_pred, tested = [], [], []
        t0 = time.perf_counter()
        try:
            for f, (tr, te) in enumerate(folds):
                _check_cancel(cancel)
                stage = f"Evaluating {label}, fold {f + 1}/{len(folds)}"
                if progress is not None:
                    progress(Progress(stage, done, total))
                pred = _fit_predict(m, backbone, extractor, support.subset(tr), [support.images[i] for i in te],
                                    seed, overrides, _inner(progress, stage, done, total), cancel)
                y_true.append(labels[te])
                y_pred.append(pred)
                tested.append(te)
                done += 1
        except Cancelled:
            raise
        except FewShotError as e:
            skipped[m] = str(e)
            done += len(folds) - len(tested)
            continue
        results[m] = EvalResult.from_predictions(m, support.classnames, np.concatenate(y_true), np.concatenate(y_pred),
                                                 time.perf_counter() - t0, np.concatenate(tested), label)
    if progress is not None:
        progress(Progress("Evaluation done", total, total))
    if not results:
        raise DataError("No method could be evaluated: " + "; ".join(f"{m}: {w}" for m, w in skipped.items()))
    return Comparison(results, desc, list(support.classnames), len(folds), seed, skipped)


# ---- the K-shot protocol ----------------------------------------------------------------------------

@dataclass
class ProtocolReport:
    """Accuracy of each method at each shot count, over several seeds."""

    methods: list[str]
    labels: dict[str, str]
    shots: list[int]
    seeds: list[int]
    runs: list[dict]  # {method, shots, seed, accuracy, n_test, seconds}
    classnames: list[str]
    test: str  # how the test set was chosen
    backbone: str = ""
    skipped: list[str] = field(default_factory=list)

    def accuracies(self, method: str, shots: int) -> np.ndarray:
        return np.array([r["accuracy"] for r in self.runs if r["method"] == method and r["shots"] == shots], dtype=float)

    def mean(self, method: str, shots: int) -> float:
        a = self.accuracies(method, shots)
        return float(a.mean()) if len(a) else math.nan

    def std(self, method: str, shots: int) -> float:
        a = self.accuracies(method, shots)
        return float(a.std()) if len(a) else math.nan  # population std (ddof=0)

    def best(self, shots: int | None = None) -> str:
        """The method with the highest mean accuracy at `shots` (default: the largest); ties → cheaper."""
        k = max(self.shots) if shots is None else shots
        return min(self.methods, key=lambda m: (-self.mean(m, k), _cost_rank(m)))

    def to_markdown(self) -> str:
        """Rows = methods, columns = shot counts, cells "mean ± std" accuracy in %."""
        head = ["Method"] + [f"{k} shot{'s' if k != 1 else ''}" for k in self.shots]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.shots)) + "|"]
        for m in self.methods:
            cells = [f"{100 * self.mean(m, k):.1f} ± {100 * self.std(m, k):.1f}" for k in self.shots]
            lines.append("| " + " | ".join([_md_cell(self.labels.get(m, m))] + cells) + " |")
        return "\n".join(lines)

    def caption(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        bb = f" with {self.backbone}" if self.backbone else ""
        return f"Accuracy (%) mean ± std over seeds {seeds}; tested on {self.test}{bb}."

    def to_dict(self) -> dict:
        summary = {m: {str(k): {"mean": round(self.mean(m, k), 6), "std": round(self.std(m, k), 6),
                                "seeds": int(len(self.accuracies(m, k)))} for k in self.shots} for m in self.methods}
        return {"backbone": self.backbone, "classes": list(self.classnames), "test": self.test,
                "methods": list(self.methods), "labels": dict(self.labels), "shots": list(self.shots),
                "seeds": list(self.seeds), "summary": summary, "runs": list(self.runs), "skipped": list(self.skipped),
                "best": self.best() if self.shots else None}


def run_protocol(train: SupportSet, test: tuple[Sequence[ImageRef], Any] | None, shots: Sequence[int],
                 seeds: Sequence[int], methods: Sequence[str], backbone, extractor,
                 overrides: dict[str, dict] | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> ProtocolReport:
    """For each seed and shot count K: sample K images per class of `train` (`few_shot_split`), train
    every method on them (method seed = the protocol seed unless `overrides` sets one), and test on
    `test` = (refs, labels indexing train.classnames) or, when None, on the images not sampled.
    Shot counts some class cannot supply are skipped (`report.skipped`); none usable → DataError."""
    methods = _check_methods(methods)
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
        test_refs, test_labels = list(test[0]), _labels_array(test[1])
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
    all_labels = _labels_array(train.labels)
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


# ---- the `eval` command ------------------------------------------------------------------------------

def _int_list(text: str, what: str, minimum: int) -> list[int]:
    from .cli import UserError

    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise UserError(f"--{what} takes comma-separated whole numbers like 1,2,4; {part!r} is not one.") from None
        if v < minimum:
            raise UserError(f"--{what} values must be at least {minimum}; got {v}.")
        out.append(v)
    return out


class _Bars:
    """tqdm bars on stderr for the evaluation's Progress reports: one for feature extraction,
    one for the seeds × shots × methods runs (with the current training step as postfix)."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bars: dict[str, Any] = {}
        self._last = 0.0
        self._where = ""

    def _bar(self, key: str, total: int, desc: str):
        from tqdm import tqdm

        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, desc=desc, file=sys.stderr, disable=self.disable,
                                        leave=False, dynamic_ncols=True, unit="run" if key == "runs" else "img")
        return bar

    def __call__(self, p: Progress) -> None:
        if p.stage.startswith("Extracting"):
            bar = self._bar("features", p.total, "features")
            bar.update(max(0, p.step - bar.n))
            return
        if "features" in self.bars:
            self.bars.pop("features").close()
        bar = self._bar("runs", p.total, "evaluating")
        where, _, what = p.stage.partition(": ")  # "Seed 1, 2 shots" / "GraphAdapter: Training 5/300"
        now = time.monotonic()
        if p.step != bar.n or where != self._where:
            self._where = where
            bar.set_description_str(where, refresh=False)
            bar.set_postfix_str(what.partition(": ")[0], refresh=False)
            bar.update(p.step - bar.n)
        elif now - self._last > 0.5:
            self._last = now
            bar.set_postfix_str(what, refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _write_plot(fig, path: Path) -> list[Path]:
    """HTML always (the chart is interactive); PNG when kaleido is importable."""
    import importlib.util

    path.parent.mkdir(parents=True, exist_ok=True)
    has_kaleido = importlib.util.find_spec("kaleido") is not None
    written: list[Path] = []
    png = path if path.suffix.lower() == ".png" else path.with_suffix(".png")
    html = path.with_suffix(".html") if path.suffix.lower() == ".png" else path
    if path.suffix.lower() != ".png" or not has_kaleido:
        fig.write_html(str(html))
        written.append(html)
    if has_kaleido:
        try:
            fig.write_image(str(png))
            written.append(png)
        except Exception as e:  # kaleido present but unusable (e.g. no browser for kaleido 1.x)
            if not written:
                fig.write_html(str(html))
                written.append(html)
            print(f"note: could not write {png} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  f"the chart is in {html}.", file=sys.stderr)
    elif path.suffix.lower() == ".png":
        print(f"note: kaleido is not installed, so the chart went to {html} instead of a PNG "
              "(pip install kaleido for PNG).", file=sys.stderr)
    else:
        print("note: kaleido is not installed; wrote only the HTML chart (pip install kaleido for a PNG).",
              file=sys.stderr)
    return written


def cmd_eval(args) -> int:
    from .cli import UserError, _backbone, _extractor
    from .methods import catalog

    shots = _int_list(args.shots, "shots", 1)
    seeds = _int_list(args.seeds, "seeds", 0)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods:
        raise UserError("--methods needs at least one method.")
    for m in methods:
        if m not in catalog.REGISTRY:
            raise UserError(f"Unknown method {m!r} in --methods; choose from {','.join(catalog.method_ids())}.")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1; got {args.steps}.")

    train, errors = SupportSet.from_folder(args.data)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    test = None
    if args.test_data:
        tset, errors = SupportSet.from_folder(args.test_data)
        for e in errors:
            print(f"skipped {e}", file=sys.stderr)
        index = {c: i for i, c in enumerate(train.classnames)}
        extra = [c for c in tset.classnames if c not in index]
        if extra:
            raise UserError(f"The test folder has class {extra[0]!r}, which {args.data} does not have; "
                            "use the same class folder names in both.")
        test = (tset.images, [index[tset.classnames[y]] for y in tset.labels])
        if not tset.images:
            raise UserError(f"The test folder {args.test_data} has no readable images.")
    ok, skipped = usable_shots(train.counts(), train.classnames, sorted(set(shots)), holdout=test is None)
    for s in skipped:
        print(s, file=sys.stderr)
    if not ok:
        raise UserError(f"No requested shot count fits {args.data}: the smallest class has "
                        f"{min(train.counts())} images{'' if test is not None else ' and one must stay for testing'}.")

    overrides: dict[str, dict] = {}
    if args.steps is not None:
        for m in methods:
            if "steps" in catalog.settings(m):
                overrides[m] = {"steps": args.steps}
    backbone = _backbone(args)
    extractor = _extractor(backbone, args)
    bars = _Bars(disable=args.quiet)
    try:
        report = run_protocol(train, test, ok, seeds, methods, backbone, extractor, overrides, progress=bars)
    finally:
        bars.close()
    print(report.to_markdown())
    print()
    print(report.caption())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
        print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        from .viz import accuracy_plot

        for p in _write_plot(accuracy_plot(report), Path(args.plot)):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def add_eval_parser(sub) -> None:
    from .cli import _add_backbone_args, _add_store_args
    from .methods import catalog

    every = ",".join(catalog.by_cost(catalog.method_ids()))  # now: a method registered later is listed

    p = sub.add_parser(
        "eval", help="the standard K-shot protocol: mean ± std accuracy over seeds per method and shot count",
        description="Sample K images per class from DIR by seed, train each method, test on --test-data "
                    "(or on the images not sampled); print a markdown table of mean ± std accuracy.")
    p.add_argument("--data", required=True, help="ImageFolder tree to sample the K-shot training sets from")
    p.add_argument("--test-data", default=None,
                   help="ImageFolder tree to test on (default: the images of --data not sampled)")
    p.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)),
                   help="comma-separated shots per class (default 1,2,4,8,16); counts a class cannot supply are skipped")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--methods", default=every, help=f"comma-separated methods (default {every})")
    _add_backbone_args(p)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for the methods that have a steps setting (graph, mma), for quick runs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the runs and the summary as JSON")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="accuracy-vs-shots chart: HTML (plus a PNG beside it when kaleido is installed), "
                        "or a .png path (needs kaleido)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_store_args(p)
    p.set_defaults(func=cmd_eval)
