"""Backbones: the tiny offline model, local checkpoints, and weights that cannot be had."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from fewshot_studio import shapes, tiny as tiny_mod
from fewshot_studio.backbone import BackboneSpec, load_backbone
from fewshot_studio.errors import WeightsUnavailableError
from fewshot_studio.features import class_text_features


def _shape_batch(backbone, n: int, seed: int):
    rng = np.random.default_rng(seed)
    specs = shapes.sample_specs(n, rng)
    x = torch.stack([backbone.preprocess(shapes.render(s, rng, 96)) for s in specs])
    y = torch.tensor([shapes.CLASSES.index(s.label) for s in specs])
    return x, y


@pytest.mark.slow  # end to end: encodes 480 rendered images
def test_tiny_zero_shot_far_above_chance(tiny):
    """Fresh images (a seed never used in pretraining) over all 48 colour-shape classes."""
    x, y = _shape_batch(tiny, 480, seed=2024)
    f = tiny.encode_images(x)
    t = class_text_features(tiny, list(shapes.CLASSES))
    acc = ((f @ t.T).argmax(1) == y).float().mean().item()
    assert acc >= 0.60, f"tiny zero-shot accuracy {acc:.1%} is below 60%"


def test_tiny_backbone_facts(tiny):
    assert tiny.id.startswith("tiny-") and tiny.device.type == "cpu"
    assert tiny.image_size == 48 and tiny.embed_dim == 64
    assert all(not p.requires_grad for p in tiny.model.parameters())
    f = tiny.encode_texts(["a photo of a red circle.", "a blue star."])
    assert f.shape == (2, 64) and torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_augmented_views_are_deterministic_and_differ(tiny):
    img = shapes.render(shapes.ShapeSpec("red", "star"), np.random.default_rng(0), 96)
    a1, a2, b = tiny.augment(img, "k", 1), tiny.augment(img, "k", 1), tiny.augment(img, "k", 2)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)
    assert torch.equal(tiny.augment(img, "k", 0), tiny.preprocess(img))
    assert a1.shape == (3, 48, 48)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_checkpoint_file_round_trip(tiny, tmp_path, fmt):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    other = load_backbone(BackboneSpec(name=tiny_mod.MODEL_NAME, checkpoint=str(path), device="cpu"))
    x, _ = _shape_batch(tiny, 16, seed=5)
    assert torch.equal(other.encode_images(x), tiny.encode_images(x))
    assert torch.equal(other.encode_texts(["a red circle."]), tiny.encode_texts(["a red circle."]))
    assert other.id != tiny.id and "sha256" in other.id


def test_local_checkpoint_directory(tiny, tmp_path):
    from safetensors.torch import save_file
    cfg = json.loads(tiny_mod.CONFIG_PATH.read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.clone() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    other = load_backbone(BackboneSpec(name=tiny_mod.MODEL_NAME, checkpoint=str(tmp_path), device="cpu"))
    x, _ = _shape_batch(tiny, 8, seed=6)
    assert torch.equal(other.encode_images(x), tiny.encode_images(x))


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone(BackboneSpec(name="ViT-B-32", checkpoint=str(tmp_path / "nope.pt"), device="cpu"))
    msg = str(e.value)
    assert "does not exist" in msg and "tiny" in msg and "\n" not in msg


def test_garbage_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone(BackboneSpec(name=tiny_mod.MODEL_NAME, checkpoint=str(bad), device="cpu"))
    assert "Could not load the checkpoint" in str(e.value)


@pytest.mark.parametrize("offline_env", ["1", None])
def test_download_offline_fails_fast(monkeypatch, offline_env):
    """No network: ViT-B-32/openai fails within 5 s with one sentence naming the fix."""
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        from fewshot_studio import backbone as bb
        monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=2.0: False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setenv("HF_HOME", os.path.join(os.getcwd(), ".no-such-hf-home"))
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone(BackboneSpec(name="ViT-B-32", pretrained="openai", device="cpu"))
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert "ViT-B-32/openai" in msg and "tiny" in msg and "checkpoint" in msg and "\n" not in msg


def test_unknown_model_and_tag():
    with pytest.raises(WeightsUnavailableError, match="not an open_clip model name"):
        load_backbone(BackboneSpec(name="ViT-Nope-99", device="cpu"))
    with pytest.raises(WeightsUnavailableError, match="not a pretrained tag"):
        load_backbone(BackboneSpec(name="ViT-B-32", pretrained="no-such-tag", device="cpu"))


def test_backbone_spec_from_env(monkeypatch):
    monkeypatch.setenv("FEWSHOT_STUDIO_BACKBONE", "tiny")
    monkeypatch.setenv("FEWSHOT_STUDIO_CHECKPOINT", "/x/y.pt")
    spec = BackboneSpec.from_env()
    assert spec.name == "tiny" and spec.checkpoint == "/x/y.pt"
    assert BackboneSpec.from_env(name="RN50").name == "RN50"


@pytest.mark.slow  # pretrains tiny twice (about 13 s)
def test_pretrain_tiny_is_deterministic(tmp_path):
    """The generating script reproduces bit-identical weights from its seed (short run)."""
    from safetensors.torch import load_file
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        tiny_mod.pretrain(out=p, seed=3, n_images=256, steps=2, batch_size=32, log=lambda s: None)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- one autocast policy (precision.py) and one prompt builder (prompts.py) ----------------------

def test_autocast_policy_bf16_then_fp16_on_cuda_and_none_elsewhere(monkeypatch, tiny):
    from fewshot_studio import precision

    assert precision.autocast_dtype("cuda", bf16_supported=True) is torch.bfloat16
    assert precision.autocast_dtype("cuda", bf16_supported=False) is torch.float16
    for dev in ("cpu", "mps"):
        assert precision.autocast_dtype(dev, bf16_supported=True) is None
    # CPU: a no-op, whatever the GPU would support, so CPU results stay exact fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with precision.autocast_for(torch.device("cpu")):
        assert not torch.is_autocast_enabled() and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with tiny.autocast():  # the backbone uses the same policy
        assert not torch.is_autocast_enabled()
        assert tiny.encode_texts(["a red circle."]).dtype == torch.float32
    # CUDA: the dtype the policy picks is the one autocast gets (without running anything on a GPU)
    seen = []

    class Fake:
        def __init__(self, device_type, dtype):
            seen.append((device_type, dtype))

    monkeypatch.setattr(precision.torch, "autocast", Fake)
    for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _b=bf16, **k: _b)
        precision.autocast_for("cuda")
        assert seen.pop() == ("cuda", want)


def test_prompts_are_built_in_one_place(tiny):
    from fewshot_studio import prompts
    from fewshot_studio.methods.mma import MMA

    assert prompts.class_prompts("red_circle ", "  round. ", ("a photo of a {}.", "a {}")) == \
        ["a photo of a red circle. round.", "a red circle round."]
    assert prompts.class_prompts("cat", "  ", ("a {}.",)) == ["a cat."]
    assert prompts.templates_for(tiny=True) == shapes.CAPTION_TEMPLATES == tiny.templates
    assert prompts.templates_for(tiny=False) == prompts.GENERIC_TEMPLATES
    # MMA's single template goes through the same builder (its strings are what the official code builds)
    m = MMA(tiny, ["red_circle", "blue square"], ["round", None])
    assert m.prompts() == ["a photo of a red circle. round", "a photo of a blue square."]


_PROMPTS = ["a photo of a red circle.", "itap of a blue square. striped, with a thin border",
            "a close-up photo of a green triangle.", "x", "a very long prompt " * 30]


def _full_vs_cut(backbone):
    from fewshot_studio.backbone import _truncatable

    assert _truncatable(backbone.model)
    tokens = backbone.tokenizer(_PROMPTS)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(backbone.model.encode_text(tokens), dim=-1)
        cut = torch.nn.functional.normalize(backbone.encode_tokens(tokens), dim=-1)
        short = torch.nn.functional.normalize(backbone.encode_tokens(tokens[:4]), dim=-1)
    assert (cut - full).abs().max() < 1e-5
    assert (short - full[:4]).abs().max() < 1e-5  # a batch whose longest prompt ends early
    assert (backbone.encode_texts(_PROMPTS) - full).abs().max() < 1e-5


def test_text_encoding_cut_after_end_of_text_is_exact_tiny(tiny):
    """encode_texts stops each batch at its last end-of-text token: the same features as the
    full context (causal mask, pooled at the end-of-text position)."""
    _full_vs_cut(tiny)


@pytest.mark.slow  # builds a ViT-B-32 with random weights (151 M parameters)
def test_text_encoding_cut_after_end_of_text_is_exact_vit_b32():
    import open_clip

    from fewshot_studio.backbone import Backbone

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer("ViT-B-32"), BackboneSpec("ViT-B-32", None, device="cpu"),
                  "vit-b-32-random", torch.device("cpu"))
    assert bb.tokenizer(_PROMPTS[:4]).shape[1] == 77
    _full_vs_cut(bb)


def test_text_encoding_cut_only_under_a_causal_mask(tiny):
    """A tower whose mask is not causal (here: none masked) is encoded at full length."""
    import copy

    from fewshot_studio.backbone import _truncatable

    model = copy.deepcopy(tiny.model)
    model.attn_mask = torch.zeros_like(model.attn_mask)
    assert not _truncatable(model)
    model.attn_mask = tiny.model.attn_mask.clone()
    model.text_pool_type = "last"
    assert not _truncatable(model)
