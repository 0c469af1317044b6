"""Background jobs: all long work runs off the request thread (docs/design.md, "Background jobs").

`JobRunner.submit` runs any callable as a job. The app runs three kinds: training
(`submit_training`: fit a method on a snapshot of the support set, retrying a GPU
out-of-memory with half the batch size and then on the CPU), cross-validation
(`app.modeling.start_evaluation`) and pool labeling (`app.modeling.start_labeling`).

One queue: a job waits for its resource (one GPU job at a time; a bounded number of CPU
jobs), reports Progress that callers poll (`get`) or subscribe to, stops within one
step on `cancel`, and ends as done, failed (one sentence) or cancelled. A finished
training writes its model into the ProjectStore atomically; a cancelled or failed one
leaves the project exactly as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import Cancelled, FewShotError
from .markup import no_paths
from .progress import FINISHED, JobStatus, Progress

# plain strings (what the store keeps and JobState carries), named once in progress.JobStatus
QUEUED, RUNNING, DONE, FAILED, CANCELLED = (s.value for s in JobStatus)
# the kinds of long work the app runs as jobs, and how a sentence names each
TRAIN, EVALUATE, LABEL = "train", "evaluate", "label"
KIND_NAMES = {TRAIN: "Training", EVALUATE: "Cross-validation", LABEL: "Labeling the pool"}


@dataclass
class JobState:
    """A snapshot of one job, safe to hand to any thread or UI."""

    id: str
    kind: str
    project_id: Any
    status: str = QUEUED
    owner: str | None = None  # the browser session that started it (its limit and its Cancel)
    stage: str = "Waiting in the queue"
    step: int = 0
    total: int = 0
    loss: float | None = None
    accuracy: float | None = None
    message: str = ""
    device: str = "cpu"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stage_started: float | None = None  # when the current stage began (its pace gives the time left)
    history: list[dict] = field(default_factory=list)
    result: Any = None

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else (1.0 if self.status == DONE else 0.0)

    def describe(self) -> str:
        if self.status in (FAILED, CANCELLED) or (self.status == DONE and self.message):
            return self.message
        return str(Progress(self.stage, self.step, self.total, self.loss, self.accuracy))


class Job:
    """A running job's live state; the worker thread calls `report`."""

    def __init__(self, state: JobState):
        self._state = state
        self.kind = state.kind
        self._lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.done_event = threading.Event()
        self._listeners: list[Callable[[JobState], None]] = []

    def snapshot(self) -> JobState:
        with self._lock:
            return dataclasses.replace(self._state, history=list(self._state.history))

    def update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._state, k, v)
        self._notify()

    def report(self, p: Progress) -> None:
        """Progress callback handed to fit loops and the feature pipeline."""
        with self._lock:
            s = self._state
            if p.stage != s.stage or p.step < s.step:
                s.stage_started = time.time()
            s.stage, s.step, s.total = p.stage, p.step, p.total
            if p.loss is not None:
                s.loss, s.accuracy = p.loss, p.accuracy
                s.history.append({"step": p.step, "loss": p.loss, "accuracy": p.accuracy})
        self._notify()

    def subscribe(self, fn: Callable[[JobState], None]) -> None:
        self._listeners.append(fn)

    def _notify(self) -> None:
        snap = self.snapshot()
        for fn in list(self._listeners):
            with contextlib.suppress(Exception):  # a broken listener must not kill training
                fn(snap)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _os_error_sentence(e: OSError) -> str:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ("The disk is full, so the result could not be saved; free some space and try again "
                "(nothing saved before was lost).")
    return f"Could not write the result ({e.strerror or no_paths(e)}); nothing saved before was lost."


def gpu_wrap(fn: Callable) -> Callable:
    """On Hugging Face ZeroGPU Spaces run the GPU step under `spaces.GPU`."""
    try:
        import spaces  # type: ignore
    except ImportError:
        return fn
    return spaces.GPU(duration=300)(fn)


