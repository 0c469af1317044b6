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


def split_backbone(value: str) -> tuple[str, str | None]:
    """A picker's "name/pretrained" (or "tiny", or an "hf-hub:org/repo" name) as (name, pretrained)."""
    name = (value or "").strip()
    if name == TINY:
        return name, None
    if "/" in name and not name.startswith(("hf-hub:", "local-dir:")):
        name, pretrained = name.split("/", 1)
        return name.strip(), pretrained.strip() or None
    return name, None


def release_memory() -> None:
    """Hand freed tensors back to the system: a collection (models hold reference cycles), the
    CUDA cache, and glibc's free lists (else the process's RSS never shrinks)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def _cached_sha256(path: Path) -> str:
    """file_sha256 of a resolved path, remembered by (path, size, mtime_ns) so that asking for
    the same checkpoint again costs a stat, not a re-read of hundreds of MB."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    digest = file_sha256(path)
    with _digests_lock:
        if len(_digests) > 256:  # a bound: stale entries of rewritten files go
            _digests.clear()
        _digests[key] = digest
    return digest


def checkpoint_digest(checkpoint: str | os.PathLike) -> str | None:
    """What a local checkpoint holds, whatever the spelling of its path: the sha256 of the file
    (of a folder: of its weights file and its open_clip_config.json); None when there is
    nothing to read (loading it then says why in one sentence)."""
    import open_clip

    try:
        path = Path(checkpoint).expanduser().resolve()
        if path.is_file():
            return _cached_sha256(path)
        if path.is_dir():
            weights = open_clip.factory._find_checkpoint_in_dir(path)
            config = path / "open_clip_config.json"
            parts = [_cached_sha256(Path(weights).resolve()) if weights else "-",
                     _cached_sha256(config.resolve()) if config.is_file() else "-"]
            return "dir:" + ":".join(parts)
    except (OSError, ValueError, RuntimeError):
        return None
    return None


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
                out.append(self.image_embedding(x).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) normalised pixels -> (N,d) L2-normalised float32 features on their device:
        the one definition `encode_images` batches and the ONNX export traces (onnx_export.py)."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N,d) L2-normalised features (float32, CPU).

        Each batch is encoded only up to its longest prompt's end-of-text token (encode_tokens):
        a class prompt is about 10 of the 77 positions, so on a CPU this is 4-5× faster, and
        exact (the mask is causal and the feature is read at the end-of-text position)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with self.autocast():
                f = self.encode_tokens(tokens)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, getattr(self, "embed_dim", 0))

    def encode_tokens(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """(N, L) token ids -> (N, d) unnormalised text features, as `model.encode_text`.

        With `truncate` (and a text tower where it is exact, `_truncatable`) the positions after
        the batch's last end-of-text token are dropped: under a causal mask position t attends
        only to positions <= t, and the pooled feature is read at the end-of-text position (the
        argmax of the ids, open_clip's `text_global_pool`), so the padding after it cannot
        change the result; the positional embedding and mask are sliced to the shorter length."""
        m = self.model
        if not (truncate and _truncatable(m)):
            return m.encode_text(tokens)
        from open_clip.transformer import text_global_pool

        eos = getattr(m, "text_eos_id", None)
        pos = tokens.argmax(dim=-1) if m.text_pool_type == "argmax" else (tokens == eos).int().argmax(dim=-1)
        n = int(pos.max().item()) + 1 if len(tokens) else tokens.shape[1]
        tokens = tokens[:, :n]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=eos)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    def parameter_fingerprint(self) -> str:
        """Hash of every frozen weight, to check they stay bit-identical (docs/design.md,
        "Method invariants")."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _truncatable(model: torch.nn.Module) -> bool:
    """Whether `Backbone.encode_tokens` may cut a token batch after its last end-of-text token
    and still give model.encode_text's features exactly: an open_clip `CLIP` text tower (its own
    token embedding, transformer and `attn_mask`) whose mask is the causal one (-inf strictly
    above the diagonal, 0 elsewhere) and whose pooling reads the end-of-text position
    ("argmax" or "eos"). Towers of other kinds (CustomTextCLIP, HF text models) are encoded
    at full length."""
    mask = getattr(model, "attn_mask", None)
    if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        return False
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos") or not isinstance(mask, torch.Tensor):
        return False
    if getattr(model, "text_pool_type") == "eos" and getattr(model, "text_eos_id", None) is None:
        return False
    if mask.dim() != 2:
        return False
    n = mask.shape[-1]  # a 77×77 check: microseconds, so checked on every call rather than remembered
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[above]).all()) and bool((mask[~above] == 0).all())


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


def _meta_model(arch: str):
    """The architecture with no memory behind its weights (the `meta` device): its tensor names
    and shapes, in well under a second even for ViT-L-14."""
    import logging

    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # "No pretrained weights loaded": intended here
    try:
        with torch.device("meta"):
            return open_clip.create_model(arch, pretrained=None, device="meta", load_weights=False)
    finally:
        logging.disable(previous)


def _lazy_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors without reading their data: `meta` tensors of the right shapes
    from a safetensors header, memory-mapped tensors from a torch zip file (weights only,
    never unpickling code). Raises on anything else."""
    if str(weights).endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                out[k] = torch.empty(f.get_slice(k).get_shape(), device="meta")
        state = out
    else:
        try:
            state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a legacy (pre-zip) torch file cannot be memory-mapped: read it, still weights only
            state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("it holds no tensors")
    if next(iter(state)).startswith("module"):
        state = {k[7:]: v for k, v in state.items()}
    return state


