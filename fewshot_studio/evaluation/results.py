"""What an evaluation returns: pooled predictions per method (EvalResult), methods side by side
on the same folds (Comparison) and the K-shot protocol's accuracies over seeds (ProtocolReport).
Data and markdown only; the figures are drawn by `viz`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..markup import md
from .splits import labels_array


def cost_rank(method: str) -> int:
    from ..methods import catalog

    order = catalog.by_cost(catalog.method_ids())
    return order.index(method) if method in order else len(order)



def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """C×C counts, rows = true class, columns = predicted class."""
    t, p = labels_array(y_true), labels_array(y_pred)
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
        t, p = labels_array(y_true), labels_array(y_pred)
        C = len(classnames)
        conf = confusion_matrix(t, p, C)
        rows = conf.sum(1)
        per_class = {c: (float(conf[i, i] / rows[i]) if rows[i] else None) for i, c in enumerate(classnames)}
        acc = float(np.trace(conf) / len(t)) if len(t) else 0.0
        return cls(method, acc, per_class, conf, int(len(t)), float(seconds), label or method, list(classnames),
                   None if indices is None else labels_array(indices), t, p)

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
        return min(self.results.values(), key=lambda r: (-r.correct / max(1, r.n), cost_rank(r.method))).method

    def ranking(self) -> list[str]:
        return sorted(self.results, key=lambda m: (-self.results[m].correct / max(1, self.results[m].n), cost_rank(m)))

    def to_markdown(self, per_class: bool | None = None) -> str:
        """Caption line plus a table: one row per method, accuracy (%), per-class accuracy (%) when
        there are at most 8 classes (or `per_class=True`), seconds; the best method is marked."""
        if per_class is None:
            per_class = len(self.classnames) <= 8
        head = ["Method", "Accuracy (%)", "Correct"]
        if per_class:
            head += [md(c) for c in self.classnames]  # class names are user text: never markup
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
        return min(self.methods, key=lambda m: (-self.mean(m, k), cost_rank(m)))

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
