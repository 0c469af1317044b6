"""MMA — Multi-Modal Adapter: Yang et al., "MMA: Multi-Modal Adapter for Vision-Language Models",
CVPR 2024; official code https://github.com/ZjjConan/Multi-Modal-Adapter.

Small bottleneck adapters sit in the higher transformer blocks of *both* CLIP towers. For every
adapted block i there is a text branch (down_t, up_t), a visual branch (down_v, up_v) and one
shared Linear(r→r)+ReLU used by both branches of that block, which couples the modalities:

    y = scale · up(shared(down(ln_1(x))))        block output = block(x) + y

with x the block input, ln_1 the block's own first LayerNorm, r = 32 and scale = 0.001. As in the
official code, the adapter branch is wrapped in two gradient-scaling layers (identity forward):
its input gets gradient × scale and its output gradient × 1/scale. The adapter weights therefore
receive the gradient they would get with scale = 1 ("learns as if unscaled"), while the gradient
that flows back into the residual stream is the true gradient of the scaled branch.

The shared open_clip model is never modified: this module runs the towers itself, calling the
model's own embedding, block, pooling and projection modules, so other methods can use the same
backbone concurrently and, with scale = 0, the result equals `encode_image` / `encode_text`.

Efficiency: the blocks below the first adapted block never see an adapter, so their outputs depend
only on the input. Training computes them once per (support image, augmented view) and per class
prompt and then runs only the adapted blocks forward and backward (`cache_lower=True`, the
default; `cache_lower=False` runs the whole towers every step and gives the same numbers).
Class prompts are also cut after their last end-of-text token (exact under CLIP's causal mask with
end-of-text pooling), so the text tower runs on ~10 positions instead of 77.

Default schedule: the paper trains 5 epochs with batch 16 on 16-shot data sets of hundreds of
images. With the handful of images a user gives, 5 epochs are a dozen optimiser steps and nothing
moves (docs/design.md, "Methods": a faithful MMA on the tiny backbone needed ~75 steps to go from 21% to 64%
held-out accuracy on a 5-class task), so the number of steps is

    steps = config.steps  if given,  else  max(epochs · ceil(N / batch_size), min_steps)

with min_steps = 300. Why 300: with the faithful scale (0.001) and gradient rescaling, the adapters'
effect on the features grows slowly at first and then quickly (a plateau), and on the tiny backbone
(5 classes × 4 shots, uninformative names, zero-shot 20%) held-out accuracy over two seeds was
20%/20% after 50 steps, 28%/24% after 100, 70%/41% after 150, 71%/61% after 200 and 99%/79% after
300. Only data sets under 960 images (5 epochs × 60 batches of 16) are affected; a 16-shot,
100-class data set still runs the paper's 5 epochs' worth of steps. On one CPU thread a step
costs ~20 ms on the tiny backbone and ~1 s on ViT-B-32 (batch 16), so there use a GPU or lower
`steps`.

Recipes (`recipe`). The default above is this project's few-shot recipe; `recipe="official"`
trains exactly as the official code does (configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml,
trainers/mmadapter.py, and Dassl's build_lr_scheduler, build_transform and data loader):

                  default (few-shot)                      official
    steps         max(epochs·ceil(N/bs), min_steps=300),  epochs · batches, batches = N // bs
                  or `steps`                              (drop_last), 1 when N < bs
    schedule      cosine to 0 over the steps, updated     CosineAnnealingLR(T_max=epochs), stepped
                  every step, optional `warmup` steps     after each epoch's last batch; no warm-up
    augmentation  `augment_views` crops per image (scale  a fresh RandomResizedCrop(scale 0.08-1,
                  0.5-1, bicubic, flip), drawn once and   ratio 3/4-4/3, bicubic) + flip of the
                  cached with the lower blocks            full-size image every step
    precision     bf16 autocast on CUDA where supported   fp16 autocast + GradScaler on CUDA
                  (else fp16 + GradScaler); CPU fp32      (PREC "amp"); CPU fp32 (amp is CUDA-only)

Shared: SGD lr 0.0015, momentum 0.9, weight decay 5e-4, batch 16, 5 epochs, r = 32, scale 0.001,
blocks 5-12 of 12, "a photo of a {}.". Under the official recipe `steps`, `min_steps`, `warmup`
and `augment_views` do not apply; the lower text blocks are still cached (prompts do not change),
the visual tower runs whole on every fresh crop. Why the default differs: with a user's few images
the official recipe is a handful of steps that leave the adapters where they started. Measured on
the tiny backbone, 5 classes × 4 shots with uninformative names, held-out accuracy, seeds 0/1
(zero-shot 20%/22%): official 20%/22% (5 steps), official with 60 epochs 20%/22% (60 steps),
official with 100 epochs at batch 4 99%/100% (500 steps), default 99%/98% (300 steps): the
number of steps decides, not the schedule or the crops. Per-step cosine keeps the decay smooth
over any number of steps; cached crops let a step run only the adapted blocks (official steps
cost 1.3-1.5× as much on the tiny backbone, 5 × 16 images, batch 16: 212 against 143-168 ms on
a busy CPU) and need no decoded originals in memory; bf16 keeps fp32's range without a scaler.
The official recipe holds the support images decoded at full size (at most ORIGINALS_BYTES).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import ImageRef, SupportSet
from ..errors import BackboneError, DataError
from ..features import load_pixels
from ..precision import autocast_as, autocast_dtype, autocast_for
from ..preprocess import normalize
from ..progress import Progress
from ..prompts import class_prompts
from ..training import (batches_per_epoch, check_cancel, cosine_schedule, epoch_batches, minibatches,
                        random_resized_crop_flip, run_steps, seed_everything)
from .base import KnowledgeGraph, Method, MethodConfig, cosine_matrix, register


# ---- gradient rescaling ----------------------------------------------------------------------
class GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by `scale` in the backward
    pass (the official code's GradientScaleLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradScale.apply(x, scale)


# ---- configuration -----------------------------------------------------------------------------
RECIPES = ("default", "official")


def training_precision(recipe: str, device_type: str, bf16_supported: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler scales the loss) of a training run.
    Official recipe: fp16 autocast + GradScaler on CUDA (the MMA code's PREC "amp": torch.cuda.amp
    autocast, whose dtype is fp16, and GradScaler), fp32 elsewhere. Default recipe: the project's
    policy (precision.py: bf16 where the GPU has it, else fp16, which then needs the scaler)."""
    if device_type != "cuda":
        return None, False  # CPU/MPS: exact fp32 in both recipes; the official "amp" is CUDA-only
    dtype = torch.float16 if recipe == "official" else autocast_dtype(device_type, bf16_supported)
    return dtype, dtype == torch.float16


