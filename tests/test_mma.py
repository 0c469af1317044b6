"""MMA (Yang et al., CVPR 2024): adapters in both towers, shared per block, gradient rescaling,
lower-block cache."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import NATO, accuracy, make_refs, make_task
from fewshot_studio.data import SupportSet
from fewshot_studio.errors import BackboneError, Cancelled
from fewshot_studio.methods import load_model, make_method
from fewshot_studio.methods import mma as mma_mod
from fewshot_studio.methods.mma import MMA, auto_start_block, grad_scale
from fewshot_studio.methods.zeroshot import ZeroShot, ZeroShotConfig

FAST = dict(steps=6, augment_views=2)  # cheap settings for tests that only check mechanics


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny towers are too small for intra-op threads: on a busy 2-core machine two threads
    made a fit up to 8× slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tiny, nato_task, shared_extractor):
    """MMA with its DEFAULT settings trained on the NATO task (shared by several tests)."""
    support, _, _ = nato_task
    before = tiny.parameter_fingerprint()
    m = make_method("mma", tiny, support.classnames)
    m.fit(support, shared_extractor)
    return m, before


def _small_support(nato_task, per_class: int = 2) -> SupportSet:
    support, _, _ = nato_task
    keep = [i for c in range(support.num_classes)
            for i in [j for j, y in enumerate(support.labels) if y == c][:per_class]]
    return support.subset(keep)


def _adapter_state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---- structure ----------------------------------------------------------------------------------
def test_default_blocks_are_top_two_thirds(tiny):
    assert auto_start_block(12) == 5 and auto_start_block(6) == 3
    m = make_method("mma", tiny, list(NATO))
    assert m.block_range == (3, 6)
    assert m.text_blocks == [2, 3, 4, 5] and m.visual_blocks == [2, 3, 4, 5]


@pytest.mark.parametrize("start,end", [(None, None), (2, 5), (6, 6)])
def test_trainable_parameter_count_matches_formula(tiny, start, end):
    m = make_method("mma", tiny, list(NATO), start_block=start, end_block=end)
    s, e = m.block_range
    d_t = tiny.model.transformer.width
    d_v = tiny.model.visual.transformer.width
    r = 32
    per_block = (d_t * r + r) + (r * d_t + d_t) + (d_v * r + r) + (r * d_v + d_v) + (r * r + r)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == (e - s + 1) * per_block == m.expected_parameter_count()
    # nothing of CLIP is a parameter of the method, and CLIP stays frozen
    assert all(k.startswith("adapters.") for k, _ in m.named_parameters())
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_adapter_init_kaiming_fan_out_zero_bias(tiny):
    m = make_method("mma", tiny, list(NATO))
    a = m.adapters[0]
    assert torch.count_nonzero(a.text_down[0].bias) == 0 and torch.count_nonzero(a.shared[0].bias) == 0
    w = a.text_up.weight  # (d_text, r): fan_out = d_text -> std sqrt(2 / d_text)
    assert abs(w.std().item() / (2 / w.shape[0]) ** 0.5 - 1) < 0.15


def test_shared_adapter_is_one_module_with_gradient_from_both_branches(tiny, nato_task):
    m = make_method("mma", tiny, list(NATO))
    for a in m.adapters:
        assert a.branch("text")[1] is a.branch("visual")[1] is a.shared
    # exactly one copy of each shared weight in the parameters / state dict
    assert sum(1 for k in m.state_dict() if ".shared." in k) == 2 * len(m.adapters)
    _, test, _ = nato_task
    pixels = torch.stack([tiny.preprocess(r.open()) for r in test[:4]])
    for kind in ("text", "visual"):
        m.zero_grad(set_to_none=True)
        f = m.encode_text(m._token_ids()) if kind == "text" else m.encode_image(pixels)
        f.square().sum().backward()
        for a in m.adapters:
            assert a.shared[0].weight.grad is not None and a.shared[0].weight.grad.abs().sum() > 0, kind
            other = a.visual_down if kind == "text" else a.text_down
            assert other[0].weight.grad is None  # the other branch's own adapters see nothing


# ---- gradient rescaling -------------------------------------------------------------------------
def test_grad_scale_is_identity_forward_scaled_backward():
    x = torch.randn(3, 5, requires_grad=True)
    y = grad_scale(x, 0.001)
    assert torch.equal(y, x)
    g = torch.randn(3, 5)
    y.backward(g)
    assert torch.allclose(x.grad, g * 0.001, rtol=0, atol=0)
    x2 = torch.randn(4, requires_grad=True)
    grad_scale(x2, 1000.0).sum().backward()
    assert torch.equal(x2.grad, torch.full((4,), 1000.0))


def test_gradient_rescaling_as_in_official_code(tiny, monkeypatch):
    """With the rescaling layers, the adapter weights get (true gradient)/scale — they learn as if
    unscaled — while the gradient flowing back into the residual stream is the true one."""
    m = make_method("mma", tiny, list(NATO))
    tower = m._visual_tower
    torch.manual_seed(0)
    x0 = torch.randn(3, 37, tower.width)
    w = torch.randn(3, 37, tower.width)

    def run():
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = m._run_blocks(tower, x, None, 0, len(tower.blocks))
        (out * w).sum().backward()
        return x.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    gx, grads = run()
    monkeypatch.setattr(mma_mod, "grad_scale", lambda t, s: t)
    gx_true, grads_true = run()
    assert torch.allclose(gx, gx_true, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_true.keys() and len(grads) > 0
    scale = m.config.scale
    for n in grads:
        rel = (grads[n] * scale - grads_true[n]).norm() / grads_true[n].norm()
        assert rel < 1e-5, (n, rel)


# ---- invariants -----------------------------------------------------------------------------------
def test_scale_zero_reproduces_zero_shot(tiny, nato_task, shared_extractor):
    support, test, _ = nato_task
    m = make_method("mma", tiny, support.classnames, scale=0.0, **FAST)
    m.fit(support, shared_extractor)
    zs = ZeroShot(tiny, support.classnames, config=ZeroShotConfig(templates=("a photo of a {}.",)))
    zs.fit(support, shared_extractor)
    refs = test[::4]
    got = m.image_logits(refs, shared_extractor)
    want = zs.image_logits(refs, shared_extractor)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # and the towers themselves equal open_clip's encode_image / encode_text (up to float rounding:
    # the last block computes the pooled rows only)
    pixels = torch.stack([tiny.preprocess(r.open()) for r in refs])
    with torch.no_grad():
        assert torch.allclose(m.encode_image(pixels), tiny.model.encode_image(pixels), atol=1e-5, rtol=1e-5)
        full = tiny.tokenizer(m.prompts())
        tok = m._token_ids()  # truncated after the end-of-text token: exact under the causal mask
        assert tok.shape[1] < full.shape[1] and torch.equal(tok, full[:, :tok.shape[1]])
        assert torch.allclose(m.encode_text(full), tiny.model.encode_text(full), atol=1e-5, rtol=1e-5)
        assert torch.allclose(m.encode_text(tok), tiny.model.encode_text(full), atol=1e-5, rtol=0)


def test_last_block_on_the_pooled_rows_only_matches_the_full_block(tiny):
    """The last block computes only the row the head reads (class token / end-of-text token):
    same embeddings and same adapter gradients as running it on every row."""
    m = make_method("mma", tiny, ["red circle", "blue square", "a green triangle with a long name"], **FAST)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pixels = torch.randn(5, 3, tiny.image_size, tiny.image_size, generator=g)
    tokens = m._token_ids()
    assert len(set(m._text_tower.pooled_rows(len(tokens), tokens).tolist())) > 1  # prompts end at different places
    for tower, inputs in ((m._visual_tower, pixels), (m._text_tower, tokens)):
        rows = tower.pooled_rows(len(inputs), inputs if tower.kind == "text" else None)
        assert rows is not None and mma_mod._plain_block(tower.blocks[-1])  # the short path is taken
        outs, grads = [], []
        for r in (None, rows):
            m.zero_grad()
            x, mask = tower.embed(inputs)
            f = tower.head(m._run_blocks(tower, x, mask, 0, len(tower.blocks), rows=r), inputs)
            (f.square().sum()).backward()
            outs.append(f.detach())
            grads.append(torch.cat([p.grad.flatten() for p in m.adapters.parameters() if p.grad is not None]))
        assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5), tower.kind
        assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4), tower.kind


@pytest.mark.slow  # uses MMA trained with its default 300 steps (about 15 s)
def test_frozen_backbone_bit_identical_after_training(trained, tiny):
    m, before = trained
    assert tiny.parameter_fingerprint() == before
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert m.history and len(m.history) == m.metrics["steps"] >= m.config.min_steps


@pytest.mark.slow  # uses MMA trained with its default 300 steps (about 15 s)
def test_save_load_reproduces_predictions(trained, tiny, nato_task, shared_extractor, tmp_path):
    m, _ = trained
    _, test, _ = nato_task
    refs = test[::3]
    p1 = m.predict_proba(refs, shared_extractor)
    m.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model", backbone=tiny)
    assert isinstance(loaded, MMA) and loaded.config == m.config
    assert torch.equal(loaded.predict_proba(refs, shared_extractor), p1)
    g1, g2 = m.knowledge_graph(), loaded.knowledge_graph()
    assert np.array_equal(g1.text_edges, g2.text_edges) and np.array_equal(g1.visual_edges, g2.visual_edges)


def test_cached_lower_blocks_equal_uncached(tiny, nato_task):
    support = _small_support(nato_task)
    a = make_method("mma", tiny, support.classnames, augment_views=2)
    b = make_method("mma", tiny, support.classnames, augment_views=2)
    dc = a.prepare_training(support, cached=True)
    du = b.prepare_training(support, cached=False)
    assert dc.images.shape[:2] == du.images.shape[:2] == (len(support), 3)
    assert dc.images.shape[2:] == (37, tiny.model.visual.transformer.width)  # block outputs, not pixels
    idx = torch.tensor([0, 3, 5, 8, 9])
    views = torch.tensor([0, 1, 2, 1, 0])
    lc = a.training_logits(dc, idx, views)
    lu = b.training_logits(du, idx, views)
    assert torch.allclose(lc, lu, atol=1e-5, rtol=0)
    y = dc.labels[idx]
    F.cross_entropy(lc, y).backward()
    F.cross_entropy(lu, y).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), n
    # a few whole optimiser steps stay together too
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sa, sb = a._make_step(dc, 3, ga), b._make_step(du, 3, gb)
    for i in range(3):
        la, lb = sa(i), sb(i)
        assert abs(la[0] - lb[0]) < 1e-5
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), n
    # and inference after training agrees
    refs = nato_task[1][::10]
    assert torch.allclose(a.image_logits(refs), b.image_logits(refs), atol=1e-5, rtol=0)


def test_deterministic_with_same_seed(tiny, nato_task, shared_extractor):
    support = _small_support(nato_task)
    states = []
    for _ in range(2):
        m = make_method("mma", tiny, support.classnames, seed=3, **FAST)
        m.fit(support, shared_extractor)
        states.append(_adapter_state(m))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = make_method("mma", tiny, support.classnames, seed=4, **FAST)
    other.fit(support, shared_extractor)
    assert not torch.equal(other.adapters[0].text_up.weight, states[0]["adapters.0.text_up.weight"])


def test_cancel_mid_training_keeps_previous_state(tiny, nato_task, shared_extractor):
    support = _small_support(nato_task)
    m = make_method("mma", tiny, support.classnames, **FAST)
    m.fit(support, shared_extractor)
    before = _adapter_state(m)
    history, metrics = list(m.history), dict(m.metrics)
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.stage == "Training MMA" and p.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        m.fit(support, shared_extractor, progress=progress, cancel=cancel)
    steps = [p.step for p in seen if p.stage == "Training MMA"]
    assert steps == [1, 2]  # stopped within one step
    after = _adapter_state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.history == history and m.metrics == metrics


def test_resnet_backbone_refused():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from fewshot_studio.backbone import Backbone, BackboneSpec

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    assert isinstance(model.visual, open_clip.modified_resnet.ModifiedResNet)
    bb = Backbone(model, None, BackboneSpec(name="RN-test", pretrained=None), "rn-test", torch.device("cpu"))
    with pytest.raises(BackboneError, match=r"image tower \(ModifiedResNet\).*not a transformer") as e:
        make_method("mma", bb, ["a", "b"])
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence


# ---- learning -------------------------------------------------------------------------------------
@pytest.mark.slow  # uses MMA trained with its default 300 steps (about 15 s)
def test_default_mma_beats_zero_shot_on_uninformative_names(trained, tiny, nato_task, shared_extractor):
    m, _ = trained
    support, test, labels = nato_task
    zs = make_method("zeroshot", tiny, support.classnames)
    zs.fit(support, shared_extractor)
    acc_zs = accuracy(zs, test, labels, shared_extractor)
    acc_mma = accuracy(m, test, labels, shared_extractor)
    print(f"\nNATO task held-out accuracy: zero-shot {acc_zs:.1%}, MMA (default) {acc_mma:.1%}, "
          f"{m.metrics['steps']} steps")
    assert acc_mma >= acc_zs + 0.2, (acc_zs, acc_mma)


@pytest.mark.slow  # uses MMA trained with its default 300 steps (about 15 s)
def test_knowledge_graph(trained):
    m, _ = trained
    assert m.text_features() is m.text_features()  # adapted text features computed once, then cached
    g = m.knowledge_graph()
    c = len(NATO)
    assert g.classes == list(NATO) and g.text_edges.shape == (c, c) and g.visual_edges.shape == (c, c)
    assert np.allclose(np.diag(g.text_edges), 1, atol=1e-5) and np.allclose(np.diag(g.visual_edges), 1, atol=1e-5)
    assert g.counts == [4] * c


@pytest.mark.slow  # trains MMA for about 18 s
def test_class_without_images_base_to_novel(tiny, shared_extractor):
    """Trained on four colour-shape classes with images, MMA still recognises a fifth class given
    only its name at least as well as zero-shot CLIP does."""
    base = {"red circle": "red circle", "blue square": "blue square",
            "green triangle": "green triangle", "yellow star": "yellow star"}
    support, _, _ = make_task(base, shots=4, test_per_class=0, seed=11)
    names = support.classnames + ["purple cross"]
    support = SupportSet(names, support.images, support.labels)
    assert support.counts()[-1] == 0
    novel = make_refs("purple cross", 20, np.random.default_rng(12))
    novel_labels = torch.full((20,), 4)
    m = make_method("mma", tiny, names)
    m.fit(support, shared_extractor)
    zs = make_method("zeroshot", tiny, names)
    zs.fit(support, shared_extractor)
    acc_mma = accuracy(m, novel, novel_labels, shared_extractor)
    acc_zs = accuracy(zs, novel, novel_labels, shared_extractor)
    print(f"\nnovel class 'purple cross' (no images): zero-shot {acc_zs:.1%}, MMA {acc_mma:.1%}")
    assert acc_mma >= acc_zs, (acc_zs, acc_mma)
    g = m.knowledge_graph()
    assert g.counts[-1] == 0 and np.all(g.visual_edges[-1, :-1] == 0)


def test_no_images_at_all_is_zero_shot_through_adapted_towers(tiny, shared_extractor):
    names = ["red circle", "blue square", "green triangle"]
    m = make_method("mma", tiny, names)
    m.fit(SupportSet(names), shared_extractor)
    assert m.metrics["steps"] == 0 and m.history == []
    g = m.knowledge_graph()
    assert g.visual_edges is None and g.text_edges.shape == (3, 3)
    refs = make_refs("blue square", 3, np.random.default_rng(5))
    assert m.predict_proba(refs, shared_extractor).argmax(1).tolist() == [1, 1, 1]


def test_time_epoch_cached_vs_uncached(tiny, nato_task):
    support = _small_support(nato_task)
    m = make_method("mma", tiny, support.classnames, augment_views=2)
    before = _adapter_state(m)
    tc = m.time_epoch(support, cached=True)
    tu = m.time_epoch(support, cached=False)
    assert tc["steps_per_epoch"] == tu["steps_per_epoch"] == 1 and tc["epoch_seconds"] > 0
    after = _adapter_state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("threshold, says", [(0.0, True), (1e9, False)])
def test_cpu_training_says_up_front_how_long_it_takes(tiny, nato_task, shared_extractor, monkeypatch,
                                                      threshold, says):
    """On a CPU the first step is timed; when steps × its time is long, every later stage text
    says how long the training will take and suggests a closed-form method."""
    monkeypatch.setattr(mma_mod, "ESTIMATE_SAY_SECONDS", threshold)
    support = nato_task[0]
    m = make_method("mma", tiny, support.classnames, **FAST)
    seen = []
    m.fit(support, shared_extractor, progress=seen.append)
    steps = [p for p in seen if p.stage.startswith("Training MMA")]
    assert len(steps) == 6 and m.metrics["estimated_seconds"] > 0
    if says:
        assert all("on this CPU" in p.stage and "GDA or ProKeR" in p.stage for p in steps)
    else:
        assert all(p.stage == "Training MMA" for p in steps)


def test_duration_is_said_as_a_person_would():
    d = mma_mod._duration
    assert (d(0.2), d(42.4), d(299), d(3600 + 600)) == ("1 s", "42 s", "5 min", "1 h 10 min")
