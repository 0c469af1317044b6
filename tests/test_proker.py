"""ProKeR (Bendou et al., CVPR 2025): the closed form against a plain transcription, the exact
leave-one-image-out search against brute force, accuracy against zero-shot and Tip-Adapter, and
the method invariants (save/load, determinism, frozen backbone, cancel, knowledge graph)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import NATO, CancelAfter, accuracy, make_task, same_state, seeded_accuracies, state_of
from fewshot_studio.errors import Cancelled
from fewshot_studio.methods import load_model, make_method
from fewshot_studio.methods.proker import IMAGENET_HPS, table_hps
from fewshot_studio.methods.proker import ProKeRConfig

VIEWS = ProKeRConfig().augment_views  # the default: what a default fit reads

SEEDS = (1, 2, 3)
INFORMATIVE = {v: v for v in NATO.values()}  # class names that say what the images show


def plain_proker(S, labels, text, X, beta, lmbda):
    """The closed form written out plainly, one kernel entry and one prediction at a time:
    A = (K/λ + I)⁻¹ (Y − S tᵀ), f(x) = x tᵀ + Σᵢ k(x, sᵢ) Aᵢ, k(x, s) = exp(−β(1 − x·s))."""
    n, C = len(S), text.shape[0]
    K = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            K[i, j] = np.exp(-beta * (1 - float(S[i] @ S[j])))
    Y = torch.zeros(n, C, dtype=torch.float64)
    for i in range(n):
        Y[i, int(labels[i])] = 1.0
    A = torch.linalg.solve(K / lmbda + torch.eye(n, dtype=torch.float64), Y - S.double() @ text.double().T)
    out = torch.empty(len(X), C, dtype=torch.float64)
    for q in range(len(X)):
        f = X[q].double() @ text.double().T
        for i in range(n):
            f = f + np.exp(-beta * (1 - float(X[q] @ S[i]))) * A[i]
        out[q] = f
    return out


@pytest.fixture(scope="module")
def support_views(nato_task, shared_extractor):
    support, _, _ = nato_task
    return shared_extractor.image_features(support.images, views=range(1 + VIEWS))


@pytest.fixture(scope="module")
def test_features(nato_task, shared_extractor):
    _, test_refs, _ = nato_task
    return shared_extractor.image_features(test_refs, views=(0,))[:, 0]


@pytest.fixture(scope="module")
def trained(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    before = tiny.parameter_fingerprint()
    m = make_method("proker", tiny, support.classnames).fit(support, shared_extractor)
    m.fingerprint_before = before
    return m


# ---- the closed form ------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,lmbda", [(1.5, 0.05), (3.0, 1.0)])
def test_equals_a_plain_transcription_of_the_closed_form(tiny, nato_task, shared_extractor, support_views,
                                                         test_features, beta, lmbda):
    support, _, _ = nato_task
    m = make_method("proker", tiny, support.classnames, beta=beta, lmbda=lmbda, search=False)
    m.fit(support, shared_extractor)
    n, v, d = support_views.shape
    S = support_views.reshape(n * v, d)
    ref = plain_proker(S, support.labels_tensor().repeat_interleave(v), m.text_weights, test_features[::7], beta, lmbda)
    with torch.no_grad():
        assert torch.allclose(m.raw_logits(test_features[::7]).double(), ref, atol=1e-4)
        x = test_features[::7]
        assert torch.allclose(m.logits_from_features(x), tiny.logit_scale * m.raw_logits(x))
    assert (float(m.beta), float(m.lmbda)) == pytest.approx((beta, lmbda))


def test_defaults_come_from_the_imagenet_table_by_shots(tiny, nato_task, shared_extractor, support_views):
    assert [table_hps(k) for k in (1, 2, 3, 4, 7, 8, 16, 40)] == [
        IMAGENET_HPS[1], IMAGENET_HPS[2], IMAGENET_HPS[2], IMAGENET_HPS[4], IMAGENET_HPS[4], IMAGENET_HPS[8],
        IMAGENET_HPS[16], IMAGENET_HPS[16]]
    support, _, _ = nato_task
    m = make_method("proker", tiny, support.classnames, search=False).fit(support, shared_extractor)
    assert (float(m.beta), float(m.lmbda)) == pytest.approx(IMAGENET_HPS[4])  # 4 shots per class


def test_leave_one_image_out_equals_refitting_without_the_image(trained, nato_task, support_views):
    """The closed-form search scores equal a re-fit of the plain closed form on the other images
    (all of the held-out image's views removed), queried with its plain view."""
    support, _, _ = nato_task
    m = trained
    labels = support.labels_tensor()
    n, v, d = support_views.shape
    held = torch.arange(n)
    beta, lmbdas = 2.0, [0.05, 1.0]
    acc, ce = m.loo_scores(support_views, labels, held, [beta], lmbdas)
    for j, lmbda in enumerate(lmbdas):
        preds = []
        for g in range(0, n):
            keep = torch.arange(n) != g
            S = support_views[keep].reshape(-1, d).double()
            y = F.one_hot(labels[keep].repeat_interleave(v), 5).double()
            A = torch.linalg.solve((-beta * (1 - S @ S.T)).exp() / lmbda + torch.eye(len(S), dtype=torch.float64),
                                   y - S @ m.text_weights.double().T)
            x = support_views[g, 0].double()
            preds.append(x @ m.text_weights.double().T + (-beta * (1 - S @ x)).exp() @ A)
        preds = torch.stack(preds)
        assert float(acc[0, j]) == pytest.approx(float((preds.argmax(1) == labels).double().mean()))
        assert float(ce[0, j]) == pytest.approx(float(F.cross_entropy(m.logit_scale * preds, labels)), rel=1e-4)


def test_search_replaces_the_table_only_when_strictly_more_accurate(trained):
    r = trained.metrics
    assert r["default_loo_accuracy"] < r["loo_accuracy"] and r["searched"]  # names useless: λ must grow
    assert r["lmbda"] > IMAGENET_HPS[4][1]
    assert (float(trained.beta), float(trained.lmbda)) == pytest.approx((r["beta"], r["lmbda"]))


# ---- accuracy ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded_tasks(tiny, shared_extractor):
    """Held-out accuracy of zero-shot, Tip-Adapter and ProKeR on three uninformative-names tasks."""
    return seeded_accuracies(tiny, shared_extractor, ("zeroshot", "tip", "proker"), SEEDS)


def test_beats_zero_shot_and_matches_tip_adapter_on_uninformative_names(seeded_tasks):
    print("\nheld-out accuracy per seed:", seeded_tasks)
    for accs in seeded_tasks:
        assert accs["proker"] >= accs["zeroshot"] + 0.3
        assert accs["proker"] >= accs["tip"]


@pytest.mark.parametrize("seed", SEEDS)
def test_one_shot_with_informative_names_does_not_fall_below_zero_shot(tiny, shared_extractor, seed):
    support, test, labels = make_task(INFORMATIVE, shots=1, test_per_class=10, seed=200 + seed)
    zs = accuracy(make_method("zeroshot", tiny, support.classnames).fit(support, shared_extractor), test, labels,
                  shared_extractor)
    m = make_method("proker", tiny, support.classnames).fit(support, shared_extractor)
    assert m.metrics["searched"] is False  # one shot: nothing to hold out, the table's values stay
    assert (float(m.beta), float(m.lmbda)) == pytest.approx(IMAGENET_HPS[1])
    assert accuracy(m, test, labels, shared_extractor) >= zs


# ---- invariants -----------------------------------------------------------------------------------

def test_frozen_backbone_bit_identical(trained, tiny):
    assert tiny.parameter_fingerprint() == trained.fingerprint_before
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert not list(trained.parameters())  # training-free: buffers only


def test_save_load_reproduces_predictions(trained, tiny, nato_task, shared_extractor, tmp_path):
    _, test_refs, _ = nato_task
    trained.save(tmp_path / "proker")
    loaded = load_model(tmp_path / "proker", backbone=tiny)  # a fresh model has no rows: resized on load
    assert type(loaded) is type(trained) and loaded.config == trained.config
    assert loaded.support_keys.shape == trained.support_keys.shape == (20 * (1 + VIEWS), tiny.embed_dim)
    assert float(loaded.beta) == float(trained.beta) and float(loaded.lmbda) == float(trained.lmbda)
    assert torch.equal(loaded.predict_proba(test_refs, shared_extractor),
                       trained.predict_proba(test_refs, shared_extractor))


def test_deterministic(trained, tiny, nato_task, shared_extractor, test_features):
    support, _, _ = nato_task
    again = make_method("proker", tiny, support.classnames).fit(support, shared_extractor)
    with torch.no_grad():
        assert torch.equal(again.logits_from_features(test_features), trained.logits_from_features(test_features))
    assert again.metrics == trained.metrics


def test_progress_and_cancel_keep_previous_state(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    m = make_method("proker", tiny, support.classnames)
    fresh = state_of(m)
    flag = CancelAfter("Searching", 1)
    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), fresh) and m.support_keys.shape[0] == 0
    assert [p.step for p in flag.seen if p.stage.startswith("Searching")] == [1]
    m.fit(support.subset(range(0, 20, 2)), shared_extractor)
    before, metrics = state_of(m), dict(m.metrics)
    flag = CancelAfter("Searching", 2)
    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), before) and m.metrics == metrics


def test_knowledge_graph_has_text_and_prototype_edges(trained, support_views, nato_task):
    support, _, _ = nato_task
    kg = trained.knowledge_graph()
    C = trained.num_classes
    assert kg.classes == trained.classnames and kg.counts == [4] * C
    for edges in (kg.text_edges, kg.visual_edges):
        assert edges.shape == (C, C) and np.allclose(edges, edges.T, atol=1e-6)
        assert np.allclose(np.diag(edges), 1.0, atol=1e-5)
    labels = support.labels_tensor()
    protos = F.normalize(torch.stack([support_views[labels == c, 0].mean(0) for c in range(C)]), dim=-1)
    assert np.allclose(kg.visual_edges, (protos @ protos.T).numpy(), atol=1e-5)
