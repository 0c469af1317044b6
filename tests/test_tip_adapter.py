"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): the cache model, the leave-one-out α/β
search, key fine-tuning, and the method invariants of docs/design.md."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import CancelAfter, accuracy, same_state, state_of
from fewshot_studio.errors import Cancelled
from fewshot_studio.methods import load_model, make_method

METHODS = ("tip", "tip-f")


@pytest.fixture(scope="module")
def test_features(nato_task, shared_extractor):
    _, test_refs, _ = nato_task
    return shared_extractor.image_features(test_refs, views=(0,))[:, 0]


@pytest.fixture(scope="module")
def support_views(nato_task, shared_extractor):
    support, _, _ = nato_task
    return shared_extractor.image_features(support.images, views=range(11))  # warms the cache too


@pytest.fixture(scope="module")
def zeroshot(tiny, nato_task, shared_extractor):
    support, _, _ = nato_task
    return make_method("zeroshot", tiny, support.classnames).fit(support, shared_extractor)


@pytest.fixture(scope="module")
def trained(tiny, nato_task, shared_extractor, support_views):
    """Both methods with DEFAULT settings, trained once for the module (fit time on cached features)."""
    support, _, _ = nato_task
    out = {}
    for name in METHODS:
        before = tiny.parameter_fingerprint()
        m = make_method(name, tiny, support.classnames)
        t0, c0 = time.perf_counter(), time.process_time()
        m.fit(support, shared_extractor)
        m.fit_seconds, m.fit_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        m.fingerprint_before = before
        out[name] = m
    return out


# ---- the cache model ---------------------------------------------------------------------------

def test_cache_is_mean_of_augmented_views_with_one_hot_values(trained, support_views, nato_task):
    support, _, _ = nato_task
    tip = trained["tip"]
    keys = F.normalize(support_views[:, 1:].mean(1), dim=-1)
    assert torch.allclose(tip.cache_keys, keys, atol=1e-6)
    assert torch.equal(tip.cache_values, F.one_hot(support.labels_tensor(), 5).float())
    assert "cache_keys" in dict(tip.named_buffers())  # training-free: not a parameter
    tipf = trained["tip-f"]
    assert isinstance(tipf.cache_keys, nn.Parameter)
    assert tipf.cache_keys.shape == keys.shape and not torch.allclose(tipf.cache_keys, keys, atol=1e-3)


@pytest.mark.parametrize("name", METHODS)
def test_logits_follow_the_official_formula(trained, test_features, zeroshot, name):
    m = trained[name]
    f = test_features
    alpha, beta = float(m.alpha), float(m.beta)
    affinity = f @ m.cache_keys.detach().T
    cache = ((-1) * (beta - beta * affinity)).exp() @ m.cache_values
    clip = zeroshot.logits_from_features(f)  # s · f · tᵀ with the same prompt ensemble
    with torch.no_grad():
        assert torch.allclose(m.logits_from_features(f), clip + alpha * cache, atol=1e-4)


