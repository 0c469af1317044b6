"""Fit-loop helpers shared by the methods: seeding, optimiser schedules, batches, the Dassl
train-time augmentation, progress and cancel."""
from __future__ import annotations

import math
import random
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from .errors import Cancelled
from .progress import CancelFlag, Progress, ProgressFn


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator for the method's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_cancel(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 0):
    """Cosine decay to 0 over total_steps, updated every step, with optional linear warm-up.

    This is the few-shot default of the methods here, not the CoOp/MMA code's schedule: that one
    is Dassl's `CosineAnnealingLR(T_max=max_epoch)` stepped once per epoch (see
    `epoch_cosine_lr` and MMA's `recipe="official"`). Per step, a run of a dozen steps still
    decays smoothly instead of holding each epoch's rate for a few steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_cosine_lr(base_lr: float, epochs: int, epoch: int) -> float:
    """The learning rate during 0-based `epoch` under `CosineAnnealingLR(T_max=epochs)` stepped
    once per epoch with no warm-up (Dassl's "cosine" scheduler, as in the CoOp/MMA configs):
    base_lr · ½ (1 + cos(π · epoch / epochs)); the last epoch runs at base_lr · ½ (1 + cos(π (E−1)/E)),
    never at 0."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel for all parameters where this torch build has that for the
    parameters' device and dtype (a small adapter's step is otherwise mostly per-op overhead),
    else the multi-tensor (foreach) form; both compute the same update."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def run_steps(
    step_fn: Callable[[int], tuple[float, float]],
    total: int,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
    stage: str = "Training",
    report_every: int = 1,
) -> list[dict]:
    """Run `total` optimisation steps. `step_fn(step) -> (loss, train_accuracy)`.

    Checks `cancel` before every step (so cancel lands within one step) and reports
    Progress; returns the loss/accuracy history for the curve.
    """
    history: list[dict] = []
    for step in range(total):
        check_cancel(cancel)
        loss, acc = step_fn(step)
        history.append({"step": step + 1, "loss": float(loss), "accuracy": float(acc)})
        if progress is not None and ((step + 1) % report_every == 0 or step + 1 == total):
            progress(Progress(stage, step + 1, total, float(loss), float(acc)))
    return history


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless shuffled index batches as Dassl's training loader draws them (RandomSampler,
    `drop_last=len(data) >= batch_size`): each epoch a fresh permutation cut into n // batch_size
    full batches, the remainder dropped; with fewer than batch_size images, one batch of all n;
    with none, nothing."""
    per_epoch = batches_per_epoch(n, batch_size)
    size = batch_size if n >= batch_size else n
    while per_epoch:  # no images: no batches (rather than an endless loop of empty epochs)
        perm = torch.randperm(n, generator=generator)
        for b in range(per_epoch):
            yield perm[b * size:(b + 1) * size]


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch of `epoch_batches`: n // batch_size, or 1 when 0 < n < batch_size."""
    return 0 if n <= 0 else max(1, n // batch_size)


def random_resized_crop_flip(img: Image.Image, size: int, generator: torch.Generator,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """(size, size, 3) uint8: torchvision's `RandomResizedCrop(size, scale, ratio, BICUBIC)` then
    `RandomHorizontalFlip()` on a PIL image, the train transform of the CoOp/MMA configs (Dassl
    `random_resized_crop, random_flip` with INTERPOLATION "bicubic" and RRCROP_SCALE (0.08, 1)).
    The same draws, in the same order and float32 arithmetic, as torchvision's `get_params` and
    `forward`, but from `generator` rather than torch's global generator, so a fit is
    reproducible and does not race other threads for the global one (tests compare it with
    torchvision pixel for pixel)."""
    width, height = img.size
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            break
    else:  # torchvision's fallback: the central crop of the allowed aspect ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    crop = img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BICUBIC)
    if torch.rand(1, generator=generator) < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless shuffled index batches (each epoch a fresh permutation)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]
