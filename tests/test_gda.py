"""GDA (Wang et al., ICLR 2024): the official `run` transcribed, the cross-validated α, accuracy
against zero-shot and Tip-Adapter, and the method invariants (save/load, determinism, frozen
backbone, cancel, knowledge graph)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import CancelAfter, same_state, seeded_accuracies, state_of
from fewshot_studio.errors import Cancelled
from fewshot_studio.methods import load_model, make_method
from fewshot_studio.methods.gda import cv_folds

# the official code's augment_epoch: the transcription tests fit with it (the default is 2, where
# fewer samples than dimensions make float32 round-off differ between Cholesky and pinv beyond 1e-5)
VIEWS = 10

SEEDS = (1, 2, 3)


def official_run(vecs, labels, clip_weights, features, alpha, logit_scale=100.0):
    """`main_few_shots.run` of github.com/mrflogs/ICLR24, line by line (loops over classes as
    there; `.cuda()` dropped; α fixed instead of picked on a validation split; clip_weights d×C)."""
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(clip_weights.shape[1])])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(clip_weights.shape[1])])
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv((center_vecs.shape[0] - 1) * center_vecs.T.cov()
                                                       + center_vecs.T.cov().trace() * torch.eye(center_vecs.shape[1]))
    ps = torch.ones(clip_weights.shape[1]) * 1. / clip_weights.shape[1]
    W = torch.einsum('nd, dc -> cn', mus, cov_inv)
    b = ps.log() - torch.einsum('nd, dc, nc -> n', mus, cov_inv, mus) / 2
    return logit_scale * features.float() @ clip_weights.float() + alpha * (features.float() @ W + b)


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
    m = make_method("gda", tiny, support.classnames, augment_views=VIEWS)
    t0 = time.perf_counter()
    m.fit(support, shared_extractor)
    m.fit_seconds = time.perf_counter() - t0
    m.fingerprint_before = before
    return m


# ---- the official estimate ---------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_equals_the_official_run_with_alpha_fixed(tiny, nato_task, shared_extractor, support_views, test_features,
                                                  alpha):
    support, _, _ = nato_task
    m = make_method("gda", tiny, support.classnames, alpha=alpha, search=False, augment_views=VIEWS).fit(support, shared_extractor)
    n, v, d = support_views.shape
    vecs = support_views.reshape(n * v, d)  # the plain and the default augmented views, each a sample
    labels = support.labels_tensor().repeat_interleave(v)
    ref = official_run(vecs, labels, m.text_weights.T, test_features, alpha, logit_scale=tiny.logit_scale)
    with torch.no_grad():
        ours = m.logits_from_features(test_features)
    assert float(m.alpha) == pytest.approx(alpha) and m.metrics["searched"] is False
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()


def test_cross_validation_folds_hold_out_whole_images_per_class():
    labels = torch.tensor([0] * 4 + [1] * 7 + [2])
    fold = cv_folds(labels, 3, 5, torch.Generator().manual_seed(0))
    assert fold[-1] == -1  # a single image is never held out: its class would have no mean
    assert sorted(fold[:4].tolist()) == [0, 1, 2, 3]  # 4 images, K = min(5, 7) = 5 folds: one each
    assert sorted(fold[4:11].tolist()) == [0, 0, 1, 1, 2, 3, 4]
    again = cv_folds(labels, 3, 5, torch.Generator().manual_seed(0))
    assert torch.equal(fold, again)


def test_alpha_is_the_best_of_the_official_grid_by_cross_validation(trained, tiny, nato_task,
                                                                           shared_extractor, support_views):
    """The search's scores equal a plain re-fit per fold (official estimate on the kept images),
    and α is the α with the best score (the official rule), ties to the lowest cross-entropy."""
    support, _, _ = nato_task
    m = trained
    r = m.metrics
    assert r["searched"] and r["folds"] == 4
    labels = support.labels_tensor()
    fold = cv_folds(labels, m.num_classes, m.config.folds, torch.Generator().manual_seed(m.config.seed))
    n, v, d = support_views.shape
    correct, nll = {a: 0 for a in m.config.alphas}, {a: 0.0 for a in m.config.alphas}
    for k in range(r["folds"]):
        keep, held = fold != k, fold == k
        vecs = support_views[keep].reshape(-1, d)
        for a in m.config.alphas:
            logits = official_run(vecs, labels[keep].repeat_interleave(v), m.text_weights.T,
                                  support_views[held, 0], a, logit_scale=tiny.logit_scale)
            correct[a] += int((logits.argmax(1) == labels[held]).sum())
            nll[a] += float(F.cross_entropy(logits, labels[held], reduction="sum"))
    n_held = int((fold >= 0).sum())
    accs = [correct[a] / n_held for a in m.config.alphas]
    ces = [nll[a] / n_held for a in m.config.alphas]
    assert [r["cv_accuracies"][f"{a:g}"] for a in m.config.alphas] == pytest.approx(accs)
    assert [r["cv_cross_entropy"][f"{a:g}"] for a in m.config.alphas] == pytest.approx(ces, rel=1e-4)
    # the best accuracy; among ties the lowest held-out cross-entropy
    tied = [i for i, acc in enumerate(accs) if acc == max(accs)]
    assert r["alpha"] == m.config.alphas[min(tied, key=lambda i: ces[i])] == pytest.approx(float(m.alpha))
    assert accs[0] < max(accs)  # the names say nothing here: the Gaussian must get weight


def test_one_shot_per_class_keeps_the_default_alpha(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    one = support.subset([support.labels.index(c) for c in range(5)])
    m = make_method("gda", tiny, support.classnames).fit(one, shared_extractor)
    assert m.metrics["searched"] is False and float(m.alpha) == pytest.approx(m.config.alpha) == 0.1


# ---- accuracy ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded_tasks(tiny, shared_extractor):
    """Held-out accuracy of zero-shot, Tip-Adapter and GDA on three uninformative-names tasks."""
    return seeded_accuracies(tiny, shared_extractor, ("zeroshot", "tip", "gda"), SEEDS)


def test_beats_zero_shot_and_matches_tip_adapter_on_uninformative_names(seeded_tasks):
    print("\nheld-out accuracy per seed:", seeded_tasks)
    for accs in seeded_tasks:
        assert accs["gda"] >= accs["zeroshot"] + 0.3
        assert accs["gda"] >= accs["tip"]


# ---- invariants -----------------------------------------------------------------------------------

def test_frozen_backbone_bit_identical(trained, tiny):
    assert tiny.parameter_fingerprint() == trained.fingerprint_before
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert not list(trained.parameters())  # training-free: buffers only


def test_save_load_reproduces_predictions(trained, tiny, nato_task, shared_extractor, tmp_path):
    _, test_refs, _ = nato_task
    trained.save(tmp_path / "gda")
    loaded = load_model(tmp_path / "gda", backbone=tiny)
    assert type(loaded) is type(trained) and loaded.config == trained.config
    assert float(loaded.alpha) == float(trained.alpha) and loaded.metrics == trained.metrics
    assert torch.equal(loaded.predict_proba(test_refs, shared_extractor),
                       trained.predict_proba(test_refs, shared_extractor))


def test_deterministic_given_seed(trained, tiny, nato_task, shared_extractor, test_features):
    support, _, _ = nato_task
    again = make_method("gda", tiny, support.classnames, augment_views=VIEWS).fit(support, shared_extractor)
    with torch.no_grad():
        assert torch.equal(again.logits_from_features(test_features), trained.logits_from_features(test_features))
    assert again.metrics == trained.metrics


def test_progress_and_cancel_keep_previous_state(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    m = make_method("gda", tiny, support.classnames)
    fresh = state_of(m)
    flag = CancelAfter("Estimating", 1)
    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), fresh)
    seen = []
    m.fit(support, shared_extractor, progress=seen.append)
    assert [p.step for p in seen if p.stage.startswith("Estimating")] == [0, 1, 2]
    before, metrics = state_of(m), dict(m.metrics)
    flag = CancelAfter("Estimating", 1)
    with pytest.raises(Cancelled):
        m.fit(support.subset(range(0, 20, 2)), shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), before) and m.metrics == metrics


def test_knowledge_graph_has_text_and_class_mean_edges(trained, support_views, nato_task):
    support, _, _ = nato_task
    kg = trained.knowledge_graph()
    C = trained.num_classes
    assert kg.classes == trained.classnames and kg.counts == [4] * C
    for edges in (kg.text_edges, kg.visual_edges):
        assert edges.shape == (C, C) and np.allclose(edges, edges.T, atol=1e-6)
        assert np.allclose(np.diag(edges), 1.0, atol=1e-5)
    labels = support.labels_tensor()
    mus = torch.stack([support_views[labels == c].reshape(-1, support_views.shape[-1]).mean(0) for c in range(C)])
    mus = F.normalize(mus, dim=-1)
    assert np.allclose(kg.visual_edges, (mus @ mus.T).numpy(), atol=1e-5)