def check_checkpoint(arch: str, weights: str) -> None:
    """Refuse (ValueError, a short reason) a checkpoint whose tensors are not the architecture's,
    before the model is built: names and shapes are compared with the architecture on the
    `meta` device. Only the differences open_clip's loader mends itself pass: resized position
    embeddings, a scalar-vs-1-d logit scale, a missing logit bias, old text-tower names."""
    import open_clip

    model = _meta_model(arch)
    state = _lazy_state_dict(weights)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.factory.convert_to_custom_text_state_dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(("logit_bias", "position_ids"))]
    unexpected = [k for k in state if k not in expected and not k.endswith("position_ids")]
    if missing or unexpected:
        k = (missing or unexpected)[0]
        n = len(missing) + len(unexpected)
        raise ValueError(f"{n} tensor names differ from the architecture's, e.g. '{k[:80]}'")
    for k, t in expected.items():
        got = state.get(k)
        if got is None or tuple(got.shape) == tuple(t.shape):
            continue
        if "positional_embedding" in k or (k.startswith("logit_") and got.numel() == t.numel()):
            continue
        raise ValueError(f"'{k[:80]}' has shape {tuple(got.shape)}, the architecture {tuple(t.shape)}")


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
        bid = f"tiny-{_cached_sha256(tiny.WEIGHTS_PATH.resolve())[:12]}"
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
            # every check before a weight is allocated: a file that is not a checkpoint of this
            # architecture costs a header read, not a model (issue #13)
            if path.is_dir():
                weights = open_clip.factory._find_checkpoint_in_dir(path)
                if weights is None:
                    raise FileNotFoundError("no .safetensors, .bin or .pth file inside")
                if (path / "open_clip_config.json").exists():
                    check_checkpoint(f"local-dir:{path}", weights)
                    model, tok = _create(f"local-dir:{path}", None, device)
                else:
                    check_checkpoint(arch, weights)
                    model, tok = _create(arch, weights, device)
            else:
                weights = str(path)
                check_checkpoint(arch, weights)
                model, tok = _create(arch, weights, device)
        except WeightsUnavailableError:
            raise
        except Exception as e:  # open_clip raises many kinds; the user needs one sentence
            raise WeightsUnavailableError(
                f"Could not load the checkpoint {path} as an open_clip '{arch}' model "
                f"({_short(e)}); check the model name matches the checkpoint, or use the "
                f"offline test backbone 'tiny'.") from None
        bid = f"{arch}@sha256-{_cached_sha256(Path(weights).resolve())[:16]}" if weights else f"{arch}@{path.name}"
        return Backbone(model, tok, spec, bid, device, templates=templates)

    if spec.name not in open_clip.list_models():
        raise WeightsUnavailableError(
            f"'{spec.name}' is not an open_clip model name; pick one of open_clip.list_models() "
            f"(e.g. ViT-B-32) or the offline test backbone 'tiny'.")
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.pretrained and spec.pretrained not in tags:
        if Path(spec.pretrained).expanduser().exists():  # a path given as the tag: checked like one
            return load_backbone(replace(spec, pretrained=None, checkpoint=spec.pretrained))
        raise WeightsUnavailableError(
            f"'{spec.pretrained}' is not a pretrained tag of {spec.name} "
            f"(known: {', '.join(tags) or 'none'}); pick one of those, or {_fix_hint()}.")
    offline = False
    try:
        with _offline_unless_reachable() as offline:
            if spec.pretrained:  # the weights file first: no model is built for weights that cannot be had
                from open_clip.pretrained import download_pretrained, get_pretrained_cfg

                if not download_pretrained(get_pretrained_cfg(spec.name, spec.pretrained)):
                    raise FileNotFoundError("no weights file for this tag")
            model, tok = _create(spec.name, spec.pretrained, device)
    except Exception as e:
        why = "this machine is offline and they are not in the local cache" if offline else _short(e)
        raise WeightsUnavailableError(
            f"Could not download the {spec.name}/{spec.pretrained} weights ({why}); {_fix_hint()}.") from None
    return Backbone(model, tok, spec, f"{spec.name}/{spec.pretrained}", device, templates=templates)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200].rstrip(".")
