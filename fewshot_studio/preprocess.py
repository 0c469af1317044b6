"""Torch-free image preprocessing: the plain and augmented crops of a decoded image, as uint8.

Kept free of torch so that decode worker processes start fast and never touch the encoder's
threads; `Backbone` turns the crops into normalised tensors (one vectorised op per batch).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from . import imageio


@dataclass(frozen=True)
class Cropper:
    """open_clip's eval crop (view 0) and seeded random-resized-crop + flip views (view >= 1)."""

    image_size: int

    def plain(self, img: Image.Image) -> np.ndarray:
        """Shortest side resized to image_size (bicubic), centre crop."""
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - s) // 2, (nh - s) // 2
        return np.array(img.crop((left, top, left + s, top + s)), dtype=np.uint8)

    def view(self, img: Image.Image, key: str, view: int) -> np.ndarray:
        """View `view` of an image: 0 plain; k >= 1 a random resized crop (scale 0.5-1, ratio
        3/4-4/3) and horizontal flip, seeded by (key, view) so it is reproducible and cacheable."""
        if view == 0:
            return self.plain(img)
        seed = int.from_bytes(hashlib.sha256(f"{key}:{view}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(0.5, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = min(w, h), min(w, h)
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        s = self.image_size
        crop = img.resize((s, s), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(crop, dtype=np.uint8)


# (index, view positions, file path or bytes, display name, content hash, views)
Task = tuple[int, list[int], object, str, str, Sequence[int]]


def decode_views(image_size: int, tasks: list[Task]) -> list[tuple[int, list[int], np.ndarray]]:
    """Decode each task's image once and crop its views: [(index, view positions, (V,s,s,3) uint8)].
    Runs in a worker process or thread; a bad file raises imageio.ImageError (picklable)."""
    cropper = Cropper(image_size)
    out = []
    for i, js, source, name, key, views in tasks:
        data = source if isinstance(source, (bytes, bytearray)) else imageio.read_bytes(source, name)[0]
        img = imageio.decode_image(data, name, draft_size=image_size)
        out.append((i, js, np.stack([cropper.view(img, key, v) for v in views])))
    return out
