"""The benchmark's settings and its error, apart from the harness so that the CLI can build its
parser without importing torch (`predict --onnx` runs where torch is not installed)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FewShotError

GRAPH_CLASSES = 100  # C of the batched-vs-loop GraphAdapter step
POOL_IMAGES = 10_000  # the long-pool scenario (issue #15, item 6): pool size of the pool_* keys


class BenchError(FewShotError):
    """A benchmark setting that cannot be run."""


@dataclass
class BenchConfig:
    classes: int = 20
    shots: int = 16
    images: int = 512
    repeats: int = 9  # rounds per ratio (retraining and MMA: at most 3, each round is seconds long)
    batch_size: int = 64
    threads: int | None = None  # None: cores - 1 on CPU, torch's setting on CUDA
    workers: int | None = None  # None: the remaining cores on CPU (at least 1), 2 on CUDA
    graph_classes: int = GRAPH_CLASSES
    pool_images: int = POOL_IMAGES  # the long-pool scenario's pool (pool_* keys)
    work_dir: str | None = None  # where the images and caches go (default: the system temp dir)

    def validate(self) -> None:
        for name in ("classes", "shots", "images", "repeats", "batch_size", "graph_classes", "pool_images"):
            if int(getattr(self, name)) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.classes < 2:
            raise BenchError("--classes must be at least 2 (a classifier needs two classes).")
        for name in ("threads", "workers"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise BenchError(f"--{name} must be at least 1.")