@dataclass
class MMAConfig(MethodConfig):
    # adapter bottleneck width r
    # (the paper uses 32; every adapted block adds parameters in proportion: at most 256)
    rank: int = field(default=32, metadata={"help": "adapter width r", "min": 1, "max": 256})
    # adapter output scale
    # (the adapters' output is added to features of norm ~1: more than 10 drowns them)
    scale: float = field(default=0.001, metadata={"help": "adapter scale", "min": 0, "max": 10})
    # first adapted block, 1-based; None: top two-thirds
    # (1-based; the method checks both against the backbone's depth; no CLIP tower has 1000 blocks)
    start_block: int | None = field(default=None, metadata={"help": "first adapted block (blank: top ⅔)",
                                                            "min": 1, "max": 1000})
    # last adapted block, 1-based, inclusive; None: the last block
    end_block: int | None = field(default=None, metadata={"help": "last adapted block (blank: last)",
                                                          "min": 1, "max": 1000})
    template: str = field(default="a photo of a {}.", metadata={"help": "prompt template"})
    # paper setting; at most 100 (20× the paper): an epoch is N / batch_size steps of the tower
    epochs: int = field(default=5, metadata={"help": "epochs", "min": 1, "max": 100})
    # total optimiser steps; overrides epochs and min_steps
    # (a few-shot run never needs more than 20,000; bounds one job to minutes on a GPU)
    steps: int | None = field(default=None, metadata={"help": "steps (blank: max(epochs, minimum); default recipe)",
                                                      "min": 1, "max": 20_000})
    # floor on the optimiser steps (see the module docstring)
    min_steps: int = field(default=300, metadata={"help": "minimum steps (default recipe)", "min": 0, "max": 20_000})
    # (images through the upper tower with gradients: more than 512 only runs out of memory)
    batch_size: int = field(default=16, metadata={"help": "batch size", "min": 1, "max": 512})
    # (SGD: above 1 only diverges; 0 trains nothing)
    lr: float = field(default=0.0015, metadata={"help": "learning rate", "min": 1e-7, "max": 1})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0, "max": 1})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay", "min": 0, "max": 1})
    warmup: int = field(default=0, metadata={"help": "warm-up steps (default recipe)", "min": 0, "max": 20_000})
    # augmented views per support image, besides the plain view
    # (each view is one more encoded and cached image per support image: at most 64)
    augment_views: int = field(default=8, metadata={"help": "augmented views per image (default recipe)",
                                                    "min": 0, "max": 64})
    # cache the outputs of the blocks below the first adapted one
    cache_lower: bool = field(default=True, metadata={"help": "cache the lower blocks"})
    # "default": the few-shot recipe above; "official": the MMA code's (module docstring, "Recipes")
    recipe: str = field(default="default", metadata={
        "help": "training recipe: default (few-shot) or official (the MMA code's)",
        "choices": RECIPES})


#: Above this estimate (seconds) a CPU training says how long it will take and what is faster.
ESTIMATE_SAY_SECONDS = 20.0


