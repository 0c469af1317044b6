"""On-disk feature cache keyed by (backbone id, image content hash, view index) (SPEC §3).

One small file of raw little-endian float32 per entry (no header to parse, so a hit is a
single read), written atomically (temp file + rename) so a crash never leaves a half-written
feature; an in-process dictionary sits in front of the disk. An entry whose size is not a
whole number of floats (or not the expected dimension) counts as missing and is recomputed.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .paths import cache_dir

Key = tuple[str, int]  # (content hash, view)
_F32 = np.dtype("<f4")


def _safe(backbone_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id)[:120]


class FeatureCache:
    """Persistent image-feature cache. `root=None` uses FEWSHOT_STUDIO_CACHE or the data dir."""

    def __init__(self, root: str | os.PathLike | None = None, memory: bool = True):
        self.root = Path(root) if root is not None else cache_dir()
        self._mem: dict[tuple[str, str, int], np.ndarray] | None = {} if memory else None
        self._lock = threading.Lock()
        self._dirs: set[str] = set()  # directories known to exist
        self._bases: dict[str, str] = {}
        # temp-file names unique per process and instance without a random-number syscall per file
        self._tmp_tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._tmp_count = itertools.count()

    def _path(self, backbone_id: str, h: str, view: int) -> str:
        # plain strings, the backbone's folder computed once: a lookup per (image, view) is hot
        base = self._bases.get(backbone_id)
        if base is None:
            base = self._bases.setdefault(backbone_id, os.path.join(self.root, _safe(backbone_id)))
        return os.path.join(base, h[:2], f"{h}_{view}.f32")

    def get(self, backbone_id: str, h: str, view: int, dim: int | None = None) -> np.ndarray | None:
        k = (backbone_id, h, view)
        if self._mem is not None and (v := self._mem.get(k)) is not None:
            return v
        try:
            with open(self._path(backbone_id, h, view), "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if not raw or len(raw) % 4 or (dim is not None and len(raw) != 4 * dim):
            return None
        v = np.frombuffer(raw, dtype=_F32)
        if self._mem is not None:
            with self._lock:
                self._mem[k] = v
        return v

    def get_many(self, backbone_id: str, keys: Iterable[Key], dim: int | None = None) -> list[np.ndarray | None]:
        return [self.get(backbone_id, h, v, dim) for h, v in keys]

    def put_many(self, backbone_id: str, keys: Sequence[Key], features: np.ndarray) -> None:
        for (h, view), f in zip(keys, features):
            path = self._path(backbone_id, h, view)
            folder, name = os.path.split(path)
            if folder not in self._dirs:
                os.makedirs(folder, exist_ok=True)
                self._dirs.add(folder)
            data = np.ascontiguousarray(f, dtype=_F32).tobytes()
            try:
                self._write(folder, name, path, data)
            except FileNotFoundError:  # the folder was deleted behind this instance's back
                os.makedirs(folder, exist_ok=True)
                self._write(folder, name, path, data)
        self.remember(backbone_id, keys, features)

    def _write(self, folder: str, name: str, path: str, data: bytes) -> None:
        tmp = os.path.join(folder, f".{name}.{self._tmp_tag}{next(self._tmp_count)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.EIO, "short write to the feature cache", tmp)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remember(self, backbone_id: str, keys: Sequence[Key], features: np.ndarray) -> None:
        """Put entries in the in-process layer only (their files are written elsewhere, e.g. by
        a helper process: workers.WorkerPool.submit_put)."""
        if self._mem is not None:
            rows = np.array(features, dtype=_F32)  # a copy: the caller may reuse its buffer
            with self._lock:
                for (h, view), row in zip(keys, rows):
                    self._mem[(backbone_id, h, view)] = row

    def clear_memory(self) -> None:
        if self._mem is not None:
            with self._lock:
                self._mem.clear()
