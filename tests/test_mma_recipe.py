"""MMA's `recipe="official"`: the official code's schedule (Dassl CosineAnnealingLR(T_max=epochs)
stepped per epoch, drop-last batches), fresh RandomResizedCrop(0.08-1, bicubic) + flip every
step, fp16 + GradScaler on CUDA only; the default recipe unchanged; the field saved and loaded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NATO
from fewshot_studio.errors import DataError
from fewshot_studio.methods import catalog, load_model, make_method
from fewshot_studio.methods import mma as mma_mod
from fewshot_studio.methods.mma import MMA, MMAConfig, training_precision
from fewshot_studio.training import batches_per_epoch, epoch_batches, epoch_cosine_lr, random_resized_crop_flip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _subset(nato_task, per_class: int):
    support, _, _ = nato_task
    keep = [i for c in range(support.num_classes)
            for i in [j for j, y in enumerate(support.labels) if y == c][:per_class]]
    return support.subset(keep)


# ---- schedule -----------------------------------------------------------------------------------
def _reference_lrs(lr: float, epochs: int, per_epoch: int) -> list[float]:
    """The official loop transcribed: Dassl's build_lr_scheduler("cosine") is
    CosineAnnealingLR(optim, float(max_epoch)); the trainer calls update_lr() when
    batch_idx + 1 == num_batches, i.e. once per epoch after its last batch."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    out = []
    for _ in range(epochs):
        for b in range(per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if b + 1 == per_epoch:
                sched.step()
    return out


@pytest.mark.parametrize("per_class,batch_size,epochs", [(4, 8, 4), (2, 16, 3)])
def test_official_lr_per_step_is_cosine_annealing_stepped_per_epoch(tiny, nato_task, per_class,
                                                                       batch_size, epochs):
    support = _subset(nato_task, per_class)  # 20 images: 2 full batches of 8 (4 dropped); 10 < 16: one batch
    n = len(support.images)
    m = make_method("mma", tiny, support.classnames, recipe="official", epochs=epochs, batch_size=batch_size,
                    lr=0.002, min_steps=300, steps=1000, warmup=5)  # min_steps, steps, warmup: default recipe only
    per_epoch = n // batch_size if n >= batch_size else 1
    assert m.num_steps(n) == epochs * per_epoch
    m.fit(support, None)
    lrs = [h["lr"] for h in m.history]
    assert len(lrs) == epochs * per_epoch
    # the closed form of CosineAnnealingLR(T_max=E): epoch e runs at lr·½(1 + cos(π e / E))
    expected = [0.002 * 0.5 * (1 + math.cos(math.pi * (s // per_epoch) / epochs)) for s in range(len(lrs))]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lrs, _reference_lrs(0.002, epochs, per_epoch), rtol=1e-12, atol=1e-15)
    assert lrs[0] == 0.002 and len(set(lrs)) == epochs  # constant within an epoch, never warmed up
    assert [epoch_cosine_lr(0.002, epochs, e) for e in range(epochs)] == pytest.approx(sorted(set(lrs), reverse=True))
    assert m.metrics["recipe"] == "official" and m.metrics["steps"] == len(lrs)


def test_default_recipe_schedule_unchanged(tiny, nato_task):
    """Default: per-step cosine over max(epochs·ceil(N/bs), min_steps) or `steps`, with warm-up."""
    support = _subset(nato_task, 2)
    m = make_method("mma", tiny, support.classnames, steps=8, warmup=2, augment_views=2, lr=0.001)
    assert m.config.recipe == "default"
    m.fit(support, None)
    lrs = [h["lr"] for h in m.history]
    expected = [0.001 * (s + 1) / 2 if s < 2 else 0.001 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))
                for s in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert make_method("mma", tiny, list(NATO)).num_steps(20) == 300  # the few-shot floor still holds


def test_per_step_cosine_is_tip_adapter_f_official_schedule():
    """Tip-Adapter-F's docstring: cosine_schedule(opt, total) is the official
    CosineAnnealingLR(T_max=train_epoch·len(loader)) stepped every iteration."""
    from fewshot_studio.training import cosine_schedule

    def run(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3, eps=1e-4)
        sched = make(opt)
        out = []
        for _ in range(37):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = run(lambda o: cosine_schedule(o, 37))
    official = run(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 37))
    np.testing.assert_allclose(ours, official, rtol=1e-9, atol=1e-15)


def test_epoch_batches_drop_last_like_dassl():
    g = torch.Generator().manual_seed(0)
    it = epoch_batches(20, 8, g)
    epoch = [next(it) for _ in range(2)]
    assert [len(b) for b in epoch] == [8, 8] and len(set(torch.cat(epoch).tolist())) == 16  # 4 dropped
    assert batches_per_epoch(20, 8) == 2 and batches_per_epoch(5, 8) == 1 and batches_per_epoch(0, 8) == 0
    small = epoch_batches(5, 8, g)
    assert sorted(next(small).tolist()) == [0, 1, 2, 3, 4]  # fewer than a batch: one batch of all


# ---- augmentation -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(97, 61), (40, 300), (300, 40), (64, 64)])
def test_random_resized_crop_flip_equals_torchvision(size):
    """Pixel for pixel torchvision's RandomResizedCrop(scale=(0.08, 1), BICUBIC) + RandomHorizontalFlip
    with the same seed; (40, 300) and (300, 40) reach torchvision's central-crop fallback."""
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tf = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip()])
    for seed in range(12):
        torch.manual_seed(seed)
        ref = np.asarray(tf(img))
        got = random_resized_crop_flip(img, 32, torch.Generator().manual_seed(seed))
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, ref)
    # a bilinear resize differs: the equality above does pin bicubic
    torch.manual_seed(3)
    bilinear = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BILINEAR),
                          T.RandomHorizontalFlip()])
    assert not np.array_equal(np.asarray(bilinear(img)), random_resized_crop_flip(img, 32, torch.Generator().manual_seed(3)))