def _duration(seconds: float) -> str:
    """"40 s", "5 min", "1 h 10 min": the estimate, rounded as a person would say it."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def auto_start_block(layers: int) -> int:
    """1-based first block of the top two-thirds: 5 of 12, 3 of 6."""
    return layers - round(2 * layers / 3) + 1


# ---- adapters ----------------------------------------------------------------------------------
def _down(d_in: int, r: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, r), nn.ReLU())


class BlockAdapter(nn.Module):
    """The three adapters of one adapted block index: text, visual and the shared one."""

    def __init__(self, d_text: int, d_visual: int, r: int):
        super().__init__()
        self.text_down = _down(d_text, r)
        self.text_up = nn.Linear(r, d_text)
        self.visual_down = _down(d_visual, r)
        self.visual_up = nn.Linear(r, d_visual)
        self.shared = nn.Sequential(nn.Linear(r, r), nn.ReLU())  # one module, used by both branches

    def branch(self, kind: str) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(down, shared, up) of the "text" or "visual" branch; `shared` is the same object in both."""
        if kind == "text":
            return self.text_down, self.shared, self.text_up
        return self.visual_down, self.shared, self.visual_up

    @staticmethod
    def num_parameters(d_text: int, d_visual: int, r: int) -> int:
        return (2 * d_text * r + r + d_text) + (2 * d_visual * r + r + d_visual) + (r * r + r)


