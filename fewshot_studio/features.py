"""The feature pipeline: decode -> preprocess (plain or augmented view) -> batch -> encode -> cache.

Anything already in the FeatureCache is never re-encoded. Decoding, cropping, normalising and
cache writes run in helper processes (workers.shared_pool; threads where processes cannot be
started, or with decode="thread") so they overlap with encoding.

How the encoding thread is kept busy (a cheap encoder on a CPU notices every detail):
  * the helpers are processes, so their Python never holds the encoder's GIL;
  * they return one buffer of normalised pixels per job (preprocess.decode_batch), which the
    encoding thread encodes as it is, and they write the cache files, so it never waits for the file system;
  * chunks ramp up: the first is batch_size/8 images, decoded by the encoding thread itself
    while the helpers decode the second (2.5× as large); each later chunk is 1.35× the last (up
    to batch_size), so the encoder starts after a few images are decoded and the next chunk's
    decoding fits inside the current one's encoding (small batches encode less efficiently, so
    starting with a full batch would idle the encoder while it decodes);
  * a chunk goes out as one job per helper process (each message costs this process time);
  * where no helper process is running (still starting, or threads), the encoding thread decodes
    the not-yet-started jobs itself, from the back, instead of waiting;
  * the last chunk's cache entries are written by the encoding thread itself (it has nothing
    left to encode); every cache write has finished (or raised) before `image_features` returns
    or raises.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence

import numpy as np
import torch

from .backbone import Backbone
from .cache import FeatureCache
from .data import ImageRef
from .prompts import class_prompts
from .errors import Cancelled
from .preprocess import Task, decode_batch
from .progress import CancelFlag, Progress, ProgressFn
from .workers import join_batches, shared_pool


# Chunk sizes (see _ramp). Measured with the tiny backbone on 2 CPU cores: decoding takes about
# 0.5 ms per image and encoding 0.66 ms in full batches but 0.8 ms in batches of 8, so each chunk
# may be about 1.35× the last one and still be decoded before the encoder needs it.
RAMP_START = 8  # the first chunk is batch_size / RAMP_START images
RAMP_SECOND = 2.5  # the second is decoded from the start, while the first is decoded and encoded
RAMP_GROWTH = 1.35  # each later chunk this many times the previous one


class FeatureExtractor:
    """Image and class-text features for one backbone, through an optional FeatureCache."""

    def __init__(self, backbone: Backbone, cache: FeatureCache | None = None, batch_size: int = 64,
                 workers: int = 2, decode: str = "process"):
        if decode not in ("process", "thread"):
            raise ValueError(f"decode must be 'process' or 'thread', not {decode!r}")
        self.backbone = backbone
        self.cache = cache
        self.batch_size = batch_size
        self.workers = workers  # decode workers: processes (decode="process") or threads
        self.decode = decode
        self.encoded_images = 0  # how many (image, view) pairs went through the encoder
        self.encoded_hashes: set[str] = set()  # which distinct images did
        self._text_memo: dict[tuple[str, ...], torch.Tensor] = {}

    def image_features(self, refs: Sequence[ImageRef], views: Sequence[int] = (0,),
                       progress: ProgressFn | None = None, cancel: CancelFlag | None = None,
                       stage: str = "Extracting features") -> torch.Tensor:
        """(N, V, d) L2-normalised features of `refs` under `views` (0 = plain, k>0 = augmented)."""
        views = list(views)
        n, nv = len(refs), len(views)
        d = self.backbone.embed_dim
        out = np.zeros((n, nv, d), dtype=np.float32)
        bid = self.backbone.id
        # which images still need any view encoded
        todo: dict[int, list[int]] = {}
        keys = [(ref.hash, v) for ref in refs for v in views]
        hits = self.cache.get_many(bid, keys, d) if self.cache is not None else [None] * len(keys)
        for k, hit in enumerate(hits):
            i, j = divmod(k, nv)
            if hit is None:
                todo.setdefault(i, []).append(j)
            else:
                out[i, j] = hit
        if todo:
            self._encode_missing(refs, views, todo, out, progress, cancel, stage)
        return torch.from_numpy(out)

    def _encode_missing(self, refs, views, todo, out, progress, cancel, stage) -> None:
        tasks = _tasks(refs, views, todo)
        total = len(tasks)
        bb, bid = self.backbone, self.backbone.id
        load = functools.partial(decode_batch, bb.image_size, mean=bb.mean, std=bb.std)
        hash_of = {t[0]: t[4] for t in tasks}
        procs = shared_pool(max(1, self.workers)) if self.decode == "process" else None
        threads = None if procs is not None else ThreadPoolExecutor(max_workers=max(1, self.workers))
        writer = ThreadPoolExecutor(max_workers=1) if self.cache is not None and procs is None else None
        if procs is not None:
            submit = functools.partial(procs.submit_decode, bb.image_size, mean=bb.mean, std=bb.std)
        else:
            submit = functools.partial(threads.submit, load)

        def steal() -> bool:  # decode in this thread only where no helper process would
            return procs is None or procs.alive == 0

        # processes: one job per worker per chunk (fewer messages, less of this process's time);
        # threads: smaller jobs, so that this thread can take some over
        per_chunk = procs.size if procs is not None else 4 * (self.workers + 1)
        chunks = [_split(tasks[a:b], per_chunk)
                  for a, b in _ramp(total, max(1, self.batch_size // max(1, len(views))))]
        writes: list = []
        pending: list = []
        done = 0
        try:
            # chunk 0 is decoded right here while the helpers start on chunk 1; from then on chunk
            # k+1 is decoded while chunk k is encoded (at most two chunks in flight)
            pending = [submit(job) for job in chunks[1]] if len(chunks) > 1 else []
            for c in range(len(chunks)):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                _raise_failed(writes)
                if c == 0:
                    entries, pixels = join_batches([load(job) for job in chunks[0]])
                else:
                    entries, pixels = join_batches(_collect(pending, chunks[c], load, steal))
                    pending = [submit(job) for job in chunks[c + 1]] if c + 1 < len(chunks) else []
                feats = bb.encode_images(torch.from_numpy(pixels), batch_size=len(pixels)).numpy()
                self.encoded_images += len(pixels)
                self.encoded_hashes.update(hash_of[i] for i, _ in entries)
                keys, k = [], 0
                for i, js in entries:
                    for j in js:
                        out[i, j] = feats[k]
                        keys.append((hash_of[i], views[j]))
                        k += 1
                if procs is not None and self.cache is not None and c == len(chunks) - 1:
                    self.cache.put_many(bid, keys, feats)  # nothing left to encode: no need to wait for a helper
                elif procs is not None and self.cache is not None:
                    writes.append(procs.submit_put(self.cache.root, bid, keys, feats))
                    self.cache.remember(bid, keys, feats)
                elif writer is not None:
                    writes.append(writer.submit(self.cache.put_many, bid, keys, feats))
                done += len(entries)
                if progress is not None:
                    progress(Progress(stage, done, total))
        finally:
            for f in pending:  # this call's decode jobs still queued (after an error or cancel)
                f.cancel()
            if threads is not None:
                threads.shutdown(wait=True, cancel_futures=True)
            if writer is not None:
                writer.shutdown(wait=True)
            wait(writes)  # features already computed are still written
        _raise_failed(writes)

    def class_text_features(self, classnames: Sequence[str], descriptions: Sequence[str] | None = None,
                            templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, d) zero-shot class weights: the normalised mean of the normalised features of the
        class's prompts over the template ensemble, description appended (zero-shot CLIP, Radford
        et al., ICML 2021)."""
        return class_text_features(self.backbone, classnames, descriptions, templates, self._text_memo)


