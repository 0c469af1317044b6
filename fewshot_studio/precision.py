"""The one mixed-precision policy: what runs under autocast, and in which dtype.

On CUDA, bf16 where the GPU supports it, else fp16; elsewhere (CPU, MPS) nothing, so results
there stay exact fp32. Why bf16 first: it keeps fp32's 8-bit exponent, so the adapters' small
gradients neither underflow nor need a loss scaler; fp16 has a narrower range and is used only
on GPUs without bf16 (MMA then trains with a gradient scaler). The frozen backbone's encoding
(`Backbone.autocast`), the methods' training and inference and the bench all use this policy.
The one exception is a recipe that names its own precision: MMA's `recipe="official"` trains in
fp16 with a gradient scaler on CUDA, as the official code's `PREC: "amp"` does (`autocast_as`).
"""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype for a device type ("cuda", "cpu", "mps", ...), or None for none
    (plain fp32): bf16 on CUDA where `bf16_supported`, fp16 on CUDA without it, None elsewhere."""
    if device_type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported else torch.float16


def autocast_for(device: torch.device | str):
    """A context manager applying the policy on `device` (see `autocast_dtype`); a no-op off CUDA."""
    device = torch.device(device)
    dtype = autocast_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_as(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast to `dtype` on a CUDA `device` (a recipe's own precision); a no-op when `dtype` is
    None or off CUDA, where training stays exact fp32."""
    device = torch.device(device)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
