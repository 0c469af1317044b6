"""Images and support sets: the data every method trains on."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from . import imageio
from .errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".pgm", ".ppm"}


@dataclass(frozen=True)
class ImageRef:
    """One image, identified by the SHA-256 of its bytes; read from `path` or held in `data`."""

    hash: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)
    name: str = ""

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "ImageRef":
        data, name = imageio.read_bytes(path)
        return cls(imageio.content_hash(data), Path(path), None, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "image") -> "ImageRef":
        return cls(imageio.content_hash(data), None, data, name)

    @classmethod
    def from_pil(cls, image: Image.Image, name: str = "image.png") -> "ImageRef":
        import io

        buf = io.BytesIO()
        image.save(buf, "PNG")
        return cls.from_bytes(buf.getvalue(), name)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return imageio.read_bytes(self.path)[0]

    def open(self, draft_size: int | None = None) -> Image.Image:
        """Decoded RGB image; raises imageio.ImageError for a bad file."""
        return imageio.decode_image(self.read(), self.name or str(self.path), draft_size=draft_size)


@dataclass
class SupportSet:
    """The labelled examples: class names (order = label index), optional descriptions,
    images and their integer labels."""

    classnames: list[str]
    images: list[ImageRef] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    descriptions: list[str] | None = None

    def __post_init__(self) -> None:
        validate_classnames(self.classnames)
        if len(self.images) != len(self.labels):
            raise DataError("Every image needs exactly one label.")
        if self.labels and (min(self.labels) < 0 or max(self.labels) >= len(self.classnames)):
            raise DataError("A label points at a class that does not exist.")
        if self.descriptions is not None and len(self.descriptions) != len(self.classnames):
            raise DataError("Give one description per class (an empty string for none).")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=int), minlength=self.num_classes).tolist()

    def labels_tensor(self):
        import torch

        return torch.as_tensor(self.labels, dtype=torch.long)

    def subset(self, indices: Sequence[int]) -> "SupportSet":
        return SupportSet(list(self.classnames), [self.images[i] for i in indices],
                          [self.labels[i] for i in indices],
                          None if self.descriptions is None else list(self.descriptions))

    def add(self, image: ImageRef, label: int) -> "SupportSet":
        return SupportSet(list(self.classnames), self.images + [image], self.labels + [label],
                          None if self.descriptions is None else list(self.descriptions))

    def require_images(self, method_label: str) -> None:
        """One clear sentence when a class has no images but the method needs them."""
        empty = [c for c, n in zip(self.classnames, self.counts()) if n == 0]
        if empty:
            raise DataError(f"{method_label} needs at least one image in every class; "
                            f"add images to {', '.join(repr(c) for c in empty)} or pick zero-shot or MMA.")

    @classmethod
    def from_folder(cls, root: str | os.PathLike, shots: int | None = None, seed: int = 0
                    ) -> tuple["SupportSet", list[str]]:
        """Read an ImageFolder tree (one sub-folder per class). With `shots`, sample that many
        images per class by `seed`. Returns the set and one message per unreadable file."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"The data folder {root} does not exist or is not a folder.")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"The data folder {root} has no class sub-folders (expected DIR/class_name/image.jpg).")
        rng = np.random.default_rng(seed)
        images, labels, errors = [], [], []
        for label, c in enumerate(classes):
            files = sorted(p for p in (root / c).rglob("*") if p.is_file() and not p.name.startswith("."))
            if shots is not None and len(files) > shots:
                files = [files[i] for i in sorted(rng.choice(len(files), size=shots, replace=False))]
            for p in files:
                try:
                    images.append(ImageRef.from_path(p))
                    labels.append(label)
                except imageio.ImageError as e:
                    errors.append(str(e))
        return cls(classes, images, labels), errors


def validate_classnames(names: Iterable[str]) -> None:
    names = list(names)
    if not names:
        raise DataError("Add at least one class before training.")
    seen: set[str] = set()
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise DataError("Class names cannot be blank.")
        key = n.strip().casefold()
        if key in seen:
            raise DataError(f"The class name {n!r} is used twice; class names must be unique.")
        seen.add(key)


def list_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of candidate files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        else:
            out.append(p)
    return out