def load_pixels(backbone: Backbone, refs: Sequence[ImageRef], views: Sequence[int] = (0,), workers: int = 2,
                decode: str = "process") -> torch.Tensor:
    """(N, V, 3, s, s) normalised pixels of `refs` under `views` (0 plain, k > 0 augmented), decoded
    in the helper processes (threads where they cannot run), for methods that run the image
    encoder themselves (MMA)."""
    views = list(views)
    s = backbone.image_size
    out = np.empty((len(refs), len(views), 3, s, s), dtype=np.float32)
    if not len(refs):
        return torch.from_numpy(out)
    tasks = _tasks(refs, views, {i: list(range(len(views))) for i in range(len(refs))})
    load = functools.partial(decode_batch, s, mean=backbone.mean, std=backbone.std)
    procs = shared_pool(max(1, workers)) if decode == "process" else None
    if procs is None:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            parts = list(pool.map(load, _split(tasks, 4 * max(1, workers))))
    else:
        jobs = _split(tasks, procs.size)
        futures = [procs.submit_decode(s, job, backbone.mean, backbone.std) for job in jobs]
        try:
            parts = _collect(futures, jobs, load, lambda: procs.alive == 0)
        finally:
            for f in futures:
                f.cancel()
    entries, pixels = join_batches(parts)
    k = 0
    for i, js in entries:
        out[i, js] = pixels[k:k + len(js)]
        k += len(js)
    return torch.from_numpy(out)


