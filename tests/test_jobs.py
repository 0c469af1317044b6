"""Background jobs against a real ProjectStore: progress, cancel, isolation, restarts, retraining."""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.cache import FeatureCache
from fewshot_studio.features import FeatureExtractor
from fewshot_studio.jobs import CANCELLED, DONE, FAILED, JobRunner
from fewshot_studio.methods import load_model
from fewshot_studio.store import ProjectStore

from helpers import training_script


def png(label: str, rng) -> bytes:
    buf = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), rng, 64).save(buf, "PNG")
    return buf.getvalue()


def make_project(store: ProjectStore, labels: list[str], shots: int, seed: int, name="p"):
    rng = np.random.default_rng(seed)
    p = store.create_project(name)
    for label in labels:
        c = store.add_class(p.id, label)
        store.add_images(p.id, [(f"{label}-{k}.png", png(label, rng)) for k in range(shots)], class_id=c.id)
    return p


@pytest.fixture
def store(tmp_path):
    s = ProjectStore(tmp_path / "data")
    yield s
    s.close()


def test_training_job_reports_progress_and_registers_model(store, tiny, tmp_path):
    p = make_project(store, ["red circle", "blue square", "green triangle"], shots=3, seed=1)
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    seen = []
    job_id = runner.submit_training(p.id, "graph", tiny, ex)
    runner.subscribe(job_id, seen.append)
    state = runner.wait(job_id, timeout=300)
    assert state.status == DONE, state.message
    assert state.history and state.history[-1]["step"] == state.total
    models = store.list_models(p.id)
    assert len(models) == 1 and models[0].method == "graph"
    m = load_model(models[0].path, backbone=tiny)
    assert m.classnames == ["red circle", "blue square", "green triangle"]
    assert store.get_job(int(job_id)).status == DONE


def test_cancel_during_mma_leaves_project_unchanged(store, tiny, tmp_path):
    p = make_project(store, ["red circle", "blue square"], shots=4, seed=2)
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    started = threading.Event()

    job_id = runner.submit_training(p.id, "mma", tiny, ex, steps=20000)
    runner.subscribe(job_id, lambda s: started.set() if s.stage.lower().startswith("train") and s.step >= 2 else None)
    assert started.wait(120), "training never reached step 2"
    before = (store.list_models(p.id), store.list_images(p.id), store.list_classes(p.id))
    t0 = time.time()
    assert runner.cancel(job_id)
    state = runner.wait(job_id, timeout=60)
    assert state.status == CANCELLED and time.time() - t0 < 30
    assert state.step < 20000
    assert (store.list_models(p.id), store.list_images(p.id), store.list_classes(p.id)) == before
    assert store.list_models(p.id) == [] and not any(store.staging_dir().iterdir())
    assert store.get_job(int(job_id)).status == CANCELLED


def test_two_projects_train_concurrently_without_mixing(store, tiny, tmp_path):
    a = make_project(store, ["red circle", "blue square"], shots=3, seed=3, name="a")
    b = make_project(store, ["yellow star", "green cross", "white hexagon"], shots=3, seed=4, name="b")
    runner = JobRunner(store, max_cpu_jobs=2)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    ja = runner.submit_training(a.id, "tip-f", tiny, ex)
    jb = runner.submit_training(b.id, "graph", tiny, ex)
    sa, sb = runner.wait(ja, 300), runner.wait(jb, 300)
    assert sa.status == DONE and sb.status == DONE, (sa.message, sb.message)
    (ma,), (mb,) = store.list_models(a.id), store.list_models(b.id)
    assert load_model(ma.path, backbone=tiny).classnames == ["red circle", "blue square"]
    assert load_model(mb.path, backbone=tiny).classnames == ["yellow star", "green cross", "white hexagon"]
    assert sa.result.id == ma.id and sb.result.id == mb.id


def test_failure_is_one_sentence_and_bad_request_refused_early(store, tiny, tmp_path):
    from fewshot_studio.errors import DataError

    p = store.create_project("empty class")
    store.add_class(p.id, "red circle")
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    with pytest.raises(DataError, match="needs at least one image"):
        runner.submit_training(p.id, "graph", tiny, ex)

    def broken(job):
        raise RuntimeError("disk on fire\nsecond line")

    s = runner.wait(runner.submit("train", broken, p.id), 30)
    assert s.status == FAILED and s.message.count("\n") == 0 and "disk on fire" in s.message