class JobRunner:
    """Runs jobs in worker threads: one GPU job at a time, at most `max_cpu_jobs` CPU jobs.

    `store` (a ProjectStore, optional) mirrors each job's status into the database so a
    restart can mark interrupted jobs failed.
    """

    def __init__(self, store=None, max_cpu_jobs: int = 1):
        self.store = store
        self._gpu = threading.Semaphore(1)
        self._cpu = threading.Semaphore(max(1, max_cpu_jobs))
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # ---- generic jobs ------------------------------------------------------------
    def submit(self, kind: str, fn: Callable[[Job], Any], project_id: Any = None, device: str = "cpu",
               owner: str | None = None) -> str:
        """Queue `fn(job)`; its return value becomes the job's result."""
        job_id = self._new_id(kind, project_id)
        job = Job(JobState(job_id, kind, project_id, device=device, owner=owner))
        with self._lock:
            self._jobs[job_id] = job
        if self.store is not None:
            job.subscribe(functools.partial(self._persist, last=[0.0]))
        threading.Thread(target=self._run, args=(job, fn), name=f"job-{job_id}", daemon=True).start()
        return job_id

    def _new_id(self, kind: str, project_id: Any) -> str:
        if self.store is not None and project_id is not None:
            return str(self.store.create_job(project_id, kind).id)
        return uuid.uuid4().hex[:12]

    def _persist(self, s: JobState, last: list[float]) -> None:
        # throttle progress writes; status changes always land
        now = time.time()
        if s.status == RUNNING and now - last[0] < 0.5:
            return
        last[0] = now
        with contextlib.suppress(Exception):
            self.store.update_job(int(s.id), status=s.status, message=s.message,
                                  progress={"stage": s.stage, "step": s.step, "total": s.total,
                                            "loss": s.loss, "accuracy": s.accuracy})

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        sem = self._gpu if job.snapshot().device.startswith("cuda") else self._cpu
        with sem:
            if job.cancel_event.is_set():
                job.update(status=CANCELLED, message="Cancelled before it started; nothing changed.",
                           finished=time.time())
                job.done_event.set()
                return
            job.update(status=RUNNING, started=time.time(), stage="Starting")
            try:
                result = fn(job)
            except Cancelled as e:
                job.update(status=CANCELLED, message=str(e), finished=time.time())
            except FewShotError as e:
                job.update(status=FAILED, message=no_paths(e), finished=time.time())
            except OSError as e:
                job.update(status=FAILED, message=_os_error_sentence(e), finished=time.time())
            except Exception as e:  # noqa: BLE001 - report any failure as one sentence
                traceback.print_exc()
                first = no_paths((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
                job.update(status=FAILED, message=f"{KIND_NAMES.get(job.kind, 'The job')} failed unexpectedly: {first}.",
                           finished=time.time())
            else:
                s = job.snapshot()
                job.update(status=DONE, result=result, finished=time.time(), stage="Done",
                           step=s.total or s.step, message=s.message)
            finally:
                job.done_event.set()

    # ---- queries -------------------------------------------------------------------
    def get(self, job_id: str) -> JobState:
        with self._lock:
            job = self._jobs.get(str(job_id))
        if job is None:
            raise KeyError(f"There is no job {job_id}.")
        return job.snapshot()

    def jobs(self, project_id: Any = None) -> list[JobState]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.snapshot() for j in jobs if project_id is None or j.snapshot().project_id == project_id]

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(str(job_id))
        if job is None or job.snapshot().status in FINISHED:
            return False
        job.cancel_event.set()
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        with self._lock:
            job = self._jobs[str(job_id)]
        job.done_event.wait(timeout)
        return job.snapshot()

    def subscribe(self, job_id: str, fn: Callable[[JobState], None]) -> None:
        with self._lock:
            self._jobs[str(job_id)].subscribe(fn)

    # ---- training ----------------------------------------------------------------------
    def submit_training(self, project_id: Any, method: str, backbone, extractor, support=None,
                        descriptions=None, owner: str | None = None, **overrides) -> str:
        """Train `method` on the project's support set (snapshotted now, so later edits don't
        leak into this run) and register the model in the store when it finishes."""
        if support is None:
            if self.store is None:
                raise ValueError("submit_training needs a support set or a store")
            support = self.store.support_set(project_id)
        from .methods import get_method_class, make_method

        cls = get_method_class(method)
        if cls.needs_images:
            support.require_images(cls.label)  # fail now, in the request, with one sentence
        make_method(method, backbone, support.classnames, support.descriptions, **overrides)  # validates settings

        def work(job: Job):
            return self._train(job, project_id, method, backbone, extractor, support, overrides)

        return self.submit(TRAIN, work, project_id, device=str(backbone.device), owner=owner)

    def _train(self, job: Job, project_id, method_name, backbone, extractor, support, overrides):
        from .methods import make_method

        attempt_overrides = dict(overrides)
        notes: list[str] = []
        while True:
            method = make_method(method_name, backbone, support.classnames, support.descriptions,
                                 **attempt_overrides)
            method.to(backbone.device)
            try:
                fit = gpu_wrap(method.fit)
                fit(support, extractor, progress=job.report, cancel=job.cancel_event)
                break
            except Exception as e:
                if not (_is_oom(e) and backbone.device.type == "cuda"):
                    raise
                torch.cuda.empty_cache()
                bs = getattr(method.config, "batch_size", None)
                if bs and bs > 1 and not notes:
                    attempt_overrides["batch_size"] = max(1, bs // 2)
                    notes.append(f"The GPU ran out of memory; retried with batch size {bs // 2}.")
                else:
                    from dataclasses import replace

                    from .backbone import load_backbone
                    from .features import FeatureExtractor

                    backbone = load_backbone(replace(backbone.spec, device="cpu"))
                    extractor = FeatureExtractor(backbone, extractor.cache)
                    notes.append("The GPU ran out of memory; training continued on the CPU.")
                job.update(message=" ".join(notes), device=str(backbone.device))
        if self.store is None:
            return method
        tmp = Path(tempfile.mkdtemp(prefix=f"job-{job.snapshot().id}-", dir=self.store.staging_dir()))
        try:
            method.save(tmp / "model")
            info = self.store.register_model(project_id, method.name, backbone.id, method.config_dict(),
                                             method.metrics, tmp / "model")
            with contextlib.suppress(Exception):
                self.store.update_job(int(job.snapshot().id), model_id=info.id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return info