# ---- tower access ------------------------------------------------------------------------------
class _Tower:
    """Uniform access to one open_clip transformer tower: embed → blocks → head."""

    def __init__(self, kind: str, model: nn.Module):
        self.kind = kind
        self.model = model
        if kind == "visual":
            v = model.visual
            self.transformer = v.transformer
        elif hasattr(model, "text") and hasattr(model.text, "transformer"):  # CustomTextCLIP
            self.transformer = model.text.transformer
        else:  # CLIP: text tower's modules live on the model itself
            self.transformer = model.transformer
        self.blocks = self.transformer.resblocks
        self.width = int(self.transformer.width)
        self.batch_first = getattr(self.transformer, "batch_first", True)

    def embed(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input (pixels or tokens) -> (block-0 input in N,L,D layout, attention mask)."""
        m = self.model
        if self.kind == "visual":
            return m.visual._embeds(inputs), None
        n = inputs.shape[1]
        if hasattr(m, "text") and hasattr(m.text, "_embeds"):
            x, mask = m.text._embeds(inputs)
            if mask is not None and mask.ndim == 2 and mask.shape[-1] > x.shape[1]:
                mask = mask[:x.shape[1], :x.shape[1]]  # tokens truncated after the end-of-text token
            return x, mask
        cast = self.transformer.get_cast_dtype()
        x = m.token_embedding(inputs).to(cast)
        x = x + m.positional_embedding[:n].to(cast)
        mask = m.attn_mask
        if mask is not None and mask.shape[-1] > n:
            mask = mask[:n, :n]
        return x, mask

    def _eot_positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The end-of-text position of each prompt that end-of-text pooling reads, under a causal
        mask; None for any other text tower (class token, padding mask, other pooling)."""
        m = self.model
        if hasattr(m, "text") and hasattr(m.text, "_embeds"):
            t = m.text
            if t.attn_mask is None or t.cls_emb is not None or getattr(t, "use_pad_mask", False):
                return None
            pool, eos = t.pool_type, getattr(t, "eos_id", None)
        else:
            if getattr(m, "attn_mask", None) is None:
                return None
            pool, eos = m.text_pool_type, getattr(m, "text_eos_id", None)
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos" and eos is not None:
            return (tokens == eos).int().argmax(dim=-1)
        return None

    def truncation_length(self, tokens: torch.Tensor) -> int | None:
        """With a causal mask and end-of-text pooling, positions after the last end-of-text token
        cannot influence the pooled feature, so the towers may run on tokens[:, :length] and give
        the same result (77 -> ~10 positions for CLIP prompts). None when that is not safe."""
        idx = self._eot_positions(tokens)
        return int(idx.max()) + 1 if idx is not None and tokens.numel() else None

    def pooled_rows(self, n: int, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """(n,) the one position per input of the last block's output that `head` reads (the
        class token of a ViT, the end-of-text token of a prompt), or None where the head reads
        more than one (average or attention pooling)."""
        if self.kind == "visual":
            v = self.model.visual
            if getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", None) == "tok":
                return torch.zeros(n, dtype=torch.long)
            return None
        return self._eot_positions(tokens) if tokens is not None else None

    def head(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the last block (N,L,D) -> unnormalised embedding."""
        m = self.model
        if self.kind == "visual":
            pooled, _ = m.visual._pool(x)
            if m.visual.proj is not None:
                pooled = pooled @ m.visual.proj
            return pooled
        from open_clip.transformer import text_global_pool

        if hasattr(m, "text") and hasattr(m.text, "_embeds"):
            t = m.text
            if t.cls_emb is not None:
                pooled = t.ln_final(text_global_pool(x, pool_type="last"))
            else:
                pooled = text_global_pool(t.ln_final(x), tokens, pool_type=t.pool_type,
                                          eos_token_id=getattr(t, "eos_id", None))
            proj = t.text_projection
        else:
            pooled = text_global_pool(m.ln_final(x), tokens, m.text_pool_type,
                                      eos_token_id=getattr(m, "text_eos_id", None))
            proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled


def _plain_block(blk: nn.Module) -> bool:
    """An open_clip self-attention block whose forward `_block_rows` reproduces."""
    from open_clip.transformer import ResidualAttentionBlock

    return type(blk) is ResidualAttentionBlock and not hasattr(blk, "ln_1_kv") \
        and isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) and blk.attn.batch_first


def _block_rows(blk: nn.Module, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                rows: torch.Tensor) -> torch.Tensor:
    """ResidualAttentionBlock.forward for one query row per input: q (N,1,D) = x[n, rows[n]],
    attending to every position of x (N,L,D) under row rows[n] of the (L,L) attention mask."""
    if mask is not None:
        heads = blk.attn.num_heads
        mask = mask.to(q.dtype)[rows].unsqueeze(1)  # (N,1,L): each query row's own mask row
        mask = mask.repeat_interleave(heads, dim=0)  # (N*heads,1,L), as nn.MultiheadAttention wants
    kv = blk.ln_1(x)
    h = q + blk.ls_1(blk.attn(blk.ln_1(q), kv, kv, need_weights=False, attn_mask=mask)[0])
    return h + blk.ls_2(blk.mlp(blk.ln_2(h)))


def _check_transformer(backbone) -> None:
    model = backbone.model
    visual = getattr(model, "visual", None)
    ok_visual = visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks") \
        and hasattr(visual, "_embeds") and hasattr(visual, "_pool")
    ok_text = hasattr(getattr(model, "transformer", None), "resblocks") or \
        hasattr(getattr(getattr(model, "text", None), "transformer", None), "resblocks")
    if not (ok_visual and ok_text):
        which = f"image tower ({type(visual).__name__})" if not ok_visual else "text tower"
        raise BackboneError(
            f"MMA puts its adapters inside transformer blocks, but the {which} of backbone {backbone.id} "
            f"is not a transformer; pick a ViT backbone such as ViT-B-32, or another method.")


# ---- training data -----------------------------------------------------------------------------
@dataclass
class MMATrainData:
    """What one fit trains on. `images` holds, per support image and view, either the outputs of
    the visual blocks below the first adapted one (cached) or the preprocessed pixels (uncached);
    `text` likewise for the class prompts."""

    cached: bool
    images: torch.Tensor     # (N, V, ...) lower-block outputs or pixels
    labels: torch.Tensor     # (N,)
    text: torch.Tensor       # (C, L, D) lower-block outputs, or (C, ctx) tokens
    text_mask: torch.Tensor | None
    tokens: torch.Tensor     # (C, ctx)
    # official recipe: the decoded support images, cropped afresh every step (images then holds
    # the plain view only, for the visual means)
    originals: list[Image.Image] | None = None

    @property
    def num_images(self) -> int:
        return int(self.labels.numel())

    @property
    def num_views(self) -> int:
        return int(self.images.shape[1]) if self.images.ndim > 1 else 0


@register
class MMA(Method):
    name = "mma"
    label = "MMA"
    summary = ("MMA (Yang et al., CVPR 2024): adapters in the top two-thirds of both towers, r = 32, scale 0.001, "
               "SGD lr 0.0015; at least 300 steps however few images you have.")
    cost = 5
    auto_candidate = "gpu"  # ~0.9 s a step on a CPU: minutes per fit
    order = 1
    Config = MMAConfig
    needs_images = False  # image-less classes still work through the adapted text encoder
    feature_views = 1  # MMA keeps its own lower-block cache; it reads only plain views from the extractor
    GPU_CACHE_BYTES = 2 * 2**30  # largest lower-block cache kept in accelerator memory
    # official recipe: the most decoded support-image bytes held for fresh crops (a 12-megapixel
    # photo is 36 MB decoded; 4 GiB holds ~110 of them, or ~1800 at 1024×768)
    ORIGINALS_BYTES = 4 * 2**30

    def __init__(self, backbone, classnames, descriptions=None, config=None):
        super().__init__(backbone, classnames, descriptions, config)
        _check_transformer(backbone)
        cfg = self.config
        model = backbone.model
        object.__setattr__(self, "_text_tower", _Tower("text", model))
        object.__setattr__(self, "_visual_tower", _Tower("visual", model))
        lt, lv = len(self._text_tower.blocks), len(self._visual_tower.blocks)
        depth = min(lt, lv)
        start = cfg.start_block if cfg.start_block is not None else auto_start_block(depth)
        end = cfg.end_block if cfg.end_block is not None else depth
        if not (1 <= start <= end <= depth):
            raise DataError(f"MMA's adapted blocks must satisfy 1 <= start_block <= end_block <= {depth} "
                            f"for this backbone; got start_block={start}, end_block={end}.")
        if cfg.rank < 1:
            raise DataError(f"MMA's adapter rank must be at least 1; got {cfg.rank}.")
        if cfg.recipe not in RECIPES:
            raise DataError(f"MMA's recipe must be one of {', '.join(RECIPES)}; got {cfg.recipe!r}.")
        # 1-based indices in the shallower tower; a deeper tower is aligned from the top
        self.block_range = (start, end)
        self.text_blocks = [i - 1 + (lt - depth) for i in range(start, end + 1)]
        self.visual_blocks = [i - 1 + (lv - depth) for i in range(start, end + 1)]
        self.adapters = nn.ModuleList(
            BlockAdapter(self._text_tower.width, self._visual_tower.width, cfg.rank)
            for _ in range(start, end + 1))
        self.reset_adapters()
        c, d = len(self.classnames), backbone.embed_dim
        self.register_buffer("visual_means", torch.zeros(c, d))
        self.register_buffer("visual_counts", torch.zeros(c))
        self._text_cache: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self.train_dtype: torch.dtype | None = None  # the last fit's autocast dtype (None: fp32)
        self.scaler_used = False  # whether the last fit scaled its loss with a GradScaler
        self.to(backbone.device)

    # ---- facts -------------------------------------------------------------------------------
    def reset_adapters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) weights and zero biases, seeded by config.seed."""
        g = torch.Generator().manual_seed(int(self.config.seed))
        for m in self.adapters.modules():
            if isinstance(m, nn.Linear):
                w = torch.empty_like(m.weight, device="cpu")
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g)
                with torch.no_grad():
                    m.weight.copy_(w)
                    m.bias.zero_()
        self._text_cache = None

    def expected_parameter_count(self) -> int:
        """3 small MLPs per adapted block: the formula the trainable-parameter count must equal."""
        n = self.block_range[1] - self.block_range[0] + 1
        return n * BlockAdapter.num_parameters(self._text_tower.width, self._visual_tower.width,
                                               self.config.rank)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def prompts(self) -> list[str]:
        """One prompt per class: the single template through prompts.class_prompts."""
        descriptions = self.descriptions or [None] * self.num_classes
        return [class_prompts(c, d, (self.config.template,))[0] for c, d in zip(self.classnames, descriptions)]

    def _token_ids(self) -> torch.Tensor:
        """Tokenised class prompts, truncated after the last end-of-text token where exact."""
        if self._tokens is None:
            tokens = self.backbone.tokenizer(self.prompts())
            n = self._text_tower.truncation_length(tokens)
            if n is not None:
                tokens = tokens[:, :n]
            self._tokens = tokens.to(self.backbone.device)
        return self._tokens

    # ---- running the towers --------------------------------------------------------------------
    def _run_blocks(self, tower: _Tower, x: torch.Tensor, mask: torch.Tensor | None, lo: int, hi: int,
                    adapted: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks [lo, hi) of `tower` on x (N,L,D), adding each adapted block's adapter.
        With `rows` (the head's pooled position per input, _Tower.pooled_rows), the last block
        computes those rows only (their attention still reads every position): the head reads
        nothing else, so the embedding is the same and that block costs about 1/L as much.
        The other rows of the result then hold the last block's input."""
        index = {b: k for k, b in enumerate(self.text_blocks if tower.kind == "text" else self.visual_blocks)}
        scale = float(self.config.scale)
        if not tower.batch_first:
            x = x.transpose(0, 1)
        for j in range(lo, hi):
            blk = tower.blocks[j]
            last = rows is not None and j == len(tower.blocks) - 1 and _plain_block(blk)
            at = (torch.arange(x.shape[0], device=x.device), rows.to(x.device)) if last else None
            inp = x[at].unsqueeze(1) if last else x
            out = _block_rows(blk, inp, x, mask, at[1]) if last else blk(x, attn_mask=mask)
            k = index.get(j)
            if adapted and k is not None and scale != 0.0:
                down, shared, up = self.adapters[k].branch(tower.kind)
                y = grad_scale(inp, scale)
                y = up(shared(down(blk.ln_1(y)))) * scale
                y = grad_scale(y, 1.0 / scale)
                out = out + y
            x = x.index_put(at, out.squeeze(1)) if last else out
        if not tower.batch_first:
            x = x.transpose(0, 1)
        return x

    def _first(self, kind: str) -> int:
        return (self.text_blocks if kind == "text" else self.visual_blocks)[0]

    def encode_text(self, tokens: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        """Tokens -> unnormalised text embeddings through the adapted text tower (full path)."""
        t = self._text_tower
        x, mask = t.embed(tokens)
        x = self._run_blocks(t, x, mask, 0, len(t.blocks), adapted, t.pooled_rows(len(tokens), tokens))
        return t.head(x, tokens)

    def encode_image(self, pixels: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        """Normalised pixels -> unnormalised image embeddings through the adapted visual tower."""
        v = self._visual_tower
        x, _ = v.embed(pixels)
        # shape[0], not len(): a traced (ONNX) batch size stays symbolic
        x = self._run_blocks(v, x, None, 0, len(v.blocks), adapted, v.pooled_rows(pixels.shape[0]))
        return v.head(x)

    def _lower_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self._text_tower
        x, mask = t.embed(tokens)
        return self._run_blocks(t, x, mask, 0, self._first("text"), adapted=False), mask

    def _lower_visual(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self._visual_tower
        x, _ = v.embed(pixels)
        return self._run_blocks(v, x, None, 0, self._first("visual"), adapted=False)

    def _upper_text(self, lower: torch.Tensor, mask, tokens: torch.Tensor) -> torch.Tensor:
        t = self._text_tower
        rows = t.pooled_rows(len(tokens), tokens)
        return t.head(self._run_blocks(t, lower, mask, self._first("text"), len(t.blocks), rows=rows), tokens)

    def _upper_visual(self, lower: torch.Tensor) -> torch.Tensor:
        v = self._visual_tower
        rows = v.pooled_rows(len(lower))
        return v.head(self._run_blocks(v, lower, None, self._first("visual"), len(v.blocks), rows=rows))

    # ---- training ------------------------------------------------------------------------------
    def _load_pixels(self, refs: Sequence[ImageRef], views: Sequence[int], workers: int = 2) -> torch.Tensor:
        """(N, V, 3, H, W) preprocessed pixels: view 0 plain, view k>0 augmented (seeded by image)."""
        return load_pixels(self.backbone, refs, views, workers)

    def prepare_training(self, support: SupportSet, cached: bool | None = None, progress=None,
                         cancel=None, workers: int = 2) -> MMATrainData:
        """Decode and augment the support images once; with `cached`, also run the blocks below the
        first adapted one once per (image, view) and per class prompt."""
        cached = self.config.cache_lower if cached is None else cached
        dev = self.backbone.device
        official = self.config.recipe == "official"
        # official: augmentations are drawn afresh every step, so only the plain view is prepared
        views = [0] if official else list(range(1 + max(0, int(self.config.augment_views))))
        stage = "Preparing images"
        n = len(support.images)
        if progress:
            progress(Progress(stage, 0, max(1, n)))
        pixels = []
        chunk = 32
        for s in range(0, n, chunk):
            check_cancel(cancel)
            pixels.append(self._load_pixels(support.images[s:s + chunk], views, workers))
            if progress:
                progress(Progress(stage, min(n, s + chunk), n))
        pixels = torch.cat(pixels) if pixels else self._load_pixels([], views)
        labels = support.labels_tensor().to(dev)
        tokens = self._token_ids()
        originals = self._decode_originals(support.images, progress, cancel, workers) if official else None
        if not cached:
            return MMATrainData(False, pixels, labels, tokens, None, tokens, originals)
        stage = "Caching the lower blocks"
        with torch.no_grad(), autocast_for(dev):
            text, mask = self._lower_text(tokens)
            flat = pixels.flatten(0, 1)
            v = self._visual_tower.model.visual
            tokens_per_image = int(v.positional_embedding.shape[0])
            nbytes = len(flat) * tokens_per_image * self._visual_tower.width * 4
            # keep the cache on the accelerator when it is small; otherwise on the CPU (moved per batch)
            store = dev if nbytes <= self.GPU_CACHE_BYTES else torch.device("cpu")
            outs, bs = [], 128
            for s in range(0, len(flat), bs):
                check_cancel(cancel)
                outs.append(self._lower_visual(flat[s:s + bs].to(dev)).float().to(store))
                if progress:
                    progress(Progress(stage, min(len(flat), s + bs), len(flat)))
        lower = torch.cat(outs).view(n, len(views), *outs[0].shape[1:]) if outs else \
            torch.empty(0, len(views), 1, 1, device=dev)
        return MMATrainData(True, lower, labels, text.float(), mask, tokens, originals)

    def _decode_originals(self, refs: Sequence[ImageRef], progress=None, cancel=None,
                          workers: int = 2) -> list[Image.Image]:
        """The support images decoded at full size (no draft), as the official data loader reads
        them, for `random_resized_crop_flip` every step. Refuses more than ORIGINALS_BYTES."""
        stage = "Decoding images"
        out: list[Image.Image] = []
        total = 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for img in pool.map(lambda r: r.open(), refs):
                check_cancel(cancel)
                total += img.width * img.height * 3
                if total > self.ORIGINALS_BYTES:
                    raise DataError(
                        f"MMA's official recipe keeps every support image decoded at full size, and these "
                        f"need more than {self.ORIGINALS_BYTES // 2**30} GiB; use the default recipe, "
                        f"which caches small crops instead.")
                out.append(img)
                if progress:
                    progress(Progress(stage, len(out), len(refs)))
        return out

    def fresh_pixels(self, originals: Sequence[Image.Image], indices: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
        """(B, 3, s, s) normalised pixels: a fresh random resized crop (scale 0.08-1, bicubic) and
        flip of each image `indices` of `originals`, drawn from `gen` (the official recipe)."""
        bb = self.backbone
        # one PIL crop per batch image, as the official data loader does (sizes differ per image)
        crops = np.stack([random_resized_crop_flip(originals[int(i)], bb.image_size, gen) for i in indices])
        return torch.from_numpy(normalize(crops, bb.mean, bb.std))

    def training_logits(self, data: MMATrainData, indices: torch.Tensor, views: torch.Tensor | None,
                        pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the images `indices` (under their `views`) against all classes, with grads
        flowing into the adapters; one step of training computes this then cross-entropy.
        With `pixels` (fresh crops of those images, the official recipe) the whole visual tower
        runs on them instead: a fresh crop has no cached lower blocks."""
        dev = self.backbone.device
        if pixels is None:
            idx, vw = indices.cpu(), views.cpu()
            batch = data.images[idx.to(data.images.device), vw.to(data.images.device)].to(dev)
        if data.cached:
            ft = self._upper_text(data.text, data.text_mask, data.tokens)
        else:
            ft = self.encode_text(data.tokens)
        if pixels is not None:
            fi = self.encode_image(pixels.to(dev))
        elif data.cached:
            fi = self._upper_visual(batch)
        else:
            fi = self.encode_image(batch)
        return self.logit_scale * F.normalize(fi.float(), dim=-1) @ F.normalize(ft.float(), dim=-1).T

    def num_steps(self, num_images: int) -> int:
        cfg = self.config
        if num_images == 0 or float(cfg.scale) == 0.0:
            return 0  # nothing to learn from: no images, or adapters switched off
        if cfg.recipe == "official":  # the official loop: epochs × the loader's batches, nothing else
            return int(cfg.epochs) * batches_per_epoch(num_images, int(cfg.batch_size))
        if cfg.steps is not None:
            return max(0, int(cfg.steps))
        return max(int(cfg.epochs) * math.ceil(num_images / cfg.batch_size), int(cfg.min_steps))

    def _make_step(self, data: MMATrainData, total: int, gen: torch.Generator, lrs: list | None = None):
        """The optimiser, schedule and step function of one training run; each step appends the
        learning rate it used to `lrs` when given.

        Default recipe: cosine over the steps, updated every step (`cosine_schedule`), batches
        from the cached views. Official recipe: Dassl's `CosineAnnealingLR(T_max=epochs)` stepped
        after the last batch of each epoch, drop-last epochs (`epoch_batches`), fresh crops."""
        cfg = self.config
        dev = self.backbone.device
        official = cfg.recipe == "official"
        params = self.trainable_parameters()
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if official:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(cfg.epochs))
            per_epoch = batches_per_epoch(data.num_images, int(cfg.batch_size))
            batches = epoch_batches(data.num_images, int(cfg.batch_size), gen)
        else:
            sched = cosine_schedule(opt, max(1, total), cfg.warmup)
            per_epoch = 0
            batches = minibatches(data.num_images, cfg.batch_size, gen)
        dtype, use_scaler = training_precision(cfg.recipe, dev.type,
                                               dev.type == "cuda" and torch.cuda.is_bf16_supported())
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.scaler_used = scaler is not None  # what the last run trained with (tests, metrics)
        self.train_dtype = dtype
        nv = data.num_views

        def step(i: int) -> tuple[float, float]:
            idx = next(batches)
            if lrs is not None:
                lrs.append(float(opt.param_groups[0]["lr"]))
            if data.originals is not None:
                views, pixels = None, self.fresh_pixels(data.originals, idx, gen)
            else:
                views, pixels = torch.randint(0, nv, (len(idx),), generator=gen), None
            with autocast_as(dev, dtype):
                logits = self.training_logits(data, idx, views, pixels)
                y = data.labels[idx.to(data.labels.device)]
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if not official or (i + 1) % max(1, per_epoch) == 0:  # official: once per epoch, after its last batch
                sched.step()
            acc = (logits.detach().argmax(1) == y).float().mean()
            return float(loss.detach()), float(acc)

        return step

    def _fit(self, support, extractor, progress, cancel):
        self._check_support(support)
        cfg = self.config
        gen = seed_everything(cfg.seed)
        self.reset_adapters()
        self._text_cache = None
        self.train()
        try:
            data = self.prepare_training(support, progress=progress, cancel=cancel,
                                         workers=getattr(extractor, "workers", 2) if extractor else 2)
            total = self.num_steps(data.num_images)
            lrs: list[float] = []
            step = self._make_step(data, total, gen, lrs)
            estimate: dict = {}
            if self.backbone.device.type == "cpu":
                step, progress = self._estimated(step, total, progress, estimate)
            t0 = time.perf_counter()
            history = run_steps(step, total, progress, cancel, stage="Training MMA")
            seconds = time.perf_counter() - t0
            for h, lr in zip(history, lrs):
                h["lr"] = lr
            self._store_visual_means(data)
        finally:
            self.eval()
            self._text_cache = None
        self.history = history
        self.metrics = {
            "steps": total,
            "train_seconds": round(seconds, 3),
            "final_loss": history[-1]["loss"] if history else None,
            "train_accuracy": history[-1]["accuracy"] if history else None,
            "cached_lower_blocks": bool(data.cached),
            "recipe": cfg.recipe,
            "precision": {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.train_dtype]
            + (" + GradScaler" if self.scaler_used else ""),
            **estimate,
        }

    @staticmethod
    def _estimated(step, total: int, progress, estimate: dict):
        """On a CPU: time the first step and say up front, in every later stage text, how long the
        training will take and that a closed-form method fits in seconds (issue #14, item 6d).
        The first step costs about what each later one does (the lower blocks are cached
        beforehand), so steps × its time is the estimate; it is kept in `estimate`."""
        stage = ["Training MMA"]

        def timed(i: int):
            if i != 0:
                return step(i)
            t = time.perf_counter()
            out = step(i)
            seconds = (time.perf_counter() - t) * total
            estimate["estimated_seconds"] = round(seconds, 1)
            if seconds >= ESTIMATE_SAY_SECONDS:
                stage[0] = (f"Training MMA (about {_duration(seconds)} on this CPU; GDA or ProKeR fit in seconds "
                            "on cached features)")
            return out

        def report(p: Progress) -> None:
            if progress is not None:
                progress(Progress(stage[0] if p.stage == "Training MMA" else p.stage, p.step, p.total, p.loss,
                                  p.accuracy))

        return timed, report

    @torch.no_grad()
    def _store_visual_means(self, data: MMATrainData) -> None:
        """Per-class mean of the normalised adapted features of the support images (plain view)."""
        dev = self.backbone.device
        c, d = self.visual_means.shape
        sums = torch.zeros(c, d, device=dev)
        counts = torch.zeros(c, device=dev)
        n = data.num_images
        for s in range(0, n, 64):
            idx = torch.arange(s, min(n, s + 64))
            x = data.images[idx.to(data.images.device), 0].to(dev)
            with autocast_for(dev):
                f = self._upper_visual(x) if data.cached else self.encode_image(x)
            f = F.normalize(f.float(), dim=-1)
            y = data.labels[idx.to(data.labels.device)].to(dev)
            sums.index_add_(0, y, f)
            counts.index_add_(0, y, torch.ones(len(idx), device=dev))
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], torch.zeros_like(sums))
        self.visual_means.copy_(means)
        self.visual_counts.copy_(counts)

    def load_tensors(self, tensors):
        super().load_tensors(tensors)
        self._text_cache = None

    # ---- benchmark -----------------------------------------------------------------------------
    def time_epoch(self, support: SupportSet, cached: bool = True, epochs: int = 1) -> dict:
        """Seconds to prepare the training data and to train `epochs` epochs (ceil(N/batch) steps
        each), with or without the lower-block cache. Leaves the method's state unchanged."""
        snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
        try:
            gen = seed_everything(self.config.seed)
            t0 = time.perf_counter()
            data = self.prepare_training(support, cached=cached)
            t1 = time.perf_counter()
            per_epoch = batches_per_epoch(data.num_images, self.config.batch_size) \
                if self.config.recipe == "official" else math.ceil(max(1, data.num_images) / self.config.batch_size)
            steps = max(1, epochs * per_epoch)
            step = self._make_step(data, steps, gen)
            self.train()
            for i in range(steps):
                step(i)
            if self.backbone.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
        finally:
            self.load_tensors(snapshot)
            self.eval()
        return {"cached": cached, "prepare_seconds": t1 - t0, "epoch_seconds": (t2 - t1) / epochs,
                "steps_per_epoch": steps // epochs, "images": data.num_images, "views": data.num_views}

    # ---- inference -----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """(C, d) normalised adapted class text features; computed once, then cached."""
        if self._text_cache is None:
            dev = self.backbone.device
            with torch.no_grad(), autocast_for(dev):
                f = self.encode_text(self._token_ids())
            self._text_cache = F.normalize(f.float(), dim=-1)
        return self._text_cache

    def image_features(self, refs: Sequence[ImageRef], batch_size: int = 64, workers: int = 2,
                       progress=None) -> torch.Tensor:
        """(N, d) normalised adapted image features of the plain view of `refs`."""
        bb = self.backbone
        dev = bb.device
        out = []
        for s in range(0, len(refs), batch_size):
            pixels = load_pixels(bb, refs[s:s + batch_size], (0,), workers)[:, 0].to(dev)
            with torch.no_grad(), autocast_for(dev):
                out.append(self.pixel_features(pixels))
            if progress is not None:
                progress(Progress("Predicting", min(len(refs), s + batch_size), len(refs)))
        return torch.cat(out) if out else torch.empty(0, bb.embed_dim, device=dev)

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) normalised pixels -> (N,d) normalised features of the adapted image tower."""
        return F.normalize(self.encode_image(pixels).float(), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N,d) normalised adapted image features -> (N,C) logits against the adapted class text
        features (computed once: an exported graph holds them as constants)."""
        return self.logit_scale * features @ self.text_features().T

    def image_logits(self, refs: Sequence[ImageRef], extractor=None, progress=None) -> torch.Tensor:
        workers = getattr(extractor, "workers", 2) if extractor is not None else 2
        with torch.no_grad():
            return self.logits_from_features(self.image_features(refs, workers=workers, progress=progress))

    def knowledge_graph(self) -> KnowledgeGraph:
        text_edges = cosine_matrix(self.text_features())
        visual = None
        has = self.visual_counts > 0
        if bool(has.any()):
            visual = cosine_matrix(self.visual_means)
            missing = (~has).cpu().numpy()
            visual[missing, :] = 0.0  # classes without images have no visual node
            visual[:, missing] = 0.0
            for i in range(len(visual)):
                visual[i, i] = 1.0
        return KnowledgeGraph(self.classnames, text_edges, visual, None, self.support_counts)
