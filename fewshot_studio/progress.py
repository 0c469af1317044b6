"""Progress reports and cancel flags shared by the pipeline, the methods and the job runner."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol


@dataclass
class Progress:
    """One report: what stage, how far (step of total), and the latest loss / train accuracy."""

    stage: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    accuracy: float | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = self.stage
        if self.total:
            s += f" {self.step}/{self.total}"
        if self.loss is not None:
            s += f", loss {self.loss:.4f}"
        if self.accuracy is not None:
            s += f", train acc {self.accuracy:.1%}"
        return s


ProgressFn = Callable[[Progress], None]


class CancelFlag(Protocol):
    """Anything with is_set(), e.g. threading.Event."""

    def is_set(self) -> bool: ...
