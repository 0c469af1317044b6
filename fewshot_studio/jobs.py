"""Background jobs: all long work runs off the request thread (docs/design.md, "Background jobs").

`JobRunner.submit` runs any callable as a job. The app runs three kinds: training
(`submit_training`: fit a method on a snapshot of the support set, retrying a GPU
out-of-memory with half the batch size and then on the CPU), cross-validation
(`app.modeling.start_evaluation`) and pool labeling (`app.modeling.start_labeling`).

One queue: a job waits for its resource (one GPU job at a time; a bounded number of CPU
jobs), reports Progress that callers poll (`get`) or subscribe to, stops within one
step on `cancel`, and ends as done, failed (one sentence) or cancelled. The slots are
shared fairly between visitors (`FairSlots`): waiting jobs are served round-robin by
owner, and a job that has held its slot for `TIME_SLICE_SECONDS` lends it, at its next
progress report, to a waiting job of another owner, so one visitor's long training cannot
hold the machine while another's waits. A finished
training writes its model into the ProjectStore atomically; a cancelled or failed one
leaves the project exactly as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
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
EXPORT = "export"  # an export that takes seconds (a model as ONNX)
#: the low-priority kind (`JobRunner.submit_background`): plain-view features of new uploads
ENCODE = "encode"
KIND_NAMES = {TRAIN: "Training", EVALUATE: "Cross-validation", LABEL: "Labeling the pool", EXPORT: "Exporting",
              ENCODE: "Preparing features"}
#: The stage prefix while a closed-form method refits with augmented views after its first model.
REFINING = "First model on plain views ready; refining with augmented views"
#: The stage a background job shows while it waits for the other jobs to finish.
YIELDED_STAGE = "Waiting: another job runs first"
#: How often a waiting background job looks again (seconds): it holds no slot, so nothing wakes it.
BACKGROUND_POLL = 0.05
#: How long a job keeps its slot while a job of another owner (visitor) waits: at its next
#: progress report after this many seconds it lets the waiting job run, then queues again.
TIME_SLICE_SECONDS = 5.0
#: The stage a started job shows while it waits for its turn again.
PAUSED_STAGE = "Paused: sharing the machine with another visitor"


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
    model_id: int | None = None  # a model this job has registered so far (a first model on plain views)

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
        # set by the runner: called after each report so the job can lend its slot (fair share)
        self.on_report: Callable[["Job"], None] | None = None

    @property
    def owner(self) -> str | None:
        return self._state.owner

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
        if self.on_report is not None:
            self.on_report(self)

    def pause(self) -> tuple[str, float | None, float]:
        """Show PAUSED_STAGE while the job waits for its slot again; what `resume` needs."""
        with self._lock:
            saved = (self._state.stage, self._state.stage_started, time.time())
            self._state.stage = PAUSED_STAGE
        self._notify()
        return saved

    def resume(self, saved: tuple[str, float | None, float]) -> None:
        """Back to the stage it paused in; the pause does not count in the stage's pace."""
        stage, started, paused_at = saved
        with self._lock:
            if self._state.stage == PAUSED_STAGE:
                self._state.stage = stage
                self._state.stage_started = None if started is None else started + (time.time() - paused_at)
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


class FairSlots:
    """`n` slots that jobs of several owners (browser sessions) share fairly.

    A free slot goes to the waiting job whose owner's last turn is the longest ago (an owner
    who has had none goes first), that owner's oldest job first: round-robin by owner, not
    first come first served. A job that has held its slot for `quantum` seconds while a job
    of another owner waits should lend it (`should_yield`): release, then `acquire` again.
    Jobs of one owner never preempt each other."""

    def __init__(self, n: int = 1, quantum: float = TIME_SLICE_SECONDS):
        self.n, self.quantum = max(1, n), quantum
        self._cond = threading.Condition()
        self._holders: dict[Job, float] = {}  # job -> when it got its slot
        self._waiting: list[Job] = []
        self._arrival: dict[Job, int] = {}  # a job keeps its place among its owner's jobs
        self._turns: dict[str | None, int] = {}  # owner -> number of its last grant
        self._count = itertools.count()

    def _next(self) -> Job | None:
        live = [j for j in self._waiting if not j.cancel_event.is_set()]
        if not live:
            return None
        return min(live, key=lambda j: (self._turns.get(j.owner, -1), self._arrival[j]))

    def acquire(self, job: Job) -> bool:
        """Wait for a slot; False (without one) when the job is cancelled meanwhile."""
        with self._cond:
            self._arrival.setdefault(job, next(self._count))
            self._waiting.append(job)
            try:
                while True:
                    if job.cancel_event.is_set():
                        return False
                    if len(self._holders) < self.n and self._next() is job:
                        self._holders[job] = time.monotonic()
                        self._turns[job.owner] = next(self._count)
                        return True
                    self._cond.wait()
            finally:
                self._waiting.remove(job)
                self._cond.notify_all()

    def release(self, job: Job, *, done: bool = True) -> None:
        """Give the slot back (harmless when the job holds none)."""
        with self._cond:
            self._holders.pop(job, None)
            if done:
                self._arrival.pop(job, None)
            self._cond.notify_all()

    def should_yield(self, job: Job) -> bool:
        with self._cond:
            since = self._holders.get(job)
            return (since is not None and time.monotonic() - since >= self.quantum
                    and any(w.owner != job.owner and not w.cancel_event.is_set() for w in self._waiting))

    def wake(self) -> None:
        """Let waiting jobs look at their cancel flags again."""
        with self._cond:
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)


