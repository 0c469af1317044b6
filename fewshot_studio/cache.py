"""On-disk feature cache keyed by (backbone id, image content hash, view index) (SPEC §3).

One small `.npy` file per entry, written atomically (temp file + rename) so a crash
never leaves a half-written feature; an in-process dictionary sits in front of the disk.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .paths import cache_dir

Key = tuple[str, int]  # (content hash, view)


def _safe(backbone_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id)[:120]


class FeatureCache:
    """Persistent image-feature cache. `root=None` uses FEWSHOT_STUDIO_CACHE or the data dir."""

    def __init__(self, root: str | os.PathLike | None = None, memory: bool = True):
        self.root = Path(root) if root is not None else cache_dir()
        self._mem: dict[tuple[str, str, int], np.ndarray] | None = {} if memory else None
        self._lock = threading.Lock()

    def _path(self, backbone_id: str, h: str, view: int) -> Path:
        return self.root / _safe(backbone_id) / h[:2] / f"{h}_{view}.npy"

    def get(self, backbone_id: str, h: str, view: int) -> np.ndarray | None:
        k = (backbone_id, h, view)
        if self._mem is not None and (v := self._mem.get(k)) is not None:
            return v
        try:
            v = np.load(self._path(backbone_id, h, view), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None
        if self._mem is not None:
            with self._lock:
                self._mem[k] = v
        return v

    def get_many(self, backbone_id: str, keys: Iterable[Key]) -> list[np.ndarray | None]:
        return [self.get(backbone_id, h, v) for h, v in keys]

    def put_many(self, backbone_id: str, keys: Sequence[Key], features: np.ndarray) -> None:
        for (h, view), f in zip(keys, features):
            path = self._path(backbone_id, h, view)
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.ascontiguousarray(f, dtype=np.float32)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            if self._mem is not None:
                with self._lock:
                    self._mem[(backbone_id, h, view)] = arr

    def clear_memory(self) -> None:
        if self._mem is not None:
            with self._lock:
                self._mem.clear()
