"""The helper processes of the feature pipeline (fewshot_studio.workers): same results as decoding
in this process, errors that keep their meaning, and survival of a worker that dies."""
from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

from fewshot_studio import workers
from fewshot_studio.cache import FeatureCache
from fewshot_studio.data import ImageRef
from fewshot_studio.features import FeatureExtractor, _ramp
from fewshot_studio.imageio import ImageError
from fewshot_studio.preprocess import decode_batch
from fewshot_studio.workers import WorkerPool, read_message, serve, write_message

from helpers import make_refs

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _tasks(refs, views=(0, 3)):
    # (index, view positions, source, name, key, views); bytes and a file path both travel
    return [(i, list(range(len(views))), r.data if r.data is not None else str(r.path), r.name, r.hash, list(views))
            for i, r in enumerate(refs)]


@pytest.fixture
def pool():
    p = WorkerPool(1)
    yield p
    p.close()


def test_worker_decodes_exactly_as_this_process(pool, tmp_path, monkeypatch):
    refs = make_refs("red circle", 3, np.random.default_rng(0))
    (tmp_path / "on-disk.png").write_bytes(refs[2].data)
    monkeypatch.chdir(tmp_path)
    refs[2] = ImageRef.from_path("on-disk.png")  # relative to this process's directory
    tasks = _tasks(refs)
    here = decode_batch(48, tasks, MEAN, STD)
    there = pool.submit_decode(48, tasks, MEAN, STD).result(timeout=30)
    assert there[0] == here[0] == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1])]
    assert there[1].dtype == np.float32 and there[1].shape == (6, 3, 48, 48)
    assert np.array_equal(here[1], there[1])


def test_a_bad_image_fails_with_its_name_and_the_worker_goes_on(pool):
    refs = make_refs("blue star", 2, np.random.default_rng(1))
    bad = ImageRef.from_bytes(b"<html>nope</html>", "page.jpg")
    with pytest.raises(ImageError, match="page.jpg"):
        pool.submit_decode(48, _tasks([refs[0], bad]), MEAN, STD).result(timeout=30)
    assert len(pool.submit_decode(48, _tasks(refs), MEAN, STD).result(timeout=30)[0]) == 2
    assert pool.restarts == 0


def test_a_killed_worker_is_replaced_and_its_job_finished(pool):
    refs = make_refs("green cross", 12, np.random.default_rng(2))
    pool.submit_decode(48, _tasks(refs[:1]), MEAN, STD).result(timeout=30)  # the worker is up
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    out = pool.submit_decode(48, _tasks(refs), MEAN, STD).result(timeout=60)
    assert [i for i, _ in out[0]] == list(range(12)) and len(out[1]) == 24
    assert pool.restarts >= 1 and pool.worker_pids() != [pid] and pool.alive == 1
    assert len(pool.submit_decode(48, _tasks(refs[:2]), MEAN, STD).result(timeout=30)[0]) == 2


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_with_their_parent():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys, os; sys.path.insert(0, sys.argv[1]); from fewshot_studio.workers import WorkerPool; "
              "import time; p = WorkerPool(2); t = time.time() + 30\n"
              "while p.alive < 2 and time.time() < t: time.sleep(0.05)\n"
              "print(' '.join(map(str, p.worker_pids())), flush=True); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)  # each saw its input close and exited


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_errors_travel_as_data(monkeypatch):
    """serve() answers an image error, an OS error and a bug each with a header, never a pickle;
    a feature-cache write that fails (a full disk) is no error, only "not stored"."""
    def ask(header, blobs):
        inp, out = io.BytesIO(), io.BytesIO()
        write_message(inp, header, blobs)
        inp.seek(0)
        serve(inp, out)
        out.seek(1)  # past the ready byte
        return read_message(out)[0]

    bad = {"op": "decode", "size": 48, "mean": MEAN, "std": STD,
           "tasks": [{"i": 0, "js": [0], "name": "x.png", "key": "k", "views": [0], "blob": 0}]}
    assert ask(bad, [b"not an image"])["image_error"][0] == "x.png"
    put = {"op": "put", "root": "/proc/version/cache", "backbone": "b", "keys": [["ab" * 32, 0]], "shape": [1, 4]}
    answer = ask(put, [np.zeros((1, 4), np.float32)])
    assert answer["ok"] and answer["stored"] is False
    assert "unknown request" in ask({"op": "nope"}, [])["error"]

    def disk_full(header, blobs):
        raise OSError(errno.ENOSPC, "No space left on device", "/x")

    monkeypatch.setattr(workers, "handle", disk_full)
    assert ask({"op": "decode"}, [])["os_error"][:2] == [errno.ENOSPC, "No space left on device"]


def test_threads_and_processes_give_identical_features(tiny, tmp_path):
    refs = make_refs("yellow square", 30, np.random.default_rng(4))
    a = FeatureExtractor(tiny, FeatureCache(tmp_path / "p"), batch_size=16, decode="process").image_features(
        refs, views=(0, 1))
    b = FeatureExtractor(tiny, FeatureCache(tmp_path / "t"), batch_size=16, decode="thread").image_features(
        refs, views=(0, 1))
    assert torch.equal(a, b)
    # and the helper process wrote the cache files this process reads back
    cold = FeatureExtractor(tiny, FeatureCache(tmp_path / "p", memory=False))
    assert torch.equal(cold.image_features(refs, views=(0, 1)), a) and cold.encoded_images == 0


def test_chunks_ramp_up_to_the_batch_and_cover_everything():
    bounds = _ramp(500, 64)
    assert bounds[:2] == [(0, 8), (8, 28)] and bounds[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) == 64 and sizes == sorted(sizes[:-1]) + sizes[-1:]
    assert _ramp(0, 64) == [] and _ramp(3, 64) == [(0, 3)]


def test_load_pixels_matches_the_backbones_own_views(tiny):
    from fewshot_studio.features import load_pixels

    refs = make_refs("purple triangle", 5, np.random.default_rng(5))
    want = torch.stack([torch.stack([tiny.augment(r.open(draft_size=tiny.image_size), r.hash, v) for v in (0, 2)])
                        for r in refs])
    for decode in ("process", "thread"):
        assert torch.equal(load_pixels(tiny, refs, (0, 2), decode=decode), want)
    assert load_pixels(tiny, [], (0,)).shape == (0, 1, 3, tiny.image_size, tiny.image_size)


def test_a_relative_cache_folder_means_this_process_folder(tiny, tmp_path, monkeypatch):
    """The helper runs in another directory: a relative cache root must still land here."""
    monkeypatch.chdir(tmp_path)
    refs = make_refs("red circle", 40, np.random.default_rng(8))
    ex = FeatureExtractor(tiny, FeatureCache("rel-cache"), batch_size=8)  # several chunks: the helper writes
    ex.image_features(refs)
    assert len(FeatureCache(tmp_path / "rel-cache").keys(tiny.id)) == 40
