"""The class graph a method exposes (`KnowledgeGraph`) and its one "looks alike, named
differently" rule (`KnowledgeGraph.confusable_pairs`).

numpy and the standard library only (no torch): viz, the UI and the CLI can build, read and test
graphs without the methods. The methods build theirs with base.cosine_matrix (torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class KnowledgeGraph:
    """The class graph a method uses: nodes are classes, edges cosine similarities
    in the textual sub-graph, the visual sub-graph (where the method has one) and,
    for GraphAdapter, between the adapted class weights."""

    classes: list[str]
    text_edges: np.ndarray
    visual_edges: np.ndarray | None = None
    fused_edges: np.ndarray | None = None
    counts: list[int] | None = None

    def to_dict(self) -> dict:
        def lst(a):
            return None if a is None else np.round(np.asarray(a, dtype=np.float64), 6).tolist()
        return {"classes": list(self.classes), "text_edges": lst(self.text_edges),
                "visual_edges": lst(self.visual_edges), "fused_edges": lst(self.fused_edges),
                "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "KnowledgeGraph":
        arr = lambda a: None if a is None else np.asarray(a, dtype=np.float32)  # noqa: E731
        return cls(list(d["classes"]), arr(d["text_edges"]), arr(d.get("visual_edges")),
                   arr(d.get("fused_edges")), d.get("counts"))

    # "Looks alike, named differently": the one definition that the graph figure's highlighted
    # pairs, the Knowledge graph tab's table and info line and the CLI's `graph` command all use.
    CONFUSABLE_QUANTILE: ClassVar[float] = 0.75   # visual similarity in the top quarter of all pairs ...
    CONFUSABLE_MIN_VISUAL: ClassVar[float] = 0.2  # ... and at least this (clearly positive) ...
    CONFUSABLE_GAP: ClassVar[float] = 0.1         # ... and at least this much above the textual one
    CONFUSABLE_TOP: ClassVar[int] = 10
    _EPS: ClassVar[float] = 1e-6  # edges are float32: 0.2 stored as 0.19999999 still counts as 0.2

    def _upper(self, m) -> np.ndarray:
        """The pairs' values of an edge matrix (upper triangle, row-major: (0,1), (0,2), ...)."""
        return np.asarray(m, dtype=np.float64)[np.triu_indices(len(self.classes), k=1)]

    def confusable_level(self) -> float | None:
        """The visual similarity a pair needs to "look alike": the CONFUSABLE_QUANTILE quantile
        (linear interpolation, numpy's default) of the finite off-diagonal visual similarities,
        but never below CONFUSABLE_MIN_VISUAL. None without a visual graph or with < 2 classes."""
        if self.visual_edges is None or len(self.classes) < 2:
            return None
        v = self._upper(self.visual_edges)
        v = v[np.isfinite(v)]
        if not v.size:
            return None
        return max(float(np.quantile(v, self.CONFUSABLE_QUANTILE)), self.CONFUSABLE_MIN_VISUAL)

    def confusable_pairs(self, top: int = CONFUSABLE_TOP) -> list[dict]:
        """Pairs of classes that look alike but are named differently, largest gap first, at
        most `top`; each {"a", "b", "i", "j" (i < j), "visual", "text", "gap" = visual − text}.

        The rule: visual ≥ `confusable_level()` (in the top quarter of this graph's off-diagonal
        visual similarities, and ≥ 0.2) and visual − textual ≥ 0.1. Why: a gap alone also flags
        pairs that look unrelated but are named even more unrelated (visual −0.24 vs textual
        −0.43) or are barely related (0.065 vs 0.010), which is not "looks alike". The quantile
        makes "alike" relative to the other classes (real CLIP puts most pairs at 0.5–0.9); the
        0.2 floor keeps it clearly positive where a backbone spreads pairs around 0. Measured on
        the shapes example (tiny backbone, GraphAdapter): off-diagonal visual similarities have
        median 0.01, upper quartile 0.12, max 0.47; at or above 0.2 are blue square–red circle
        (visual 0.32, textual 0.10: listed) and purple hexagon–red circle (0.47 vs 0.49: named
        alike too, not listed). The 0.1 gap is a tenth of the cosine range; on that example the
        listed pair's gap is 0.12–0.23 across methods, the other top-quarter pairs' ≤ −0.02.
        Needs a visual sub-graph; none otherwise."""
        level = self.confusable_level()
        if level is None:
            return []
        iu = np.triu_indices(len(self.classes), k=1)
        v, t = self._upper(self.visual_edges), self._upper(self.text_edges)
        with np.errstate(invalid="ignore"):  # NaN edges compare False: never listed
            keep = np.isfinite(v) & np.isfinite(t) & (v >= level - self._EPS) & (v - t >= self.CONFUSABLE_GAP - self._EPS)
        ks = np.flatnonzero(keep)
        ks = ks[np.argsort(-(v[ks] - t[ks]), kind="stable")]  # stable: ties keep the class order
        pairs = [{"a": self.classes[iu[0][k]], "b": self.classes[iu[1][k]], "i": int(iu[0][k]), "j": int(iu[1][k]),
                  "visual": float(v[k]), "text": float(t[k]), "gap": float(v[k] - t[k])} for k in ks]
        return pairs[:max(int(top), 0)]
