"""The synthetic world of the `tiny` backbone: captioned images of coloured shapes.

Deterministic given a seed. Used to pretrain `tiny` (docs/design.md, "The tiny backbone"), to build the
offline example project, and by tests that need a learnable task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Vertices of the shape centred at (cx, cy) with circumradius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        angles, radii = [rot + math.pi / 4 + k * math.pi / 2 for k in range(4)], [r] * 4
    elif shape == "triangle":
        angles, radii = [rot + k * 2 * math.pi / 3 for k in range(3)], [r] * 3
    elif shape == "hexagon":
        angles, radii = [rot + k * math.pi / 3 for k in range(6)], [r] * 6
    elif shape == "star":
        angles = [rot + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    elif shape == "cross":
        w = 0.38 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rr * math.sin(a), cy - rr * math.cos(a)) for a, rr in zip(angles, radii)]


def _background(rng: np.random.Generator, fg: tuple[int, int, int]) -> tuple[int, int, int]:
    """A muted random background that stays distinguishable from the shape colour."""
    while True:
        bg = tuple(int(v) for v in rng.integers(60, 200, size=3))
        if sum(abs(a - b) for a, b in zip(bg, fg)) > 150:
            return bg  # type: ignore[return-value]


def render(spec: ShapeSpec, rng: np.random.Generator, size: int = 48, supersample: int = 4) -> Image.Image:
    """Draw one shape at a random size, position and rotation on a random background."""
    fg = COLOURS[spec.colour]
    big = size * supersample
    img = Image.new("RGB", (big, big), _background(rng, fg))
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.22, 0.42)) * big
    cx, cy = (float(rng.uniform(r, big - r)) for _ in range(2))
    rot = float(rng.uniform(0, 2 * math.pi))
    poly = _polygon(spec.shape, cx, cy, r, rot)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon(poly, fill=fg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def sample_specs(n: int, rng: np.random.Generator, classes: tuple[str, ...] = CLASSES) -> list[ShapeSpec]:
    idx = rng.integers(0, len(classes), size=n)
    return [ShapeSpec(*classes[i].split(" ", 1)) for i in idx]


def make_dataset(n: int, seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (uint8, N×size×size×3) and their class indices into CLASSES."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    images = np.stack([
        np.asarray(render(ShapeSpec(*CLASSES[i].split(" ", 1)), rng, size)) for i in labels
    ])
    return images, labels


def write_image_folder(root, classes: dict[str, str], per_class: int, seed: int, size: int = 96,
                       fmt: str = "PNG") -> None:
    """Write an ImageFolder tree: `classes` maps folder name -> colour-shape label."""
    from pathlib import Path

    rng = np.random.default_rng(seed)
    root = Path(root)
    for folder, label in classes.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        spec = ShapeSpec(*label.split(" ", 1))
        for k in range(per_class):
            render(spec, rng, size).save(d / f"{k:03d}.{fmt.lower()}", fmt)
