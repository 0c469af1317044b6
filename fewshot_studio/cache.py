"""On-disk feature cache keyed by (backbone id, image content hash, view index).

Why a cache and what it is keyed by: docs/design.md, "Feature cache".

Entries are stored in packs: one file per `put_many` call, holding that call's keys and
features, written atomically (temp file + rename) and never modified afterwards. Why packs and
not a file per entry: creating a file costs far more than writing a few hundred bytes into one
(about 0.24 ms per file on the project's CI disk, a third of the tiny encoder's time per image),
so a file per entry made the cache writes the slowest stage of the feature pipeline.

Pack layout (`<root>/<backbone>/<unique name>.pack`):

    b"FSFEAT01" | uint32 count | uint32 dim | uint32 key_bytes      (little-endian)
    key_bytes of UTF-8 JSON [[content hash, view], ...]             (count keys, in row order)
    zero padding to a multiple of 4 bytes
    count x dim little-endian float32 rows

A cache object indexes a backbone's packs lazily (key -> pack, row): it lists the folder again
only when a lookup misses (another process may have written since) and reads the headers of
packs it has not seen before; a hit reads its pack's rows with one read. A pack whose size does
not match its header (truncated, corrupt) or whose dimension is not the expected one counts as
missing, so its entries are recomputed. When a folder holds more than COMPACT_AT packs, the
lookup that notices merges the small ones into one (`compact`). An in-process dictionary sits in
front of the disk.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import statistics
import struct
import threading
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import AppConfig

log = logging.getLogger("fewshot_studio.cache")

Key = tuple[str, int]  # (content hash, view)
_F32 = np.dtype("<f4")
MAGIC = b"FSFEAT01"
_HEADER = struct.Struct("<8sIII")  # magic, count, dim, key_bytes
PACK_SUFFIX = ".pack"
COMPACT_AT = 512  # packs in a backbone's folder before a lookup merges the small ones
SMALL_PACK = 4096  # entries: larger packs are left as they are


def _safe(backbone_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id)[:120]


def encode_pack(keys: Sequence[Key], features: np.ndarray) -> bytes:
    """The bytes of one pack (layout in the module docstring)."""
    rows = np.ascontiguousarray(features, dtype=_F32)
    if rows.ndim != 2 or rows.shape[0] != len(keys):
        raise ValueError(f"{len(keys)} keys need a 2-D array of as many rows, not shape {rows.shape}")
    blob = json.dumps([[h, int(v)] for h, v in keys], separators=(",", ":")).encode()
    head = _HEADER.pack(MAGIC, len(keys), rows.shape[1], len(blob))
    pad = b"\0" * (-(len(head) + len(blob)) % 4)
    return b"".join((head, blob, pad, rows.tobytes()))


class _Pack:
    """What the index knows of one pack file: its keys (in row order), where the rows start, and
    their width."""

    __slots__ = ("path", "keys", "offset", "dim")

    def __init__(self, path: str, keys: list[Key], offset: int, dim: int):
        self.path, self.keys, self.offset, self.dim = path, keys, offset, dim


def read_pack_index(path: str) -> _Pack | None:
    """A pack's header and keys, or None where the file is not a whole, well-formed pack."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) != _HEADER.size:
                return None
            magic, count, dim, key_bytes = _HEADER.unpack(head)
            if magic != MAGIC or dim == 0:
                return None
            offset = _HEADER.size + key_bytes + (-(_HEADER.size + key_bytes) % 4)
            if os.fstat(f.fileno()).st_size != offset + 4 * count * dim:
                return None  # truncated or padded: not written by put_many
            keys = json.loads(f.read(key_bytes))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(keys, list) or len(keys) != count:
        return None
    try:
        parsed = [(str(h), int(v)) for h, v in keys]
    except (TypeError, ValueError):
        return None
    return _Pack(path, parsed, offset, dim)