def test_without_search_the_paper_defaults_are_used(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    m = make_method("tip", tiny, support.classnames, search=False).fit(support, shared_extractor)
    assert float(m.alpha) == 1.0 and float(m.beta) == 5.5
    assert m.metrics["searched"] is False


def test_search_improves_leave_one_out_accuracy(trained):
    for m in trained.values():
        r = m.metrics
        assert r["loo_accuracy"] >= r["default_loo_accuracy"]
        assert (float(m.alpha), float(m.beta)) == pytest.approx((r["alpha"], r["beta"]))
        if not r["searched"]:
            assert (r["alpha"], r["beta"]) == (m.config.alpha, m.config.beta)
    assert trained["tip"].metrics["searched"]  # zero-shot is useless here: the cache must get weight


def test_search_masks_each_querys_own_key(tiny, nato_task, shared_extractor, zeroshot, support_views):
    """With one shot per class a query's only same-class key is its own. Masked, the cache can
    only add weight to wrong classes, so leave-one-out accuracy cannot beat zero-shot's on the
    same images; unmasked, the search would find a perfect (leaked) setting."""
    support, _, _ = nato_task
    one_shot = support.subset([support.labels.index(c) for c in range(5)])
    m = make_method("tip", tiny, support.classnames).fit(one_shot, shared_extractor)
    plain = shared_extractor.image_features(one_shot.images, views=(0,))[:, 0]
    zs = float((zeroshot.logits_from_features(plain).argmax(1) == one_shot.labels_tensor()).float().mean())
    assert m.metrics["loo_accuracy"] <= zs < 1.0


# ---- invariants (docs/design.md, "Method invariants") ------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_frozen_backbone_bit_identical(trained, tiny, name):
    assert tiny.parameter_fingerprint() == trained[name].fingerprint_before
    assert all(not p.requires_grad for p in tiny.model.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_save_load_reproduces_predictions(trained, tiny, nato_task, shared_extractor, tmp_path, name):
    _, test_refs, _ = nato_task
    m = trained[name]
    m.save(tmp_path / name)
    loaded = load_model(tmp_path / name, backbone=tiny)  # a fresh model has an empty cache: resized on load
    assert type(loaded) is type(m) and loaded.config == m.config
    assert loaded.cache_keys.shape == m.cache_keys.shape
    assert isinstance(loaded.cache_keys, nn.Parameter) == (name == "tip-f")
    assert float(loaded.alpha) == float(m.alpha) and float(loaded.beta) == float(m.beta)
    assert torch.equal(loaded.predict_proba(test_refs, shared_extractor), m.predict_proba(test_refs, shared_extractor))


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_given_seed(trained, tiny, nato_task, shared_extractor, test_features, name):
    support, _, _ = nato_task
    again = make_method(name, tiny, support.classnames).fit(support, shared_extractor)
    with torch.no_grad():
        assert torch.equal(again.logits_from_features(test_features), trained[name].logits_from_features(test_features))


def test_default_settings_beat_zero_shot(trained, zeroshot, nato_task, shared_extractor):
    _, test_refs, test_labels = nato_task
    zs = accuracy(zeroshot, test_refs, test_labels, shared_extractor)
    accs = {n: accuracy(m, test_refs, test_labels, shared_extractor) for n, m in trained.items()}
    print(f"\nheld-out accuracy: zero-shot {zs:.3f}, " + ", ".join(
        f"{n} {a:.3f} (fit {trained[n].fit_seconds:.2f}s, α={float(trained[n].alpha):.2f}, "
        f"β={float(trained[n].beta):.2f})" for n, a in accs.items()))
    for n in METHODS:
        assert accs[n] >= zs + 0.2, n
    assert accs["tip-f"] >= 0.8
    # how fast a fit on cached features is: the benchmark's targets, not a timed test


# ---- progress, cancel, knowledge graph -------------------------------------------------------------

def test_tip_f_progress_reports_steps_loss_and_accuracy(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    seen = []
    m = make_method("tip-f", tiny, support.classnames, min_steps=30)
    m.fit(support, shared_extractor, progress=seen.append)
    train = [p for p in seen if p.stage.startswith("Training")]
    assert [p.step for p in train] == list(range(1, 31))  # max(20 epochs × 1 batch, 30 min steps)
    assert all(p.total == 30 and p.loss is not None and p.accuracy is not None for p in train)
    assert all(np.isfinite(p.loss) and 0 <= p.accuracy <= 1 for p in train)
    search = [p.step for p in seen if p.stage.startswith("Searching")]
    assert search == sorted(search) and search[-1] == m.config.search_steps[0]
    assert len(m.history) == 30


def test_tip_f_epochs_set_steps_when_above_the_minimum(tiny, nato_task, shared_extractor, support_views):
    support, _, _ = nato_task
    m = make_method("tip-f", tiny, support.classnames, epochs=3, batch_size=8, min_steps=1)
    m.fit(support, shared_extractor)
    assert len(m.history) == 3 * 3  # 20 images in batches of 8: 3 steps per epoch


@pytest.mark.parametrize("name,stage", [("tip-f", "Training"), ("tip", "Searching")])
def test_cancel_keeps_previous_state(tiny, nato_task, shared_extractor, support_views, name, stage):
    support, _, _ = nato_task
    m = make_method(name, tiny, support.classnames, min_steps=10) if name == "tip-f" else \
        make_method(name, tiny, support.classnames)
    fresh = state_of(m)
    flag = CancelAfter(stage, 3 if name == "tip-f" else 1)
    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), fresh)  # the empty cache is back, even though fit had resized it
    assert m.cache_keys.shape[0] == 0
    if name == "tip-f":
        assert [p.step for p in flag.seen if p.stage.startswith("Training")] == [1, 2, 3]
    # and from a trained state: a cancelled re-fit leaves it exactly as it was
    m.fit(support.subset(range(0, 20, 2)), shared_extractor)
    before, metrics = state_of(m), dict(m.metrics)
    flag = CancelAfter(stage, 3 if name == "tip-f" else 1)
    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=flag, cancel=flag)
    assert same_state(state_of(m), before) and m.metrics == metrics


@pytest.mark.parametrize("name", METHODS)
def test_knowledge_graph(trained, name):
    m = trained[name]
    kg = m.knowledge_graph()
    C = m.num_classes
    assert kg.classes == m.classnames and kg.counts == [4] * C
    for edges in (kg.text_edges, kg.visual_edges):
        assert edges is not None and edges.shape == (C, C)
        assert np.allclose(edges, edges.T, atol=1e-6)
        assert np.allclose(np.diag(edges), 1.0, atol=1e-5)
    protos = F.normalize(torch.stack([m.cache_keys.detach()[m.cache_values[:, c] > 0].mean(0) for c in range(C)]), dim=-1)
    assert np.allclose(kg.visual_edges, (protos @ protos.T).numpy(), atol=1e-5)