def test_official_draws_fresh_crops_of_full_size_images_every_step(tiny, nato_task, monkeypatch):
    support = _subset(nato_task, 2)  # 10 images < batch 16: every step crops every image
    calls = []
    real = mma_mod.random_resized_crop_flip

    def spy(img, size, generator, *args, **kwargs):
        out = real(img, size, generator, *args, **kwargs)
        calls.append((img.size, size, args, kwargs, out))
        return out

    monkeypatch.setattr(mma_mod, "random_resized_crop_flip", spy)
    m = make_method("mma", tiny, support.classnames, recipe="official", epochs=3)
    data = m.prepare_training(support)
    assert data.num_views == 1 and data.originals is not None  # the plain view only: no cached crops
    assert [im.size for im in data.originals] == [r.open().size for r in support.images]
    m.fit(support, None)
    assert len(calls) == 3 * 10
    # scale (0.08, 1), ratio 3/4-4/3 and bicubic: the function's defaults, which MMA does not override
    assert all(a == () and k == {} and s == tiny.image_size for _, s, a, k, _ in calls)
    assert all(full == support.images[0].open().size for full, *_ in calls)  # cropped from the full image
    crops = np.stack([c[-1] for c in calls]).reshape(3, 10, -1)
    assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2])  # fresh each step


def test_official_is_deterministic_for_a_seed(tiny, nato_task):
    support = _subset(nato_task, 2)
    a = make_method("mma", tiny, support.classnames, recipe="official", epochs=2, seed=3)
    b = make_method("mma", tiny, support.classnames, recipe="official", epochs=2, seed=3)
    a.fit(support, None)
    b.fit(support, None)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_official_refuses_images_too_big_to_hold(tiny, nato_task, monkeypatch):
    support = _subset(nato_task, 2)
    monkeypatch.setattr(MMA, "ORIGINALS_BYTES", 1000)
    m = make_method("mma", tiny, support.classnames, recipe="official")
    with pytest.raises(DataError, match="official recipe keeps every support image decoded"):
        m.fit(support, None)


# ---- precision ----------------------------------------------------------------------------------
def test_precision_of_each_recipe():
    assert training_precision("official", "cuda", True) == (torch.float16, True)   # amp = fp16 + scaler,
    assert training_precision("official", "cuda", False) == (torch.float16, True)  # even where bf16 exists
    assert training_precision("default", "cuda", True) == (torch.bfloat16, False)
    assert training_precision("default", "cuda", False) == (torch.float16, True)
    for recipe in ("default", "official"):
        for dev in ("cpu", "mps"):
            assert training_precision(recipe, dev, False) == (None, False)  # fp32, no scaler


