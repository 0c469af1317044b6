"""The application's configuration, read once from flags and the environment and passed down.

    config = AppConfig.from_env()                          # python app.py, a Space, the CLI's default
    config = AppConfig.from_env(data_dir="/srv/studio")    # a flag wins over the environment

Nothing below this module reads `os.environ` for these settings and nothing anywhere writes
it: whoever starts the app (app.py, the CLI, a test) builds one `AppConfig` and hands it to
the parts that need it (the store, the feature cache, the backbone default, hosted mode).

Environment variables (all optional):
    FEWSHOT_STUDIO_DATA        projects, images and models (default: the user's data folder)
    FEWSHOT_STUDIO_CACHE       the on-disk feature cache (default: <data dir>/features)
    FEWSHOT_STUDIO_BACKBONE    open_clip model name or "tiny" (default ViT-B-32)
    FEWSHOT_STUDIO_PRETRAINED  open_clip pretrained tag (default openai)
    FEWSHOT_STUDIO_CHECKPOINT  a local checkpoint used instead of a download
    FEWSHOT_STUDIO_DEVICE      cpu or cuda (default: cuda when present)
    FEWSHOT_STUDIO_BACKBONES   hosted mode: the backbones visitors may pick, comma-separated
                               "name/pretrained" or "tiny" (default: the default backbone and
                               tiny); visitors never name a checkpoint path
    FEWSHOT_STUDIO_MAX_BACKBONES  how many loaded backbones stay in memory (default 2; the least
                               recently used one is freed to make room)
    FEWSHOT_STUDIO_HOSTED      1/0: each browser sees only its own projects (default: 1 in a
                               Hugging Face Space, where SPACE_ID is set, else 0)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

DEFAULT_BACKBONE = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
# the evaluation protocol's shots and seeds (CoOp / Tip-Adapter's 1-2-4-8-16 shots, three seeds);
# here so that the CLI's parser needs no torch
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
#: Loaded backbones kept in memory at once (the least recently used is freed): the default and
#: one other. A ViT-B-32 is about 0.6 GB and a ViT-L-14 1.7 GB in fp32.
DEFAULT_MAX_BACKBONES = 2


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_DATA_HOME/fewshot-studio (~/.local/share/...), the platform's equivalent elsewhere."""
    if sys.platform == "win32":
        base = Path(environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "fewshot-studio"


def _flag(value: str | None) -> bool | None:
    v = (value or "").strip().lower()
    return None if not v else v in ("1", "true", "yes")


def _positive(value: str | None, default: int) -> int:
    try:
        return max(1, int(value)) if value and value.strip() else default
    except ValueError:
        return default


@dataclass(frozen=True)
class AppConfig:
    """Where data lives, which backbone is the default, and whether the app is public."""

    data_dir: Path
    cache_dir: Path
    backbone: str = DEFAULT_BACKBONE
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None
    device: str | None = None
    hosted: bool = False
    #: hosted mode: what visitors may pick ("name/pretrained" or "tiny"); empty: the default and tiny
    backbones: tuple[str, ...] = ()
    max_backbones: int = DEFAULT_MAX_BACKBONES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **flags) -> "AppConfig":
        """The environment's settings, each overridden by a flag that is not None."""
        env = os.environ if environ is None else environ
        flags = {k: v for k, v in flags.items() if v is not None}
        data = Path(flags.pop("data_dir", None) or env.get("FEWSHOT_STUDIO_DATA") or default_data_dir(env))
        cache = flags.pop("cache_dir", None) or env.get("FEWSHOT_STUDIO_CACHE")
        hosted = _flag(env.get("FEWSHOT_STUDIO_HOSTED"))
        base = cls(
            data_dir=data.expanduser(),
            cache_dir=Path(cache).expanduser() if cache else data.expanduser() / "features",
            backbone=env.get("FEWSHOT_STUDIO_BACKBONE") or DEFAULT_BACKBONE,
            pretrained=env.get("FEWSHOT_STUDIO_PRETRAINED") or DEFAULT_PRETRAINED,
            checkpoint=env.get("FEWSHOT_STUDIO_CHECKPOINT") or None,
            device=env.get("FEWSHOT_STUDIO_DEVICE") or None,
            # a public Space never shows one visitor's projects to another unless told otherwise
            hosted=bool(env.get("SPACE_ID")) if hosted is None else hosted,
            backbones=tuple(b.strip() for b in (env.get("FEWSHOT_STUDIO_BACKBONES") or "").split(",") if b.strip()),
            max_backbones=_positive(env.get("FEWSHOT_STUDIO_MAX_BACKBONES"), DEFAULT_MAX_BACKBONES),
        )
        return replace(base, **flags)

    def with_data_dir(self, data_dir: str | os.PathLike) -> "AppConfig":
        """The same settings over another data folder (its cache inside it unless one was set
        apart from the data folder)."""
        data = Path(data_dir).expanduser()
        cache = self.cache_dir if self.cache_dir != self.data_dir / "features" else data / "features"
        return replace(self, data_dir=data, cache_dir=cache)
