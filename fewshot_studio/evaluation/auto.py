"""Auto: pick the method by cross-validating the candidates on the user's own examples, then
train the winner on all of them (the `auto` method choice of the CLI, the app and `eval`).

    model = choose_and_fit(support, backbone, extractor, budget_s=60, seed=0)
    model.metrics["auto"]   # {"winner": "gda", "cv_accuracy": {"gda": 0.95, ...}, "skipped": {...}, ...}

The rule:

1. Candidates (`catalog.auto_candidates`): zero-shot CLIP, GDA, Tip-Adapter, ProKeR and
   GraphAdapter, cheapest first (`catalog.by_cost`); MMA too when the backbone is on a GPU or
   `with_mma` (on a CPU its 300 steps take about 0.9 s each, i.e. minutes per fold).
2. Every view any candidate reads is encoded first (the winner needs them anyway), so the time
   budget measures fits, not the one-off feature extraction.
3. `cross_validate` runs every candidate on the same folds (leave-one-out up to `AUTO_LOO_MAX`
   = 10 testable images, else stratified 5-fold; seeded) within `budget_s` seconds: a candidate is not started
   once the budget is spent, and one whose folds would overrun it is stopped; both are recorded
   as skipped with the reason. The cheapest candidate always finishes.
4. The winner is `Comparison.best`: the highest pooled accuracy, ties to the cheaper method (on
   equal evidence the simpler model, e.g. zero-shot CLIP when the names alone already get
   every held-out image right).
5. When no class has two images there is nothing to hold out, but one thing can still be
   measured without leakage: zero-shot CLIP never sees the examples, so its accuracy on them
   says whether the class names carry the answer. Above `NAMES_INFORMATIVE` (halfway from chance
   to every example right) Auto trains ProKeR, whose proximal term keeps it at zero-shot CLIP
   where one image says little (tests/test_proker.py); at or below it the names say little and
   Auto trains GDA, which follows the images. Measured on the tiny backbone, 1 shot, 5 classes,
   5 seeds, 20 held-out images per class: uninformative names, zero-shot 20%, ProKeR 20.4%,
   Tip-Adapter 20.4%, GDA 100%, GraphAdapter 99.4%; informative names, every method 100%.
   (ProKeR's 1-shot table values weight the cache so lightly that it stays at zero-shot, by
   design.) With a class that has no image: zero-shot CLIP (the only method that needs none).

The model returned is the winner's ordinary model (it saves and loads like any other); what Auto
measured is in `model.metrics["auto"]` (so in the saved config.json and the app's model line).

Deterministic for a seed: the folds, every candidate's seed and the final fit's seed are that
seed, so the same examples give the same scores and the same winner. Only the time budget
depends on the machine's speed; the candidates it dropped are named in "skipped" (give
`budget_s=None` for no budget, as `eval` does, whose numbers must not depend on the machine).

Nesting: Auto's cross-validation uses only the examples it is given. In `eval` (the K-shot
protocol) that is the K-shot training set, so the held-out test images never influence the
choice and "auto" is scored like any method. The app's Evaluate tab does not offer it: there the
candidates are already compared on the same folds, and Auto would pick that table's best; scoring
Auto itself there would need a cross-validation inside every fold (folds × candidates × folds fits).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..data import SupportSet
from ..errors import DataError
from ..progress import CancelFlag, Progress, ProgressFn
from .runs import _make, cross_validate
from .splits import cv_folds, labels_array

#: Trained when nothing can be held out but every class has an image (the module docstring, 5):
#: ProKeR when zero-shot CLIP gets the examples right (informative names), else GDA.
ONE_SHOT_CHOICES = ("proker", "gda")


def names_informative(accuracy: float, num_classes: int) -> bool:
    """Whether zero-shot CLIP's accuracy on the examples is above halfway from chance (1/C) to
    every example right: the names then carry the answer (5 classes: above 60%; 2: above 75%)."""
    return accuracy > (1.0 + 1.0 / max(1, num_classes)) / 2
#: Leave-one-out up to this many testable images, stratified 5-fold above (the Evaluate tab's
#: rule, `cv_folds`, with 10 instead of 20). Measured on the busy 2-core CPU at ViT-B-32 size
#: (d = 512, 1 thread, 5 classes): at 4 shots, leave-one-out's 20 folds cost GraphAdapter 59 s
#: and all five candidates 78 s, past the 60 s budget; 5 folds cost a quarter (at 16 shots all
#: five took 25 s), and each fold still trains on 80% of every class.
AUTO_LOO_MAX = 10


@dataclass
class AutoChoice:
    """What Auto measured and chose (stored as `metrics["auto"]` of the winner's model)."""

    winner: str
    cv_accuracy: dict[str, float]  # candidate -> pooled cross-validated accuracy, best first
    correct: dict[str, str]  # candidate -> "correct/tested"
    folds: str  # the scheme, in words ("leave-one-out over 20 images (20 folds)")
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not scored
    candidates: list[str] = field(default_factory=list)
    budget_s: float | None = None
    seed: int = 0
    with_mma: bool = False
    cv_seconds: float = 0.0
    why: str = ""  # one sentence: why the winner

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "why": self.why, "cv_accuracy": dict(self.cv_accuracy),
                "correct": dict(self.correct), "folds": self.folds, "skipped": dict(self.skipped),
                "candidates": list(self.candidates), "budget_s": self.budget_s, "seed": self.seed,
                "with_mma": self.with_mma, "cv_seconds": round(self.cv_seconds, 3)}