@pytest.mark.slow  # end to end: trains twice
def test_retrain_after_adding_one_image_encodes_one_image(store, tiny, tmp_path):
    labels = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]
    p = make_project(store, labels, shots=4, seed=5)
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    assert runner.wait(runner.submit_training(p.id, "graph", tiny, ex), 300).status == DONE
    first = set(ex.encoded_hashes)
    assert len(first) == 20
    c = store.list_classes(p.id)[0]
    (img,), errors = store.add_images(p.id, [("new.png", png("red circle", np.random.default_rng(99)))],
                                      class_id=c.id)
    assert not errors
    ex.encoded_hashes.clear()
    assert runner.wait(runner.submit_training(p.id, "graph", tiny, ex), 300).status == DONE
    assert ex.encoded_hashes == {img.hash}


@pytest.mark.slow  # a training subprocess
def test_interrupted_job_is_marked_failed_on_next_open(tmp_path):
    """A process killed mid-training leaves a 'running' job; reopening the store marks it failed."""
    root = tmp_path / "data"
    script = training_script(root, tmp_path / "c", then="""
        jid = runner.submit_training(p.id, "mma", tiny, ex, steps=20000)
        while runner.get(jid).step < 3:
            time.sleep(0.05)
        time.sleep(0.6)  # let the throttled progress write land
        print("RUNNING", jid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("RUNNING"), line
        job_id = int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()
    store = ProjectStore(root)
    try:
        assert store.get_job(job_id).status == "running"
        assert store.mark_interrupted_jobs() == 1
        job = store.get_job(job_id)
        assert job.status == "failed" and "stopped" in job.message
        (p,) = store.list_projects()
        assert store.list_models(p.id) == [] and len(store.list_images(p.id)) == 6
    finally:
        store.close()


def test_gpu_out_of_memory_halves_the_batch_then_moves_to_the_cpu(store, tiny, tmp_path, monkeypatch):
    """No GPU here: a backbone that says it is on CUDA and a fit that runs out of GPU memory while
    it is, so the job's recovery path runs for real: first the batch size is halved, then the
    training moves to the CPU, and the job ends DONE saying both."""
    import torch

    import fewshot_studio.backbone as backbone_mod
    import fewshot_studio.methods as methods_mod

    class OnCuda:  # the tiny backbone, claiming to be on a GPU
        device = torch.device("cuda")

        def __getattr__(self, name):
            return getattr(tiny, name)

    gpu = OnCuda()
    real_make = methods_mod.make_method
    attempts = []

    def make_method(name, backbone, *args, **overrides):
        m = real_make(name, tiny, *args, **overrides)
        m.to = lambda *a, **k: m  # nothing to move: it never leaves the CPU
        real_fit = m.fit

        def fit(support, extractor, **kw):
            attempts.append((m.config.batch_size, extractor.backbone is gpu))
            if extractor.backbone is gpu:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_fit(support, extractor, **kw)

        m.fit = fit
        return m

    monkeypatch.setattr(methods_mod, "make_method", make_method)
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda spec: tiny if spec.device == "cpu" else gpu)
    p = make_project(store, ["red circle", "blue square"], shots=2, seed=4)
    ex = FeatureExtractor(gpu, FeatureCache(tmp_path / "cache"))
    runner = JobRunner(store)
    job_id = runner.submit_training(p.id, "mma", gpu, ex, steps=3, augment_views=1)
    state = runner.wait(job_id, timeout=300)
    assert state.status == DONE, state.message
    assert attempts == [(16, True), (8, True), (8, False)]
    assert "retried with batch size 8" in state.message and "continued on the CPU" in state.message
    assert state.device == "cpu" and len(store.list_models(p.id)) == 1


# ---- fair scheduling (#13 finding 3): fake jobs, deterministic and fast -------------------------
from fewshot_studio.errors import Cancelled  # noqa: E402
from fewshot_studio.jobs import PAUSED_STAGE, QUEUED, RUNNING  # noqa: E402
from fewshot_studio.progress import Progress  # noqa: E402


def endless(job):
    """A training that never ends on its own: a progress report every 5 ms, cancel checked."""
    step = 0
    while not job.cancel_event.is_set():
        step += 1
        job.report(Progress("Training", step, 10**6, loss=1.0))
        time.sleep(0.005)
    raise Cancelled()


def steps(n, log=None, name=None):
    def fn(job):
        if log is not None:
            log.append(name)
        for k in range(n):
            if job.cancel_event.is_set():
                raise Cancelled()
            job.report(Progress("Training", k + 1, n))
            time.sleep(0.005)
        return name
    return fn


def until(predicate, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_another_visitors_job_progresses_while_a_long_one_runs(device):
    runner = JobRunner(max_cpu_jobs=1, time_slice=0.2)
    stages = []
    a = runner.submit("train", endless, device=device, owner="visitor A")
    runner.subscribe(a, lambda s: stages.append(s.stage))
    assert until(lambda: runner.get(a).step > 5)
    b = runner.submit("train", steps(40), device=device, owner="visitor B")
    sb = runner.wait(b, timeout=10)
    assert sb.status == DONE, (sb.status, sb.stage)  # B finished ...
    sa = runner.get(a)
    assert sa.status == RUNNING  # ... while A's long job still runs,
    assert PAUSED_STAGE in stages  # which said that it was paused meanwhile
    assert until(lambda: runner.get(a).stage == "Training" and runner.get(a).step > sa.step)  # and resumed
    assert runner.cancel(a)
    assert runner.wait(a, timeout=10).status == CANCELLED


def test_one_visitors_jobs_do_not_preempt_each_other():
    runner = JobRunner(max_cpu_jobs=1, time_slice=0.05)
    a = runner.submit("train", endless, owner="A")
    assert until(lambda: runner.get(a).step > 5)
    a2 = runner.submit("train", steps(5), owner="A")
    time.sleep(0.5)  # ten time slices: the same visitor's second job still waits its turn
    assert runner.get(a2).status == QUEUED and PAUSED_STAGE != runner.get(a).stage
    runner.cancel(a)
    assert runner.wait(a2, timeout=10).status == DONE


def test_the_queue_is_served_round_robin_by_visitor_not_first_come():
    runner = JobRunner(max_cpu_jobs=1, time_slice=60)
    order, gate = [], threading.Event()

    def blocker(job):
        order.append("A1")
        gate.wait(10)

    a1 = runner.submit("train", blocker, owner="A")
    assert until(lambda: order == ["A1"])
    a2 = runner.submit("train", steps(3, order, "A2"), owner="A")
    time.sleep(0.05)
    b1 = runner.submit("train", steps(3, order, "B1"), owner="B")
    time.sleep(0.05)
    gate.set()
    for j in (a1, a2, b1):
        assert runner.wait(j, timeout=10).status == DONE
    assert order == ["A1", "B1", "A2"]  # B had no turn yet, so B1 goes before A's second job


def test_a_paused_job_is_cancelled_within_its_pause():
    runner = JobRunner(max_cpu_jobs=1, time_slice=0.1)
    gate = threading.Event()

    def hog(job):  # B's job reports once, then keeps the slot (no more reports) until the gate opens
        job.report(Progress("Training", 1, 2))
        gate.wait(10)

    a = runner.submit("train", endless, owner="A")
    assert until(lambda: runner.get(a).step > 3)
    b = runner.submit("train", hog, owner="B")
    assert until(lambda: runner.get(a).stage == PAUSED_STAGE and runner.get(b).status == RUNNING)
    t0 = time.time()
    runner.cancel(a)
    assert runner.wait(a, timeout=5).status == CANCELLED and time.time() - t0 < 2
    gate.set()
    assert runner.wait(b, timeout=5).status == DONE


def test_pause_does_not_count_in_the_stage_pace():
    from fewshot_studio.jobs import Job, JobState

    job = Job(JobState("1", "train", None))
    job.report(Progress("Training", 1, 100))
    started = job.snapshot().stage_started
    saved = job.pause()
    assert job.snapshot().stage == PAUSED_STAGE
    time.sleep(0.2)
    job.resume(saved)
    s = job.snapshot()
    assert s.stage == "Training" and s.stage_started >= started + 0.2


# ---- a cancelled queued job keeps its status across a restart (#13 finding 12) ------------------
def test_cancelled_queued_job_is_recorded_at_once_and_survives_a_restart(tmp_path):
    root = tmp_path / "data"
    store = ProjectStore(root)
    p = store.create_project("p")
    runner = JobRunner(store, max_cpu_jobs=1)
    a = runner.submit("train", endless, p.id, owner="A")
    assert until(lambda: runner.get(a).step > 3)
    queued = runner.submit("train", steps(3), p.id, owner="A")
    assert runner.cancel(queued)
    # recorded now, while the slot is still held by the running job
    assert until(lambda: store.get_job(int(queued)).status == CANCELLED, timeout=3)
    assert runner.get(a).status == RUNNING
    store.close()  # the app is killed: the running job stays 'running' in the database
    with ProjectStore(root) as again:
        assert again.mark_interrupted_jobs() == 1
        assert again.get_job(int(queued)).status == CANCELLED
        assert again.get_job(int(queued)).message == "Cancelled before it started; nothing changed."
        assert again.get_job(int(a)).message == "The app stopped while this job was running."
    runner.cancel(a)
    runner.wait(a, timeout=10)


# ---- a first model on plain views, then refined (issue #14, item 6b) ---------------------------------
LABELS5 = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]


@pytest.mark.parametrize("method", ["gda", "proker", "tip"])
def test_closed_form_training_registers_a_plain_view_model_first(store, tiny, tmp_path, method):
    """With the plain views cached (as the uploads' background job leaves them), a closed-form
    training registers a model fitted on plain views before any augmented view is encoded, then
    the model refining it; the job names the first model while it refines."""
    from fewshot_studio.jobs import REFINING

    p = make_project(store, LABELS5, shots=3, seed=3)
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    ex.image_features(store.support_set(p.id).images)  # the plain views, as after the uploads
    seen = []

    def look(s):
        if s.stage.startswith(REFINING):
            seen.append((s.model_id, len(store.list_models(p.id))))

    job_id = runner.submit_training(p.id, method, tiny, ex, augment_views=2)
    runner.subscribe(job_id, look)
    st = runner.wait(job_id, 120)
    assert st.status == DONE, st.message
    refined, first = store.list_models(p.id)  # newest first
    assert st.model_id == first.id and st.result.id == refined.id
    assert first.metrics["views"] == "plain" and first.config["hyperparameters"]["augment_views"] == 0
    assert refined.metrics["refines"] == first.id and refined.config["hyperparameters"]["augment_views"] == 2
    assert store.current_model(p.id).id == refined.id
    assert seen and all(s == (first.id, 1) for s in seen)  # the first model existed while it refined
    m = load_model(first.path, backbone=tiny)
    assert m.predict_proba(store.support_set(p.id).images[:2], ex).shape == (2, 5)

    # everything cached now: a training fits once
    again = runner.wait(runner.submit_training(p.id, method, tiny, ex, augment_views=2), 120)
    assert again.status == DONE and again.model_id is None and len(store.list_models(p.id)) == 3
    assert "refines" not in again.result.metrics and "views" not in again.result.metrics


def test_cancelling_the_refit_keeps_the_first_model(store, tiny, tmp_path):
    from fewshot_studio.jobs import REFINING

    p = make_project(store, LABELS5, shots=3, seed=4)
    runner = JobRunner(store)
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    ex.image_features(store.support_set(p.id).images)
    holder = {}

    def look(s):
        if s.stage.startswith(REFINING):
            runner.cancel(holder["id"])

    holder["id"] = job_id = runner.submit_training(p.id, "gda", tiny, ex, augment_views=10)
    runner.subscribe(job_id, look)
    st = runner.wait(job_id, 120)
    assert st.status == CANCELLED and "first model" in st.message and "\n" not in st.message
    (only,) = store.list_models(p.id)
    assert only.id == st.model_id and only.metrics["views"] == "plain"
    assert store.current_model(p.id).id == only.id
