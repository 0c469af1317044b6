"""Progress reports and cancel flags shared by the pipeline, the methods and the job runner."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Callable, Protocol


class JobStatus(str, Enum):
    """Where a long piece of work (a training, a cross-validation, a pool labeling) stands: the
    one definition the job runner, the store and the UI share. Members equal their strings
    (`JobStatus.DONE == "done"`), which is what the store keeps."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


#: The statuses a job ends in.
FINISHED = tuple(s.value for s in JobStatus if s.finished)


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