def _tasks(refs: Sequence[ImageRef], views: Sequence[int], todo: dict[int, list[int]]) -> list[Task]:
    """Decode tasks: for image i (todo's key) the views at positions todo[i] of `views`."""
    return [(i, js, refs[i].data if refs[i].data is not None else str(refs[i].path),
             refs[i].name or str(refs[i].path), refs[i].hash, [views[j] for j in js])
            for i, js in todo.items()]


def _split(chunk: list, jobs: int) -> list[list]:
    """A chunk's images as at most `jobs` jobs of consecutive images."""
    n = max(1, math.ceil(len(chunk) / max(1, jobs)))
    return [chunk[s:s + n] for s in range(0, len(chunk), n)]


def _ramp(total: int, batch: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: batch/RAMP_START images first (decoded by the encoding thread
    while the helpers decode the second chunk, hence the second is RAMP_SECOND× as large), then
    RAMP_GROWTH× the previous, up to `batch`."""
    bounds, size, start = [], max(1, batch // RAMP_START), 0
    growth = RAMP_SECOND
    while start < total:
        end = min(total, start + size)
        bounds.append((start, end))
        start, size, growth = end, min(batch, math.ceil(size * growth)), RAMP_GROWTH
    return bounds


def _collect(futures: list, items: list, fn: Callable, steal: Callable[[], bool]) -> list:
    """Results of `futures` (fn(item) submitted to a pool) in order. While `steal()` says so, the
    calling thread runs the not-yet-started items itself, from the back, instead of idling while
    the pool works from the front. An error surfaces in item order, as `f.result()` would raise it."""
    results: list = [None] * len(futures)
    stolen: dict[int, BaseException] = {}
    for n in range(len(futures) - 1, -1, -1):
        if steal() and futures[n].cancel():
            try:
                results[n] = fn(items[n])
            except BaseException as e:  # noqa: BLE001 - re-raised below, in order
                stolen[n] = e
    for n, f in enumerate(futures):
        if n in stolen:
            raise stolen[n]
        if results[n] is None:
            results[n] = f.result()
    return results


def _raise_failed(futures: list) -> None:
    """Re-raise the first error of the finished background cache writes."""
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()


def class_text_features(backbone: Backbone, classnames: Sequence[str], descriptions: Sequence[str] | None = None,
                        templates: Sequence[str] | None = None,
                        memo: dict | None = None) -> torch.Tensor:
    templates = tuple(templates or backbone.templates)
    descriptions = list(descriptions) if descriptions is not None else [""] * len(classnames)
    key = (backbone.id, *templates, *classnames, "\x00", *descriptions)
    if memo is not None and key in memo:
        return memo[key]
    prompts = [p for c, dsc in zip(classnames, descriptions) for p in class_prompts(c, dsc, templates)]
    f = backbone.encode_texts(prompts).view(len(classnames), len(templates), -1)
    w = torch.nn.functional.normalize(f.mean(1), dim=-1)
    if memo is not None:
        memo[key] = w
    return w