class FeatureCache:
    """Persistent image-feature cache. `root=None` uses FEWSHOT_STUDIO_CACHE or the data dir."""

    def __init__(self, root: str | os.PathLike | None = None, memory: bool = True):
        self.root = Path(root) if root is not None else AppConfig.from_env().cache_dir
        self._mem: dict[tuple[str, str, int], np.ndarray] | None = {} if memory else None
        self._lock = threading.Lock()
        self._dirs: set[str] = set()  # directories known to exist
        self._folders: dict[str, str] = {}
        # per backbone: key -> (pack, row), and each pack file name already read (None: not a pack)
        self._index: dict[str, dict[Key, tuple[_Pack, int]]] = {}
        self._packs: dict[str, dict[str, _Pack | None]] = {}
        # file names unique per process and instance without a random-number syscall per file
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._count = itertools.count()
        self._compacting = False
        self.write_failures = 0  # pack writes that failed (e.g. a full disk): those entries live in memory only
        self._last_errno: int | None = None

    def folder(self, backbone_id: str) -> str:
        """The folder holding `backbone_id`'s packs."""
        f = self._folders.get(backbone_id)
        if f is None:
            f = self._folders.setdefault(backbone_id, os.path.join(self.root, _safe(backbone_id)))
        return f

    # ---- reading ------------------------------------------------------------------------------

    def get(self, backbone_id: str, h: str, view: int, dim: int | None = None) -> np.ndarray | None:
        return self.get_many(backbone_id, [(h, view)], dim)[0]

    def get_many(self, backbone_id: str, keys: Iterable[Key], dim: int | None = None) -> list[np.ndarray | None]:
        """The cached feature row of each key, None where missing (or of another dimension)."""
        keys = [(h, int(v)) for h, v in keys]
        out: list[np.ndarray | None] = [None] * len(keys)
        mem = self._mem
        missing = []
        for n, (h, v) in enumerate(keys):
            row = mem.get((backbone_id, h, v)) if mem is not None else None
            if row is not None and (dim is None or len(row) == dim):
                out[n] = row
            else:
                missing.append(n)
        if not missing:
            return out
        for attempt in range(2):  # a pack that vanished (merged by another process): list again, once
            index = self._index.get(backbone_id)
            if attempt or index is None or any(keys[n] not in index for n in missing):
                index = self._refresh(backbone_id)  # other processes may have written packs since
            by_pack: dict[str, tuple[_Pack, list[tuple[int, int]]]] = {}
            for n in missing:
                loc = index.get(keys[n])
                if loc is not None and (dim is None or loc[0].dim == dim):
                    by_pack.setdefault(loc[0].path, (loc[0], []))[1].append((n, loc[1]))
            missing = []
            for pack, wanted in by_pack.values():
                rows = self._read_rows(backbone_id, pack)
                if rows is None:
                    missing += [n for n, _ in wanted]
                    continue
                for n, r in wanted:
                    out[n] = rows[r]
            if not missing:
                break
        return out

    def _read_rows(self, backbone_id: str, pack: _Pack, remember: bool = True) -> np.ndarray | None:
        """All rows of `pack` (one read), remembered in memory; None if the file has gone."""
        size = 4 * len(pack.keys) * pack.dim
        try:
            with open(pack.path, "rb") as f:
                f.seek(pack.offset)
                raw = f.read(size)
        except OSError:
            raw = b""
        if len(raw) != size:  # deleted or truncated behind this instance's back
            with self._lock:
                self._forget(backbone_id, pack)
            return None
        rows = np.frombuffer(raw, dtype=_F32).reshape(len(pack.keys), pack.dim)
        if self._mem is not None and remember:
            with self._lock:
                for (h, v), row in zip(pack.keys, rows):
                    self._mem[(backbone_id, h, v)] = row
        return rows

    def _refresh(self, backbone_id: str) -> dict[Key, tuple[_Pack, int]]:
        """Index the packs of the backbone's folder that this instance has not read yet."""
        folder = self.folder(backbone_id)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        names = {e.name for e in entries if e.name.endswith(PACK_SUFFIX)}
        with self._lock:
            index = self._index.setdefault(backbone_id, {})
            packs = self._packs.setdefault(backbone_id, {})
            for name in [n for n in packs if n not in names]:  # deleted since
                if packs[name] is not None:
                    self._forget(backbone_id, packs[name])
                del packs[name]
            new = sorted(names.difference(packs))
        found = {name: read_pack_index(os.path.join(folder, name)) for name in new}
        with self._lock:
            for name, pack in found.items():
                packs[name] = pack
                if pack is not None:
                    index.update((key, (pack, r)) for r, key in enumerate(pack.keys))
            crowded = not self._compacting and sum(p is not None for p in packs.values()) > COMPACT_AT
        if crowded:
            self.compact(backbone_id)
        return index

    def compact(self, backbone_id: str) -> int:
        """Merge the backbone's small packs (fewer than SMALL_PACK entries each) into one, so that
        a cache written in many small batches stays quick to index; returns how many packs were
        merged. Safe while other processes read and write: the merged pack is complete before the
        small ones are deleted, and a reader that misses a deleted pack lists the folder again."""
        with self._lock:
            if self._compacting:
                return 0
            self._compacting = True
        try:
            self._refresh(backbone_id)
            small = [p for p in self._packs.get(backbone_id, {}).values() if p is not None and len(p.keys) < SMALL_PACK]
            if small:
                dim = statistics.mode(p.dim for p in small)  # one backbone, one width
                small = [p for p in small if p.dim == dim]
            if len(small) < 2:
                return 0
            merged: dict[Key, np.ndarray] = {}
            done = []
            for p in small:
                rows = self._read_rows(backbone_id, p, remember=False)
                if rows is not None:  # one that vanished was merged by another process
                    merged.update(zip(p.keys, rows))
                    done.append(p)
            if len(done) < 2:
                return 0
            if not self.put_many(backbone_id, list(merged), np.stack(list(merged.values())), remember=False):
                return 0  # the merged pack could not be written: the small ones stay
            for p in done:
                with contextlib.suppress(OSError):
                    os.unlink(p.path)
            self._refresh(backbone_id)  # forget the deleted packs
            return len(done)
        finally:
            self._compacting = False

    def _forget(self, backbone_id: str, pack: _Pack) -> None:
        """Drop the index entries that point into `pack` (called with the lock held)."""
        index = self._index.get(backbone_id, {})
        for key in pack.keys:
            if key in index and index[key][0] is pack:
                del index[key]

    def keys(self, backbone_id: str) -> set[Key]:
        """Every key with an entry on disk for `backbone_id` (as of now)."""
        return set(self._refresh(backbone_id))

    # ---- writing ------------------------------------------------------------------------------

    def put_many(self, backbone_id: str, keys: Sequence[Key], features: np.ndarray, remember: bool = True) -> bool:
        """Write the entries as one pack (atomically), and remember them in memory. Returns
        whether the pack is on disk: a write that fails (a full disk, a quota, a read-only
        folder) leaves no file and the entries uncached on disk, and the caller goes on with
        the features it has (the cache only saves time; it must never make work fail)."""
        keys = [(h, int(v)) for h, v in keys]
        if not keys:
            return True
        data = encode_pack(keys, features)
        folder = self.folder(backbone_id)
        name = f"{self._tag}{next(self._count)}{PACK_SUFFIX}"
        try:
            if folder not in self._dirs:
                os.makedirs(folder, exist_ok=True)
                self._dirs.add(folder)
            try:
                self._write(folder, name, data)
            except FileNotFoundError:  # the folder was deleted behind this instance's back
                os.makedirs(folder, exist_ok=True)
                self._write(folder, name, data)
        except OSError as e:
            self.write_failures += 1
            if self.write_failures == 1 or e.errno != self._last_errno:
                log.warning("the feature cache could not write to %s (%s); features are kept in memory only",
                            folder, e.strerror or e)
            self._last_errno = e.errno
            if remember:
                self.remember(backbone_id, keys, features)
            return False
        dim = int(np.shape(features)[1])
        pack = _Pack(os.path.join(folder, name), keys, len(data) - 4 * len(keys) * dim, dim)
        with self._lock:
            index = self._index.get(backbone_id)
            if index is not None:  # an instance that has listed the folder learns its own pack
                self._packs.setdefault(backbone_id, {})[name] = pack
                index.update((key, (pack, r)) for r, key in enumerate(keys))
        if remember:
            self.remember(backbone_id, keys, features)
        return True

    def _write(self, folder: str, name: str, data: bytes) -> None:
        path = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                view = memoryview(data)
                while view:  # a large pack may take several writes
                    written = os.write(fd, view)
                    if written <= 0:
                        raise OSError(errno.EIO, "short write to the feature cache", tmp)
                    view = view[written:]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remember(self, backbone_id: str, keys: Sequence[Key], features: np.ndarray) -> None:
        """Put entries in the in-process layer only (their pack is written elsewhere, e.g. by
        a helper process: workers.WorkerPool.submit_put)."""
        if self._mem is not None:
            rows = np.array(features, dtype=_F32)  # a copy: the caller may reuse its buffer
            with self._lock:
                for (h, view), row in zip(keys, rows):
                    self._mem[(backbone_id, h, int(view))] = row

    def clear_memory(self) -> None:
        """Forget everything held in this process (entries and the index of packs)."""
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            self._index.clear()
            self._packs.clear()
