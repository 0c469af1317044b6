"""Frozen open_clip backbones: loading, preprocessing, batched encoding (docs/design.md, "Backbones").

One entry point, `load_backbone(BackboneSpec(...))`, covers the three sources of weights:
a named open_clip model + pretrained tag (downloaded through the Hugging Face cache),
a local checkpoint file or directory, and the project's own offline `tiny` model.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, AppConfig
from .errors import WeightsUnavailableError
from .precision import autocast_for
from .prompts import GENERIC_TEMPLATES, templates_for

DEFAULT_NAME = DEFAULT_BACKBONE
TINY = "tiny"


@dataclass(frozen=True)
class BackboneSpec:
    """What to load. `name` is an open_clip model name or "tiny"; `checkpoint` overrides `pretrained`."""

    name: str = DEFAULT_NAME
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None
    device: str | None = None  # "cpu", "cuda", or None for CUDA when present

    @classmethod
    def from_env(cls, **overrides) -> "BackboneSpec":
        """Defaults from the environment (FEWSHOT_STUDIO_BACKBONE / _PRETRAINED / _CHECKPOINT /
        _DEVICE, read by AppConfig), each overridden by a keyword that is not None."""
        return cls.from_config(AppConfig.from_env(), **overrides)

    @classmethod
    def from_config(cls, config: AppConfig, **overrides) -> "BackboneSpec":
        """The configured default backbone, each field overridden by a keyword that is not None."""
        d = {"name": config.backbone, "pretrained": config.pretrained, "checkpoint": config.checkpoint,
             "device": config.device}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("device")
        return d

    @property
    def label(self) -> str:
        if self.name == TINY:
            return "tiny (offline test backbone: it only knows coloured shapes)"
        if self.checkpoint:
            return f"{self.name} from {self.checkpoint}"
        return f"{self.name} / {self.pretrained}"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hub_reachable(timeout: float = 2.0) -> bool:
    """True when huggingface.co answers a TCP connect quickly (DNS included, bounded by a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[bool]:
    """Force huggingface_hub offline mode when the hub can't be reached, so a missing
    download fails in seconds instead of after minutes of retries (docs/design.md, "Backbones")."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    offline = bool(old) or not _hub_reachable()
    constants.HF_HUB_OFFLINE = offline
    try:
        yield offline
    finally:
        constants.HF_HUB_OFFLINE = old


def _fix_hint() -> str:
    return ("use a local checkpoint (--checkpoint PATH, FEWSHOT_STUDIO_CHECKPOINT, or the UI field) "
            "or the offline test backbone 'tiny'")


class Backbone:
    """A frozen open_clip CLIP model with its tokenizer, preprocessing and device.

    Encoding is batched, runs under `torch.inference_mode()` and uses CUDA autocast when on GPU (precision.py).
    Features come back L2-normalised, float32, on the CPU.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: BackboneSpec, backbone_id: str,
                 device: torch.device, templates: Sequence[str] = GENERIC_TEMPLATES):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.id = backbone_id
        self.device = device
        self.templates = tuple(templates)
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = tuple(cfg.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_DATASET_STD))
        self.embed_dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection")
                             and isinstance(model.text_projection, torch.Tensor)
                             else self.encode_texts(["x"]).shape[1])
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        from .preprocess import Cropper

        self.cropper = Cropper(self.image_size)

    # ---- facts -----------------------------------------------------------
    @property
    def device_label(self) -> str:
        return device_name(self.device)

    def autocast(self):
        """Mixed precision by the one policy (precision.autocast_for: bf16, or fp16 without bf16,
        on CUDA); a no-op on CPU so results there stay exact fp32."""
        return autocast_for(self.device)

    # ---- preprocessing -------------------------------------------------------
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """Plain view: shortest side resized to image_size (bicubic), centre crop, normalise
        (open_clip's eval transform)."""
        return self.normalize(self.cropper.plain(img)[None])[0]

    def augment(self, img: Image.Image, key: str, view: int) -> torch.Tensor:
        """View `view` of an image (0 plain; k >= 1 a seeded random resized crop + flip, see
        preprocess.Cropper), normalised."""
        return self.normalize(self.cropper.view(img, key, view)[None])[0]

    def normalize(self, crops: np.ndarray) -> torch.Tensor:
        """(N,s,s,3) uint8 crops -> (N,3,s,s) normalised float pixels (preprocess.normalize)."""
        from .preprocess import normalize

        return torch.from_numpy(normalize(crops, self.mean, self.std))

    # ---- encoding --------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(N,3,H,W) normalised pixels -> (N,d) L2-normalised features (float32, CPU)."""
        out = []
        for i in range(0, len(pixels), batch_size):
            x = pixels[i:i + batch_size].to(self.device, non_blocking=True)
            with self.autocast():
                f = self.model.encode_image(x)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N,d) L2-normalised features (float32, CPU)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with self.autocast():
                f = self.model.encode_text(tokens)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, getattr(self, "embed_dim", 0))

    def parameter_fingerprint(self) -> str:
        """Hash of every frozen weight, to check they stay bit-identical (docs/design.md,
        "Method invariants")."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _create(name: str, pretrained: str | None, device: torch.device):
    import logging

    import open_clip

    # open_clip logs its own failures on the root logger; ours is the one sentence the user sees
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    finally:
        logging.disable(previous)
    return model, open_clip.get_tokenizer(name)


def load_backbone(spec: BackboneSpec | str | None = None, **kwargs) -> Backbone:
    """Load a frozen backbone.

    `spec` may be a BackboneSpec, a model name ("tiny", "ViT-B-32", ...) or None for the
    environment's default. Raises WeightsUnavailableError with one sentence when the
    weights cannot be had (unknown name, bad path, no network).
    """
    import open_clip

    from . import tiny

    if spec is None:
        spec = BackboneSpec.from_env(**kwargs)
    elif isinstance(spec, str):
        spec = BackboneSpec(name=spec, **kwargs) if spec != TINY else BackboneSpec(name=TINY, pretrained=None, **kwargs)
    elif kwargs:
        spec = replace(spec, **kwargs)
    device = resolve_device(spec.device)
    tiny.register()

    if spec.name == TINY and not spec.checkpoint:
        if not tiny.WEIGHTS_PATH.exists():
            raise WeightsUnavailableError(
                f"The tiny backbone's weights are missing at {tiny.WEIGHTS_PATH}; "
                "run 'python -m fewshot_studio pretrain-tiny' to rebuild them.")
        model, tok = _create(tiny.MODEL_NAME, str(tiny.WEIGHTS_PATH), device)
        spec = BackboneSpec(name=TINY, pretrained=None, checkpoint=None, device=spec.device)
        bid = f"tiny-{file_sha256(tiny.WEIGHTS_PATH)[:12]}"
        return Backbone(model, tok, spec, bid, device, templates=templates_for(tiny=True))

    arch = tiny.MODEL_NAME if spec.name == TINY else spec.name
    templates = templates_for(tiny=spec.name == TINY)

    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        if not path.exists():
            raise WeightsUnavailableError(
                f"The checkpoint {path} does not exist; give the path of a checkpoint file or "
                f"directory, or use the offline test backbone 'tiny'.")
        try:
            if path.is_dir():
                if (path / "open_clip_config.json").exists():
                    model, tok = _create(f"local-dir:{path}", None, device)
                    weights = open_clip.factory._find_checkpoint_in_dir(path)
                else:
                    weights = open_clip.factory._find_checkpoint_in_dir(path)
                    if weights is None:
                        raise FileNotFoundError("no .safetensors, .bin or .pth file inside")
                    model, tok = _create(arch, weights, device)
            else:
                weights = str(path)
                model, tok = _create(arch, weights, device)
        except WeightsUnavailableError:
            raise
        except Exception as e:  # open_clip raises many kinds; the user needs one sentence
            raise WeightsUnavailableError(
                f"Could not load the checkpoint {path} as an open_clip '{arch}' model "
                f"({_short(e)}); check the model name matches the checkpoint, or use the "
                f"offline test backbone 'tiny'.") from None
        bid = f"{arch}@sha256-{file_sha256(weights)[:16]}" if weights else f"{arch}@{path.name}"
        return Backbone(model, tok, spec, bid, device, templates=templates)

    if spec.name not in open_clip.list_models():
        raise WeightsUnavailableError(
            f"'{spec.name}' is not an open_clip model name; pick one of open_clip.list_models() "
            f"(e.g. ViT-B-32) or the offline test backbone 'tiny'.")
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.pretrained and spec.pretrained not in tags and not Path(spec.pretrained).exists():
        raise WeightsUnavailableError(
            f"'{spec.pretrained}' is not a pretrained tag of {spec.name} "
            f"(known: {', '.join(tags) or 'none'}); pick one of those, or {_fix_hint()}.")
    try:
        with _offline_unless_reachable() as offline:
            model, tok = _create(spec.name, spec.pretrained, device)
    except Exception as e:
        why = "this machine is offline and they are not in the local cache" if offline else _short(e)
        raise WeightsUnavailableError(
            f"Could not download the {spec.name}/{spec.pretrained} weights ({why}); {_fix_hint()}.") from None
    return Backbone(model, tok, spec, f"{spec.name}/{spec.pretrained}", device, templates=templates)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200].rstrip(".")
