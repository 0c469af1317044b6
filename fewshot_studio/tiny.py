"""The `tiny` offline backbone: a small open_clip CLIP pretrained by this project
(docs/design.md, "The tiny backbone").

`python -m fewshot_studio pretrain-tiny` regenerates `weights/fewshot-tiny.safetensors`
deterministically from a seed: contrastive training on synthetic captioned shapes
(see `shapes.py`), with soft targets because identical classes repeat in a batch.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

MODEL_NAME = "fewshot-tiny"
WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_PATH = WEIGHTS_DIR / f"{MODEL_NAME}.json"
WEIGHTS_PATH = WEIGHTS_DIR / f"{MODEL_NAME}.safetensors"

_registered = False


def register() -> None:
    """Make `fewshot-tiny` a model name open_clip's factory knows (config shipped as JSON)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_PATH)
        _registered = True


def create_untrained(seed: int = 0):
    """A randomly initialised `fewshot-tiny` CLIP plus its tokenizer."""
    import open_clip

    register()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def _normalise(images: np.ndarray) -> torch.Tensor:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy over all CLASSES with the prompt "a photo of a {class}."."""
    model.eval()
    with torch.inference_mode():
        t = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in shapes.CLASSES])), dim=-1)
        x = _normalise(images)
        f = torch.cat([F.normalize(model.encode_image(x[i:i + 512]), dim=-1) for i in range(0, len(x), 512)])
    return float(((f @ t.T).argmax(1).numpy() == labels).mean())


def pretrain(
    out: Path = WEIGHTS_PATH,
    seed: int = 0,
    n_images: int = 20_000,
    steps: int = 800,
    batch_size: int = 256,
    lr: float = 2e-3,
    log: Callable[[str], None] = print,
) -> dict:
    """Contrastive pretraining (AdamW, one-cycle LR) with class-aware soft targets."""
    from safetensors.torch import save_file

    t0 = time.time()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    images, labels = shapes.make_dataset(n_images, seed=seed)
    log(f"generated {n_images} images in {time.time() - t0:.0f}s")
    model, tokenizer = create_untrained(seed)
    model.train()
    rng = np.random.default_rng(seed + 1)
    # captions: every (class, template) pair tokenised once
    n_t = len(shapes.CAPTION_TEMPLATES)
    captions = [t.format(c) for c in shapes.CLASSES for t in shapes.CAPTION_TEMPLATES]
    tokens = tokenizer(captions)
    x_all = _normalise(images)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = rng.integers(0, n_images, size=batch_size)
        y = torch.from_numpy(labels[idx])
        tmpl = torch.from_numpy(rng.integers(0, n_t, size=batch_size))
        img = x_all[idx]
        # cheap augmentation: horizontal flips keep the caption true
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        img = torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)
        fi = F.normalize(model.encode_image(img), dim=-1)
        ft = F.normalize(model.encode_text(tokens[y * n_t + tmpl]), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.T
        same = (y[:, None] == y[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    test_images, test_labels = shapes.make_dataset(2000, seed=seed + 12345)
    acc = zero_shot_accuracy(model, tokenizer, test_images, test_labels)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"seed": str(seed), "steps": str(steps), "zero_shot_acc": f"{acc:.4f}"})
    info = {"seconds": round(time.time() - t0, 1), "zero_shot_accuracy": acc, "path": str(out)}
    log(json.dumps(info))
    return info
