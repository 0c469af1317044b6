"""The queue's acquisition functions order a synthetic pool exactly as their definitions say."""
import numpy as np
import pytest

from fewshot_studio import acquisition as acq

# Four images, three classes, chosen so the three uncertainty orders all differ:
#   image  p                  1 − p1   p1 − p2   entropy (nats)
#   0      .50 .49 .01        .50      .01       0.745
#   1      .40 .30 .30        .60      .10       1.089
#   2      .90 .05 .05        .10      .85       0.394
#   3      .45 .45 .10        .55      .00       0.948
P = np.array([[.50, .49, .01], [.40, .30, .30], [.90, .05, .05], [.45, .45, .10]])


def test_scores_follow_their_definitions():
    assert np.allclose(acq.least_confidence(P), [.50, .60, .10, .55])
    assert np.allclose(acq.margin(P), [.01, .10, .85, .00])
    h = -(P * np.log(P)).sum(1)
    assert np.allclose(acq.entropy(P), h)
    assert acq.entropy(np.array([[1.0, 0.0]]))[0] == 0.0  # 0 ln 0 = 0, no nan


def test_each_strategy_orders_the_pool_its_own_way():
    assert acq.order(P, "least-confident").tolist() == [1, 3, 0, 2]
    assert acq.order(P, "margin").tolist() == [3, 0, 1, 2]
    assert acq.order(P, "entropy").tolist() == [1, 3, 0, 2]  # H: 1.089 > .948 > .745 > .394
    # ties keep the input order
    tie = np.array([[.5, .5], [.6, .4], [.5, .5]])
    assert acq.order(tie, "least-confident").tolist() == [0, 2, 1]
    assert acq.order(tie, "margin").tolist() == [0, 2, 1]
    with pytest.raises(ValueError):
        acq.order(P, "random")


def test_diverse_spreads_the_batch_over_feature_space():
    """Uncertain images in two tight clusters (a holds the three least confident) and one
    confident image far away: least confidence spends the batch on cluster a; k-center greedy
    starts at the least confident and then takes the farthest candidate of the shortlist."""
    conf = np.array([.50, .51, .52, .53, .54, .55, .99])  # top-1 probabilities
    probs = np.stack([conf, 1 - conf], 1)
    a, b, far = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([-1.0, 0, 0])
    feats = np.stack([a, a + [0, .01, 0], a + [0, 0, .01], b, b + [.01, 0, 0], b + [0, 0, .02], far]) * 3.0
    assert acq.order(probs, "least-confident").tolist() == [0, 1, 2, 3, 4, 5, 6]
    # batch 1: shortlist of 4 (0..3); the one pick is the least confident; the rest by confidence
    assert acq.order(probs, "diverse", features=feats, batch=1).tolist() == [0, 1, 2, 3, 4, 5, 6]
    # batch 2: the shortlist of 8 holds every image; after 0 the farthest is the outlier 6 (opposite a)
    out = acq.order(probs, "diverse", features=feats, batch=2)
    assert out.tolist() == [0, 6, 1, 2, 3, 4, 5]
    # k-center itself: 0, then cluster b (3: ties go to the first), then the point farthest from both picks
    picks = acq.k_center_greedy(feats[:6], 3, first=0)
    assert picks.tolist() == [0, 3, 5]  # 5 is .02 from b's centre, 1 and 2 only .01 from a's
    # labeled features at cluster a push the first pick into cluster b
    assert acq.k_center_greedy(feats[:6], 1, labeled=[a])[0] in (3, 4, 5)
    # no pick twice, even when every point coincides
    assert sorted(acq.k_center_greedy(np.ones((4, 3)), 4).tolist()) == [0, 1, 2, 3]


def test_diverse_within_the_shortlist_skips_certain_outliers():
    """Batch 2 (shortlist 8) over 12 images: the 4 confident images (a far cluster) stay out of
    the batch, which covers both uncertain clusters; least confidence would take two of cluster 0."""
    conf = np.r_[np.linspace(.50, .57, 8), np.full(4, .99)]
    probs = np.stack([conf, 1 - conf], 1)
    rng = np.random.default_rng(0)
    centers = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    cluster = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    feats = centers[cluster] + rng.normal(0, .01, (12, 3))
    assert cluster[acq.order(probs, "least-confident")[:2]].tolist() == [0, 0]
    out = acq.order(probs, "diverse", features=feats, batch=2)
    assert out[0] == 0 and cluster[out[1]] == 1
    assert out[2:].tolist() == [i for i in range(12) if i not in out[:2]]  # the rest by confidence
    with pytest.raises(ValueError):
        acq.order(probs, "diverse")  # no features
