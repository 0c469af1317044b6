"""Which pool images to label next (active learning's acquisition functions), numpy only.

Every function takes the stored class probabilities of N pool images, `probs` (N × C, rows
summing to 1), and returns either a score per image or an order (indices, most informative
first). All are vectorised over the images; `diverse` makes one distance update per pick.

Definitions (Settles, "Active Learning Literature Survey", 2009, §3.1; Sener & Savarese,
"Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018):

- least confidence:  u(x) = 1 − p₁(x), where p₁ is the top class probability; highest first.
- margin:            m(x) = p₁(x) − p₂(x), the gap between the two most probable classes;
                     smallest first (the model can hardly tell its two best guesses apart).
- entropy:           H(x) = −Σ_c p_c(x) ln p_c(x) (nats, 0·ln 0 = 0); highest first.
- diverse:           k-center greedy (core-set) over L2-normalised features among the most
                     uncertain candidates: start from the least confident candidate, then
                     repeatedly pick the candidate farthest (Euclidean) from every image picked
                     so far (and from the `labeled` features, when given), so a batch does not
                     spend labels on near-duplicates of one confusing image.
"""
from __future__ import annotations

import numpy as np

#: The queue orders, in the order the station's dropdown offers them.
STRATEGIES = ("least-confident", "margin", "entropy", "diverse")

#: `diverse` chooses among the CANDIDATE_FACTOR × batch least confident images: k-center greedy
#: alone favours outliers anywhere in feature space (Sener & Savarese's own caveat), uncertainty
#: alone returns near-duplicates; restricting the diverse pick to an uncertain shortlist (as in
#: Ash et al.'s BADGE discussion of hybrid acquisition) keeps both. 4× leaves three quarters of
#: the shortlist out of each batch, so the pick still has room to spread.
CANDIDATE_FACTOR = 4


def _probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be an N × C array, not shape {p.shape}")
    return p


def least_confidence(probs) -> np.ndarray:
    """u = 1 − p₁ per image (higher: less sure)."""
    p = _probs(probs)
    if p.shape[1] == 0:
        return np.ones(len(p))
    return 1.0 - p.max(axis=1)


def margin(probs) -> np.ndarray:
    """m = p₁ − p₂ per image (smaller: less sure); a one-class model's margin is p₁."""
    p = _probs(probs)
    if p.shape[1] < 2:
        return p[:, 0].copy() if p.shape[1] else np.zeros(len(p))
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def entropy(probs) -> np.ndarray:
    """H = −Σ p ln p per image, in nats (higher: less sure); 0·ln 0 counts as 0."""
    p = _probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=1)


def _stable_order(key: np.ndarray) -> np.ndarray:
    """Indices by ascending key; ties keep the input order (mergesort is stable)."""
    return np.argsort(key, kind="stable")


def k_center_greedy(features, k: int, first: int = 0, labeled=None) -> np.ndarray:
    """Sener & Savarese's greedy k-center: pick `first` (unless `labeled` features are given,
    then the candidate farthest from them), then repeatedly the point whose distance to its
    nearest picked (or labeled) point is largest. Features are L2-normalised first (cosine
    geometry, as CLIP features are compared). One N-vector distance update per pick: O(N·k·D)."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if labeled is not None and len(labeled):
        lab = np.asarray(labeled, dtype=np.float64)
        lab = lab / np.maximum(np.linalg.norm(lab, axis=1, keepdims=True), 1e-12)
        # squared distances of unit vectors: 2 − 2 cos
        nearest = np.maximum(2.0 - 2.0 * (x @ lab.T), 0.0).min(axis=1)
        first = int(np.argmax(nearest))
    else:
        nearest = np.full(n, np.inf)
    picks = np.empty(k, dtype=np.int64)
    for t in range(k):  # k picks, each one vectorised update over the N candidates
        i = int(first) if t == 0 else int(np.argmax(nearest))
        picks[t] = i
        nearest = np.minimum(nearest, np.maximum(2.0 - 2.0 * (x @ x[i]), 0.0))
        nearest[picks[:t + 1]] = -np.inf  # never picked twice
    return picks


def order(probs, strategy: str = STRATEGIES[0], *, features=None, batch: int = 48, labeled=None) -> np.ndarray:
    """The pool indices, most informative first, by `strategy` (one of STRATEGIES). Ties keep
    the input order. "diverse" needs `features` (N × D, the same rows as `probs`): its first
    `batch` images are the k-center greedy pick among the CANDIDATE_FACTOR × batch least
    confident (the first pick: the least confident; `labeled`: features of labeled images to
    stay away from), the rest follow by least confidence."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    p = _probs(probs)
    if strategy == "margin":
        return _stable_order(margin(p))
    if strategy == "entropy":
        return _stable_order(-entropy(p))
    by_confidence = _stable_order(-least_confidence(p))
    if strategy == "least-confident":
        return by_confidence
    if features is None:
        raise ValueError("the diverse order needs the images' features")
    f = np.asarray(features)
    if len(f) != len(p):
        raise ValueError(f"{len(f)} feature rows for {len(p)} probability rows")
    batch = max(1, int(batch))
    shortlist = by_confidence[:CANDIDATE_FACTOR * batch]
    picked = shortlist[k_center_greedy(f[shortlist], batch, first=0, labeled=labeled)]
    rest = np.ones(len(p), dtype=bool)
    rest[picked] = False
    return np.concatenate([picked, by_confidence[rest[by_confidence]]])