class JobRunner:
    """Runs jobs in worker threads: one GPU job at a time, at most `max_cpu_jobs` CPU jobs,
    shared fairly between owners (`FairSlots`, time slices of `time_slice` seconds).

    `store` (a ProjectStore, optional) mirrors each job's status into the database so a
    restart can mark interrupted jobs failed.
    """

    def __init__(self, store=None, max_cpu_jobs: int = 1, time_slice: float = TIME_SLICE_SECONDS):
        self.store = store
        self._gpu = FairSlots(1, time_slice)
        self._cpu = FairSlots(max_cpu_jobs, time_slice)
        self._jobs: dict[str, Job] = {}
        self._background: set[str] = set()  # ids of the low-priority jobs (submit_background)
        self._background_turn = threading.Lock()  # one background job at a time
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
            job.subscribe(functools.partial(self._persist, last=[0.0, QUEUED]))
        threading.Thread(target=self._run, args=(job, fn), name=f"job-{job_id}", daemon=True).start()
        return job_id

    def submit_background(self, kind: str, fn: Callable[[Job], Any], project_id: Any = None) -> str:
        """Queue `fn(job)` at the lowest priority: it takes no slot, runs only while no other job
        is queued or running (one background job at a time), and at each of its progress
        reports waits (showing YIELDED_STAGE) while one is, so a user's training or prediction
        never waits for it: at most the step in progress overlaps a job that has just started
        (the caller keeps steps short). It is cancellable like any job, is never stored (a
        restart forgets it: it only warms the feature cache) and is not listed by `jobs`
        unless asked for (`background=True`)."""
        job_id = uuid.uuid4().hex[:12]
        job = Job(JobState(job_id, kind, project_id))
        with self._lock:
            self._jobs[job_id] = job
            self._background.add(job_id)
        threading.Thread(target=self._run_background, args=(job, fn), name=f"background-{job_id}",
                         daemon=True).start()
        return job_id

    def foreground_busy(self) -> bool:
        """Whether a job other than a background one is queued or running."""
        with self._lock:
            jobs = [j for i, j in self._jobs.items() if i not in self._background]
        return any(j.snapshot().status not in FINISHED for j in jobs)

    def _wait_for_foreground(self, job: Job) -> None:
        """Stand still while another job is queued or running; Cancelled if cancelled meanwhile."""
        if not self.foreground_busy():
            return
        stage = job.snapshot().stage
        job.update(stage=YIELDED_STAGE)
        while self.foreground_busy():
            if job.cancel_event.wait(BACKGROUND_POLL):
                raise Cancelled("Cancelled; what was done is kept.")
        job.update(stage=stage)

    def _run_background(self, job: Job, fn: Callable[[Job], Any]) -> None:
        try:
            with self._background_turn:
                try:
                    self._wait_for_foreground(job)
                    if job.cancel_event.is_set():
                        raise Cancelled("Cancelled before it started; nothing changed.")
                except Cancelled as e:
                    job.update(status=CANCELLED, message=str(e), finished=time.time())
                else:
                    job.on_report = self._wait_for_foreground
                    self._execute(job, fn, quiet=True)
        finally:
            job.on_report = None
            job.done_event.set()

    def _new_id(self, kind: str, project_id: Any) -> str:
        if self.store is not None and project_id is not None:
            return str(self.store.create_job(project_id, kind).id)
        return uuid.uuid4().hex[:12]

    def _persist(self, s: JobState, last: list) -> None:
        # throttle progress writes; status changes always land (retried: a restart must not
        # read a cancelled or finished job as one the app was running)
        from .store import JobFinishedError

        now = time.time()
        changed = s.status != last[1]
        if not changed and s.status == RUNNING and now - last[0] < 0.5:
            return
        for attempt in range(4 if changed else 1):
            try:
                self.store.update_job(int(s.id), status=s.status, message=s.message,
                                      progress={"stage": s.stage, "step": s.step, "total": s.total,
                                                "loss": s.loss, "accuracy": s.accuracy})
            except JobFinishedError:  # a late progress write after the job ended: nothing to say
                return
            except Exception:  # noqa: BLE001 - busy database, closed store: progress is best effort
                if attempt < 3 and changed:
                    time.sleep(0.1 * (attempt + 1))
                continue
            last[:] = [now, s.status]
            return

    def _lend_slot(self, slots: FairSlots, worker: threading.Thread, job: Job) -> None:
        """At a progress report: after a time slice, let a waiting job of another owner run
        (the job stands still meanwhile, showing PAUSED_STAGE), then carry on."""
        if threading.current_thread() is not worker or not slots.should_yield(job):
            return
        saved = job.pause()
        slots.release(job, done=False)
        slots.acquire(job)  # False when cancelled meanwhile: the fit loop stops at its next check
        job.resume(saved)

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        slots = self._gpu if job.snapshot().device.startswith("cuda") else self._cpu
        if not slots.acquire(job):
            job.update(status=CANCELLED, message="Cancelled before it started; nothing changed.",
                       finished=time.time())
            slots.release(job)
            job.done_event.set()
            return
        job.on_report = functools.partial(self._lend_slot, slots, threading.current_thread())
        try:
            self._execute(job, fn)
        finally:
            job.on_report = None
            slots.release(job)
            job.done_event.set()

    @staticmethod
    def _execute(job: Job, fn: Callable[[Job], Any], quiet: bool = False) -> None:
        """Run `fn(job)` and record how it ended (every job, queued or background, ends here):
        done with its result, cancelled, or failed in one sentence (an unexpected failure also
        prints its traceback, unless `quiet`: a background job, which may meet a workspace
        shutting down, fails quietly)."""
        job.update(status=RUNNING, started=time.time(), stage="Starting")
        try:
            result = fn(job)
        except Cancelled as e:
            job.update(status=CANCELLED, message=str(e) or "Cancelled.", finished=time.time())
        except FewShotError as e:
            job.update(status=FAILED, message=no_paths(e), finished=time.time())
        except OSError as e:
            job.update(status=FAILED, message=_os_error_sentence(e), finished=time.time())
        except Exception as e:  # noqa: BLE001 - report any failure as one sentence
            if not quiet:
                traceback.print_exc()
            first = no_paths((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
            job.update(status=FAILED, message=f"{KIND_NAMES.get(job.kind, 'The job')} failed unexpectedly: {first}.",
                       finished=time.time())
        else:
            s = job.snapshot()
            job.update(status=DONE, result=result, finished=time.time(), stage="Done",
                       step=s.total or s.step, message=s.message)

    # ---- queries -------------------------------------------------------------------
    def get(self, job_id: str) -> JobState:
        with self._lock:
            job = self._jobs.get(str(job_id))
        if job is None:
            raise KeyError(f"There is no job {job_id}.")
        return job.snapshot()

    def jobs(self, project_id: Any = None, background: bool = False) -> list[JobState]:
        """The jobs (of one project), without the background ones unless `background`."""
        with self._lock:
            jobs = [j for i, j in self._jobs.items() if background or i not in self._background]
        return [j.snapshot() for j in jobs if project_id is None or j.snapshot().project_id == project_id]

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(str(job_id))
        if job is None or job.snapshot().status in FINISHED:
            return False
        job.cancel_event.set()
        # a queued (or paused) job leaves the queue now, and its cancellation is recorded now
        self._cpu.wake()
        self._gpu.wake()
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
                        descriptions=None, owner: str | None = None, *, config_extra: dict | None = None,
                        then: Callable[[Job, Any], Any] | None = None, current: bool = True,
                        **overrides) -> str:
        """Train `method` on the project's support set (snapshotted now, so later edits don't
        leak into this run) and register the model in the store when it finishes. `method`
        "auto" cross-validates the candidates and trains the best (evaluation.choose_and_fit;
        `overrides` are then Auto's settings: budget_s, with_mma, seed).
        `config_extra` is merged into the registered model's config (e.g. an instant refit's
        lineage); `then(job, model_info)` runs in the job after the model is registered, and
        its return value becomes the job's result (e.g. refresh the pool's predictions);
        `current=False` registers the model without making it current (`then` may, later)."""
        if support is None:
            if self.store is None:
                raise ValueError("submit_training needs a support set or a store")
            support = self.store.support_set(project_id)
        from .methods import catalog, get_method_class, make_method

        if method == catalog.AUTO:  # cross-validate the candidates, train the best (evaluation.auto)
            auto = catalog.coerce_settings(method, overrides)  # validates settings

            def work(job: Job):
                from .evaluation import choose_and_fit

                fitted = gpu_wrap(choose_and_fit)(
                    support, backbone, extractor, budget_s=auto.get("budget_s", catalog.AUTO_BUDGET_S),
                    with_mma=auto.get("with_mma", False), seed=auto.get("seed", 0), progress=job.report,
                    cancel=job.cancel_event)
                info = self._register(job, project_id, fitted, backbone, config_extra, current)
                return info if then is None else then(job, info)

            return self.submit(TRAIN, work, project_id, device=str(backbone.device), owner=owner)
        cls = get_method_class(method)
        if cls.needs_images:
            support.require_images(cls.label)  # fail now, in the request, with one sentence
        make_method(method, backbone, support.classnames, support.descriptions, **overrides)  # validates settings

        def work(job: Job):
            info = self._train(job, project_id, method, backbone, extractor, support, overrides, config_extra,
                               current)
            return info if then is None else then(job, info)

        return self.submit(TRAIN, work, project_id, device=str(backbone.device), owner=owner)

    def _train(self, job: Job, project_id, method_name, backbone, extractor, support, overrides,
               config_extra: dict | None = None, current: bool = True):
        """Fit and register. A closed-form method (`Method.closed_form`) whose augmented views are
        not all cached yet is fitted twice in this one job (issue #14, item 6b): first on the plain
        views alone (cached by the uploads' background job, so the first model is milliseconds
        away), registered at once (`JobState.model_id`; metrics["views"] = "plain"); then on the
        plain and augmented views, registered as the model that refines it (metrics["refines"]).
        Cancelling the second fit keeps the first model. A model registered without becoming
        current (an instant refit, which its `then` makes current) is fitted once."""
        from .methods import catalog, make_config

        notes: list[str] = []
        aug = getattr(make_config(method_name, **overrides), "augment_views", 0) or 0
        if (self.store is None or not current or not catalog.closed_form(method_name) or aug <= 0
                or _views_cached(extractor, support, aug)):
            method, backbone, extractor = self._fit(job, method_name, backbone, extractor, support, overrides,
                                                    notes, job.report)
            return self._register(job, project_id, method, backbone, config_extra, current)
        first, backbone, extractor = self._fit(job, method_name, backbone, extractor, support,
                                               {**overrides, "augment_views": 0}, notes, job.report)
        first.metrics = {**first.metrics, "views": "plain"}
        info = self._register(job, project_id, first, backbone, config_extra, current)
        job.update(model_id=info.id)

        def report(p: Progress) -> None:
            job.report(Progress(f"{REFINING}: {p.stage[:1].lower()}{p.stage[1:]}", p.step, p.total, p.loss,
                                p.accuracy))
        try:
            method, backbone, extractor = self._fit(job, method_name, backbone, extractor, support, overrides,
                                                    notes, report)
        except Cancelled:
            raise Cancelled("Refining was cancelled; the first model, fitted on plain views, is kept.") from None
        method.metrics = {**method.metrics, "refines": info.id}
        return self._register(job, project_id, method, backbone, config_extra, current)

    def _fit(self, job: Job, method_name, backbone, extractor, support, overrides, notes: list[str], report):
        """One fit, retrying a GPU out-of-memory with half the batch size, then on the CPU;
        (method, backbone, extractor): the last two change when it moved to the CPU."""
        from .methods import make_method

        attempt_overrides = dict(overrides)
        while True:
            method = make_method(method_name, backbone, support.classnames, support.descriptions,
                                 **attempt_overrides)
            method.to(backbone.device)
            try:
                fit = gpu_wrap(method.fit)
                fit(support, extractor, progress=report, cancel=job.cancel_event)
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
        return method, backbone, extractor

    def _register(self, job: Job, project_id, method, backbone, config_extra: dict | None = None,
                  current: bool = True):
        """Save the fitted model into the store (atomically); the ModelInfo, or the method itself
        when there is no store."""
        if self.store is None:
            return method
        tmp = Path(tempfile.mkdtemp(prefix=f"job-{job.snapshot().id}-", dir=self.store.staging_dir()))
        try:
            method.save(tmp / "model")
            info = self.store.register_model(project_id, method.name, backbone.id,
                                             {**method.config_dict(), **(config_extra or {})},
                                             method.metrics, tmp / "model", current=current)
            with contextlib.suppress(Exception):
                self.store.update_job(int(job.snapshot().id), model_id=info.id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return info


def _views_cached(extractor, support, augment_views: int) -> bool:
    """Whether every support image's plain and `augment_views` augmented views are in the
    extractor's feature cache (a look-up in the cache's index: nothing is read)."""
    cache = getattr(extractor, "cache", None)
    if cache is None:
        return True  # nothing would be kept between two fits: fit once
    keys = cache.keys(extractor.backbone.id)
    return all((ref.hash, v) in keys for ref in support.images for v in range(augment_views + 1))