def _prefixed(progress: ProgressFn | None, prefix: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda p: progress(Progress(f"{prefix}{p.stage}", p.step, p.total, p.loss, p.accuracy))


def _views_needed(candidates: list[str], overrides: dict[str, dict]) -> int:
    """Cached views per image the candidates read (1 + the largest `augment_views`)."""
    from ..methods import catalog

    n = 1
    for m in candidates:
        aug = getattr(catalog.make_config(m, **(overrides.get(m) or {})), "augment_views", None)
        if aug is not None:
            n = max(n, 1 + max(1, int(aug)))
    return n


def choose(support: SupportSet, backbone, extractor, budget_s: float | None = None, with_mma: bool = False,
           seed: int = 0, overrides: dict[str, dict] | None = None, progress: ProgressFn | None = None,
           cancel: CancelFlag | None = None) -> AutoChoice:
    """Cross-validate the candidates on `support` and name the winner (the rule: module docstring).
    `overrides` are per-candidate settings ({"graph": {"steps": 50}}), as for `cross_validate`."""
    from ..methods import catalog

    overrides = dict(overrides or {})
    gpu = getattr(getattr(backbone, "device", None), "type", "cpu") == "cuda"
    candidates = catalog.auto_candidates(gpu=gpu, with_mma=with_mma)
    if not candidates:
        raise DataError("Auto has no method to choose from; register a method with auto_candidate set.")
    base = dict(candidates=candidates, budget_s=budget_s, seed=int(seed), with_mma=bool(with_mma))
    if support.images:
        extractor.image_features(support.images, views=range(_views_needed(candidates, overrides)),
                                 progress=_prefixed(progress, "Auto: "), cancel=cancel)
    if not cv_folds(labels_array(support.labels), seed=seed):
        return _without_folds(support, backbone, extractor, candidates, seed, overrides, base)
    t0 = time.perf_counter()
    comp = cross_validate(support, candidates, backbone, extractor, seed=seed, overrides=overrides,
                          progress=_prefixed(progress, "Auto: "), cancel=cancel, budget_s=budget_s,
                          loo_max=AUTO_LOO_MAX)
    seconds = time.perf_counter() - t0
    ranking = comp.ranking()
    winner = comp.best
    r = comp.results[winner]
    tied = [m for m in ranking if comp.results[m].correct * r.n == r.correct * comp.results[m].n]
    why = (f"the best cross-validated accuracy ({r.correct}/{r.n})"
           + (f", tied with {', '.join(catalog.label(m) for m in tied if m != winner)} and cheaper"
              if len(tied) > 1 else ""))
    return AutoChoice(winner, {m: round(comp.results[m].accuracy, 6) for m in ranking},
                      {m: f"{comp.results[m].correct}/{comp.results[m].n}" for m in ranking}, comp.folds,
                      dict(comp.skipped), cv_seconds=seconds, why=why, **base)


def _without_folds(support: SupportSet, backbone, extractor, candidates: list[str], seed: int,
                   overrides: dict[str, dict], base: dict) -> AutoChoice:
    """The choice when no class has two images (the module docstring, 5)."""
    from ..methods import catalog

    if min(support.counts(), default=0) == 0 or "zeroshot" not in candidates:
        winner = "zeroshot" if "zeroshot" in candidates else candidates[0]
        why = (f"no class has two images, so nothing could be held out to compare methods; "
               f"{catalog.label(winner)} is the method that needs no images")
        return AutoChoice(winner, {}, {}, "no folds", why=why, **base)
    zs = _make("zeroshot", backbone, support, seed, overrides).fit(support, extractor)
    labels = labels_array(support.labels)
    right = int((zs.predict_proba(list(support.images), extractor).argmax(1).cpu().numpy() == labels).sum())
    informative = names_informative(right / len(labels), support.num_classes)
    winner = ONE_SHOT_CHOICES[0] if informative else ONE_SHOT_CHOICES[1]
    if winner not in candidates:
        winner = "zeroshot"
    why = (f"no class has two images, so nothing could be held out to compare methods; zero-shot CLIP "
           f"named {right} of the {len(labels)} examples right, so the names "
           + (f"carry the answer and {catalog.label(winner)} stays close to zero-shot CLIP" if informative
              else f"say little and {catalog.label(winner)} follows the images"))
    # not a cross-validated score (zero-shot is the only method scored, and on the examples): `why` only
    return AutoChoice(winner, {}, {}, "no folds", why=why, **base)


def choose_and_fit(support: SupportSet, backbone, extractor, budget_s: float | None = None,
                   with_mma: bool = False, seed: int = 0, overrides: dict[str, dict] | None = None,
                   progress: ProgressFn | None = None, cancel: CancelFlag | None = None):
    """`choose`, then fit the winner on all of `support` (seeded like the folds); the fitted
    method, with what Auto measured in `metrics["auto"]`. Cancel raises errors.Cancelled."""
    from ..methods import catalog

    choice = choose(support, backbone, extractor, budget_s, with_mma, seed, overrides, progress, cancel)
    method = _make(choice.winner, backbone, support, seed, overrides)
    method.to(backbone.device)
    method.fit(support, extractor, progress=_prefixed(progress, f"Auto chose {catalog.label(choice.winner)}: "),
               cancel=cancel)
    method.metrics["auto"] = choice.to_dict()
    return method
