"""The feature pipeline: decode -> preprocess (plain or augmented view) -> batch -> encode -> cache.

Decoding and cropping run in a small thread pool (PIL releases the GIL) so they overlap with
encoding; anything already in the FeatureCache is never re-encoded.

How the encoding thread is kept busy (a cheap encoder on a CPU notices every detail):
  * a chunk's images are decoded as a few tasks of several images, not one task per image;
  * workers return uint8 crops (preprocess.decode_views); the encoding thread normalises a whole
    batch in one vectorised op;
  * when the pool has not finished the next chunk, the encoding thread decodes the not-yet-started
    tasks itself (from the back, while the pool works from the front) instead of waiting;
  * cache writes run on a thread of their own, so the encoder never waits for the file system;
    they have all finished (or raised) before `image_features` returns or raises.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from .backbone import Backbone
from .cache import FeatureCache
from .data import ImageRef, prompt_name
from .errors import Cancelled
from .preprocess import decode_views
from .progress import CancelFlag, Progress, ProgressFn


class FeatureExtractor:
    """Image and class-text features for one backbone, through an optional FeatureCache."""

    def __init__(self, backbone: Backbone, cache: FeatureCache | None = None, batch_size: int = 64,
                 workers: int = 2):
        self.backbone = backbone
        self.cache = cache
        self.batch_size = batch_size
        self.workers = workers
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
        for i, ref in enumerate(refs):
            for j, v in enumerate(views):
                hit = self.cache.get(bid, ref.hash, v, d) if self.cache is not None else None
                if hit is None:
                    todo.setdefault(i, []).append(j)
                else:
                    out[i, j] = hit
        if todo:
            self._encode_missing(refs, views, todo, out, progress, cancel, stage)
        return torch.from_numpy(out)

    def _encode_missing(self, refs, views, todo, out, progress, cancel, stage) -> None:
        tasks = [(i, js, refs[i].data if refs[i].data is not None else str(refs[i].path),
                  refs[i].name or str(refs[i].path), refs[i].hash, [views[j] for j in js])
                 for i, js in todo.items()]
        total = len(tasks)
        bs = max(1, self.batch_size // max(1, len(views)))
        bid = self.backbone.id
        done = 0
        load = functools.partial(decode_views, self.backbone.image_size)
        hash_of = {t[0]: t[4] for t in tasks}

        def split(chunk):
            # a few tasks per chunk, not one per image: each task costs the encoding thread a
            # submit and a result
            n = max(1, math.ceil(len(chunk) / (4 * (self.workers + 1))))
            return [chunk[s:s + n] for s in range(0, len(chunk), n)]

        # a small first chunk: the encoder starts after a short decode instead of a full batch's
        first = min(total, max(1, bs // 4))
        bounds = [0, first] + list(range(first + bs, total, bs)) + [total]
        chunks = [split(tasks[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
        writer = ThreadPoolExecutor(max_workers=1) if self.cache is not None else None
        writes: list = []
        pool = ThreadPoolExecutor(max_workers=max(1, self.workers))
        try:
            # decode chunk k+1 while chunk k is encoded; at most two chunks in flight
            pending = [pool.submit(load, it) for it in chunks[0]] if chunks else []
            for c in range(len(chunks)):
                if cancel is not None and cancel.is_set():
                    for f in pending:
                        f.cancel()
                    raise Cancelled()
                _raise_failed(writes)
                chunk = [r for group in _collect(pending, chunks[c], load) for r in group]
                pending = [pool.submit(load, it) for it in chunks[c + 1]] if c + 1 < len(chunks) else []
                pixels = self.backbone.normalize(np.concatenate([crops for _, _, crops in chunk]))
                feats = self.backbone.encode_images(pixels, batch_size=len(pixels)).numpy()
                self.encoded_images += len(pixels)
                self.encoded_hashes.update(hash_of[i] for i, _, _ in chunk)
                keys, k = [], 0
                for i, js, _ in chunk:
                    for j in js:
                        out[i, j] = feats[k]
                        keys.append((hash_of[i], views[j]))
                        k += 1
                if writer is not None:
                    writes.append(writer.submit(self.cache.put_many, bid, keys, feats))
                done += len(chunk)
                if progress is not None:
                    progress(Progress(stage, done, total))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if writer is not None:
                writer.shutdown(wait=True)
        _raise_failed(writes)

    def class_text_features(self, classnames: Sequence[str], descriptions: Sequence[str] | None = None,
                            templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, d) zero-shot class weights: the normalised mean of the normalised features of the
        class's prompts over the template ensemble, description appended (SPEC §5.1)."""
        return class_text_features(self.backbone, classnames, descriptions, templates, self._text_memo)


def _collect(futures: list, items: list, fn: Callable) -> list:
    """Results of `futures` (fn(item) submitted to a pool) in order. Instead of idling while the
    pool catches up, the calling thread runs the not-yet-started items itself, from the back, while
    the pool works from the front. An error surfaces in item order, as `f.result()` would raise it."""
    results: list = [None] * len(futures)
    stolen: dict[int, BaseException] = {}
    for n in range(len(futures) - 1, -1, -1):
        if futures[n].cancel():
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


def class_prompts(classname: str, description: str | None, templates: Sequence[str]) -> list[str]:
    name = prompt_name(classname)
    extra = f" {description.strip()}" if description and description.strip() else ""
    return [t.format(name) + extra for t in templates]


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
