"""Where data lives: FEWSHOT_STUDIO_DATA (else the user's data dir) and FEWSHOT_STUDIO_CACHE."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir() -> Path:
    """Projects, images and models. Default: $XDG_DATA_HOME/fewshot-studio (~/.local/share/...)."""
    env = os.environ.get("FEWSHOT_STUDIO_DATA")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "fewshot-studio"


def cache_dir() -> Path:
    """The on-disk feature cache. Default: <data dir>/features."""
    env = os.environ.get("FEWSHOT_STUDIO_CACHE")
    return Path(env).expanduser() if env else data_dir() / "features"
