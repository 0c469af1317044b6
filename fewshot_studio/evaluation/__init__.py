"""Evaluation: few-shot splits, cross-validation on the user's examples, the standard
K-shot protocol and metrics (policy: docs/design.md, "Evaluation"); the `eval` command is in
`cli/eval.py` and the figures in `viz`.

Two questions, two entry points:

* `cross_validate(support, methods, ...)` — "how well does each method do on *my* examples?"
  Every method is trained and tested on the SAME folds of the support set (see `cv_folds`);
  the predictions of all folds are pooled into one accuracy, per-class accuracy and confusion
  matrix per method. `Comparison.best` names the method to use.
* `run_protocol(train, test, shots, seeds, methods, ...)` — the papers' protocol: for each seed
  and shot count K, sample K images per class (`few_shot_split`), train, test on a held-out set
  (or on the images not sampled), and report mean ± std over the seeds.
* `choose_and_fit(support, ...)` — the `auto` method choice: cross-validate the cheap methods
  within a time budget and train the best on everything (evaluation/auto.py).

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

from .auto import AutoChoice, choose, choose_and_fit
from .results import Comparison, EvalResult, ProtocolReport, confusion_matrix
from .protocol import DEFAULT_SEEDS, DEFAULT_SHOTS, run_protocol
from .runs import cross_validate
from .splits import LOO_MAX, cv_folds, describe_folds, few_shot_split, usable_shots

__all__ = ["AutoChoice", "COST_ORDER", "DEFAULT_METHODS", "DEFAULT_SEEDS", "DEFAULT_SHOTS", "LOO_MAX", "Comparison", "EvalResult",
           "ProtocolReport", "choose", "choose_and_fit", "confusion_matrix", "cross_validate", "cv_folds", "describe_folds", "few_shot_split",
           "run_protocol", "usable_shots"]


def __getattr__(name: str):
    """COST_ORDER (every registered method, cheapest first: ties in accuracy go to the earlier
    one) and DEFAULT_METHODS (the same), read from the method catalog when asked for, so a
    method registered later is included."""
    if name in ("COST_ORDER", "DEFAULT_METHODS"):
        from ..methods import catalog

        return tuple(catalog.by_cost(catalog.method_ids()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