def test_official_on_cpu_trains_fp32_without_scaler(tiny, nato_task):
    support = _subset(nato_task, 1)
    m = make_method("mma", tiny, support.classnames, recipe="official", epochs=1)
    m.fit(support, None)
    assert m.train_dtype is None and not m.scaler_used and m.metrics["precision"] == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler is the CUDA path")
def test_official_on_cuda_trains_fp16_with_grad_scaler(nato_task, monkeypatch):
    from fewshot_studio.backbone import load_backbone

    scaled = []
    real = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: scaled.append(x.dtype) or real(self, x))
    gpu = load_backbone("tiny", device="cuda")
    support = _subset(nato_task, 2)
    m = make_method("mma", gpu, support.classnames, recipe="official", epochs=2)
    m.fit(support, None)
    assert m.train_dtype == torch.float16 and m.scaler_used and m.metrics["precision"] == "fp16 + GradScaler"
    assert len(scaled) == 2
    d = make_method("mma", gpu, support.classnames, steps=2, augment_views=1)
    d.fit(support, None)
    bf16 = torch.cuda.is_bf16_supported()
    assert d.train_dtype == (torch.bfloat16 if bf16 else torch.float16) and d.scaler_used == (not bf16)


# ---- the setting ---------------------------------------------------------------------------------
def test_recipe_is_a_setting_with_fixed_choices(tiny):
    assert catalog.setting_choices("mma") == {"recipe": ("default", "official")}
    assert catalog.coerce_settings("mma", {"recipe": "official"}) == {"recipe": "official"}
    with pytest.raises(DataError, match=r"^The MMA setting 'recipe' must be one of default, official, not 'fast'\.$"):
        catalog.coerce_settings("mma", {"recipe": "fast"})
    with pytest.raises(DataError, match="recipe must be one of default, official"):
        MMA(tiny, list(NATO), config=MMAConfig(recipe="fast"))
    with pytest.raises(DataError, match="has no setting 'recipe'"):
        catalog.coerce_settings("tip", {"recipe": "official"})


def test_choices_checked_at_registration():
    from dataclasses import dataclass, field

    from fewshot_studio.methods.base import MethodConfig

    @dataclass
    class Bad(MethodConfig):
        mode: str = field(default="c", metadata={"choices": ("a", "b")})

    cls = type("BadChoice", (MMA,), {"name": "bad-choice", "label": "Bad", "Config": Bad})
    try:
        with pytest.raises(ValueError, match="not one of its choices"):
            catalog.register(cls)
    finally:
        catalog.unregister("bad-choice")


def test_recipe_round_trips_through_save_and_load(tiny, nato_task, tmp_path):
    support, test, _ = nato_task
    small = _subset(nato_task, 1)
    m = make_method("mma", tiny, small.classnames, recipe="official", epochs=2)
    m.fit(small, None)
    m.save(tmp_path / "m")
    back = load_model(tmp_path / "m", tiny)
    assert back.config.recipe == "official" and back.metrics["recipe"] == "official"
    torch.testing.assert_close(back.predict_proba(test[:10], None), m.predict_proba(test[:10], None))


@pytest.mark.slow  # runs the CLI in subprocesses
def test_cli_train_recipe(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from fewshot_studio import shapes

    shapes.write_image_folder(tmp_path / "train", {"red circle": "red circle", "blue square": "blue square"},
                              per_class=2, seed=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEWSHOT_STUDIO_CACHE": str(tmp_path / "cache")}

    def train(method, *extra):
        return subprocess.run([sys.executable, "-m", "fewshot_studio", "train", "--data", str(tmp_path / "train"),
                               "--method", method, "--backbone", "tiny", "--out", str(tmp_path / method),
                               "--quiet", *extra], capture_output=True, text=True, env=env, timeout=300)

    r = train("mma", "--recipe", "official", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "mma" / "config.json").read_text())
    assert cfg["hyperparameters"]["recipe"] == "official" and cfg["metrics"]["steps"] == 2
    r = train("tip", "--recipe", "official")
    assert r.returncode != 0 and "Tip-Adapter has no setting 'recipe'" in r.stderr
    r = train("mma", "--recipe", "fast")
    assert r.returncode != 0 and "must be one of default, official, not 'fast'" in r.stderr
