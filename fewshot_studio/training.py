"""Fit-loop helpers shared by the methods: seeding, optimiser schedules, progress and cancel."""
from __future__ import annotations

import math
import random
from typing import Callable, Iterable

import numpy as np
import torch

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
    """Cosine decay to 0 over total_steps with optional linear warm-up (as in CoOp/MMA code)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless shuffled index batches (each epoch a fresh permutation)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]
