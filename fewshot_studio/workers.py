"""Helper processes for the feature pipeline: they read, decode and crop images
(preprocess.decode_batch) and write feature-cache entries (FeatureCache.put_many), so that none
of that Python competes with the encoder for this process's GIL.

Why processes and not threads: Pillow releases the GIL while it decodes, but the Python around
it (opening, checks, crop geometry, numpy conversion, cache file writes) is a large share of a
small image's cost, and on a CPU the encoder itself is Python-heavy between its kernels. Measured
on 2 cores with the tiny backbone: a decode process next to the encoder slows it by about 1%;
decode and cache-write threads slowed it by 10-15%.

How:
  * each worker is `python -m fewshot_studio.workers` (no fork of a threaded server, no re-import
    of the caller's `__main__`) and imports only numpy and Pillow; one daemon thread of this
    process owns its pipes;
  * messages are a JSON header plus raw byte blobs (image bytes in, pixels out) - nothing from a
    process that parses untrusted images is ever unpickled here;
  * `submit_decode` / `submit_put` return `concurrent.futures.Future`s; decode jobs go before
    cache writes (the encoder waits for the former only); a job waits in the queue until a
    worker is ready, so a caller can still take it back (`Future.cancel`) and do it
    itself, as `features._collect` does while the workers are starting;
  * a worker that dies (a crash inside a native decoder, a kill) is replaced and its decode job
    retried one image at a time in fresh workers; an image that kills a worker again fails
    alone, with an ImageError naming it;
  * errors travel as data: ImageError keeps its file name and reason, OSError its errno (a full
    disk stays recognisable), anything else becomes a WorkerError with the original text;
  * a worker exits when its input pipe closes, so none outlives this process;
  * a worker keeps the memory it freed (glibc's trim and mmap thresholds raised in its
    environment): it allocates the same few buffers for every job, and on virtual machines that
    hand freed pages back to the host, touching fresh pages again measurably slowed decoding
    after each idle moment.

`shared_pool(n)` is the process-wide pool, started on first use; where no worker can be started
(`sys.executable` missing, a sandbox without subprocesses), it returns None and callers use
threads instead.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .imageio import ImageError
from .preprocess import Entries, Task, decode_batch

_LEN = struct.Struct("<Q")
READY = b"R"


class WorkerError(RuntimeError):
    """A helper process could not be started, died, or failed unexpectedly."""


# ---- the wire format: a length-prefixed JSON header, then the raw blobs it lists ----------------

def _read_exact(f: BinaryIO, n: int) -> bytearray:
    """n bytes, into a writable buffer (numpy arrays on it can be handed to torch as they are)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise EOFError("a helper process's pipe closed")
        got += k
    return buf


def write_message(f: BinaryIO, header: dict, blobs: list) -> None:
    blobs = [memoryview(b).cast("B") for b in blobs]  # C-contiguous buffers, measured in bytes
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    f.write(_LEN.pack(len(head)))
    f.write(head)
    for b in blobs:
        f.write(b)
    f.flush()


def read_message(f: BinaryIO) -> tuple[dict, list[bytearray]]:
    (n,) = _LEN.unpack(_read_exact(f, _LEN.size))
    header = json.loads(_read_exact(f, n))
    return header, [_read_exact(f, int(k)) for k in header.get("blobs", [])]


def decode_request(image_size: int, tasks: list[Task], mean, std) -> tuple[dict, list]:
    items, blobs = [], []
    for i, js, source, name, key, views in tasks:
        item = {"i": i, "js": list(js), "name": name, "key": key, "views": list(views)}
        if isinstance(source, (bytes, bytearray, memoryview)):
            item["blob"] = len(blobs)
            blobs.append(source)
        else:
            item["path"] = os.path.abspath(source)  # the worker runs in another directory
        items.append(item)
    return ({"op": "decode", "size": int(image_size), "tasks": items, "mean": [float(m) for m in mean],
             "std": [float(v) for v in std]}, blobs)


def put_request(root, backbone_id: str, keys, features: np.ndarray) -> tuple[dict, list]:
    feats = np.ascontiguousarray(features, dtype=np.float32)
    # an absolute root: the worker runs in another directory
    return ({"op": "put", "root": os.path.abspath(root), "backbone": backbone_id,
             "keys": [[h, int(v)] for h, v in keys], "shape": list(feats.shape)}, [feats])


def _batch(header: dict, blobs: list[bytes]) -> tuple[Entries, np.ndarray]:
    return ([(i, js) for i, js in header["entries"]],
            np.frombuffer(blobs[0], dtype=np.float32).reshape(header["shape"]))


def join_batches(parts: list[tuple[Entries, np.ndarray]]) -> tuple[Entries, np.ndarray]:
    """Several decode results as one, in order."""
    if len(parts) == 1:
        return parts[0]
    return [e for entries, _ in parts for e in entries], np.concatenate([px for _, px in parts])


# ---- the worker process ---------------------------------------------------------------------------

_caches: dict = {}  # cache folder -> FeatureCache, in the worker


def handle(header: dict, blobs: list[bytes]) -> tuple[dict, list]:
    """One request, in the worker: (response header, blobs)."""
    if header["op"] == "decode":
        tasks = [(t["i"], t["js"], blobs[t["blob"]] if "blob" in t else t["path"], t["name"], t["key"],
                  t["views"]) for t in header["tasks"]]
        entries, pixels = decode_batch(int(header["size"]), tasks, header["mean"], header["std"])
        return ({"ok": True, "entries": [[i, list(js)] for i, js in entries], "shape": list(pixels.shape)},
                [np.ascontiguousarray(pixels, dtype=np.float32)])
    if header["op"] == "put":
        from .cache import FeatureCache

        feats = np.frombuffer(blobs[0], dtype=np.float32).reshape(header["shape"])
        cache = _caches.get(header["root"])
        if cache is None:  # one per folder: it remembers which sub-folders exist
            cache = _caches[header["root"]] = FeatureCache(header["root"], memory=False)
        # a failed write (a full disk) is not an error: the features were computed all the same
        stored = cache.put_many(header["backbone"], [tuple(k) for k in header["keys"]], feats)
        return {"ok": True, "stored": bool(stored)}, []
    raise ValueError(f"unknown request {header['op']!r}")


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The worker's loop: answer each request until the input closes."""
    out.write(READY)
    out.flush()
    while True:
        try:
            header, blobs = read_message(inp)
        except EOFError:
            return
        try:
            response, data = handle(header, blobs)
        except ImageError as e:
            response, data = {"ok": False, "image_error": [e.name, e.reason]}, []
        except OSError as e:
            response, data = {"ok": False, "os_error": [e.errno, e.strerror or str(e), e.filename]}, []
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            response, data = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
        write_message(out, response, data)


def main() -> None:
    try:  # background work: the encoder in the parent process comes first
        os.nice(10)
    except (AttributeError, OSError):
        pass
    # the protocol owns the real stdout; a stray print from a library goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, out)


# ---- the parent side ----------------------------------------------------------------------------

def _raise_error(header: dict) -> None:
    if "image_error" in header:
        raise ImageError(*header["image_error"])
    if "os_error" in header:
        errno_, text, filename = header["os_error"]
        raise OSError(errno_, text, filename) if filename is not None else OSError(errno_, text)
    raise WorkerError(header.get("error", "a helper process failed"))


def _widen(pipe) -> None:
    """Linux: a 1 MiB pipe instead of 64 KiB, so a chunk's pixels cross in a few reads, not dozens
    (each read is a GIL hand-over in this process). Elsewhere, or when refused, nothing changes."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError, ValueError):
        pass


class _Worker:
    """One child process and its pipes; used by exactly one dispatcher thread."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # so `-m fewshot_studio...` imports this copy
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 26))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "fewshot_studio.workers"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, cwd=root)
        except (OSError, ValueError) as e:
            raise WorkerError(f"could not start a helper process ({e})") from None
        _widen(self.proc.stdout)
        _widen(self.proc.stdin)

    def wait_ready(self) -> None:
        try:
            if bytes(_read_exact(self.proc.stdout, 1)) != READY:
                raise WorkerError("a helper process sent an unexpected greeting")
        except EOFError:
            raise WorkerError(f"a helper process exited on start (code {self.proc.wait()})") from None

    def call(self, header: dict, blobs: list) -> tuple[dict, list[bytes]]:
        """Send one request; returns the response, raises its error (see `_raise_error`), or
        EOFError/OSError when the child died."""
        write_message(self.proc.stdin, header, blobs)
        response, data = read_message(self.proc.stdout)
        if not response["ok"]:
            _raise_error(response)
        return response, data

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_Parse = Callable[[dict, list], object]
DECODE, PUT, STOP = 0, 1, 2  # job priorities: lower first


class WorkerPool:
    """`processes` helper processes behind one queue."""

    def __init__(self, processes: int):
        # decode jobs before cache writes (an encoder waits for the former, nobody for the latter),
        # first come first served within each kind
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()
        self.alive = 0  # workers started and answering
        self.restarts = 0  # workers started to replace one that died
        self._pids: dict[int, int] = {}  # dispatcher thread id -> its worker's pid
        self.grow(processes)

    @property
    def size(self) -> int:
        return len(self._threads)

    def grow(self, processes: int) -> None:
        with self._lock:
            while len(self._threads) < processes:
                worker = _Worker()  # raises WorkerError where processes cannot be started
                t = threading.Thread(target=self._dispatch, args=(worker,), daemon=True,
                                     name=f"fewshot-worker-{len(self._threads)}")
                self._threads.append(t)
                t.start()

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._lock:
            return list(self._pids.values())

    def _own(self, worker: _Worker | None) -> None:
        with self._lock:
            if worker is None:
                self._pids.pop(threading.get_ident(), None)
            else:
                self._pids[threading.get_ident()] = worker.proc.pid

    def submit_decode(self, image_size: int, tasks: list[Task], mean, std) -> Future:
        """Future of `preprocess.decode_batch(image_size, tasks, mean, std)`."""
        return self._submit(DECODE, decode_request(image_size, tasks, mean, std), _batch, tasks)

    def submit_put(self, root, backbone_id: str, keys, features: np.ndarray) -> Future:
        """Future of `FeatureCache(root).put_many(backbone_id, keys, features)` (None)."""
        return self._submit(PUT, put_request(root, backbone_id, keys, features), lambda h, b: None, None)

    def _submit(self, priority: int, request: tuple[dict, list], parse: _Parse, tasks: list[Task] | None) -> Future:
        if self._closed:
            raise WorkerError("the helper processes have been shut down")
        f: Future = Future()
        self._jobs.put((priority, next(self._order), (f, request, parse, tasks)))
        return f

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._jobs.put((STOP, next(self._order), None))
        for t in self._threads:
            t.join(timeout=5)

    def _dispatch(self, worker: _Worker | None) -> None:
        try:
            worker.wait_ready()
        except WorkerError:
            worker.kill()
            return  # cannot work here: the queue is left to the other workers and to callers
        with self._lock:
            self.alive += 1
        self._own(worker)
        while worker is not None:
            _, _, job = self._jobs.get()
            if job is None:
                break
            f, request, parse, tasks = job
            if not f.set_running_or_notify_cancel():
                continue  # the caller took the job back
            try:
                f.set_result(parse(*worker.call(*request)))
            except (EOFError, BrokenPipeError, ConnectionError):
                worker.kill()
                worker = self._recover(f, request, parse, tasks)
                self._own(worker)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                f.set_exception(e)
        if worker is not None:
            worker.close()
        self._own(None)
        with self._lock:
            self.alive -= 1

    def _recover(self, f: Future, request, parse: _Parse, tasks: list[Task] | None) -> _Worker | None:
        """A worker died on `request`: redo it in fresh workers - a decode job one image at a time,
        so an image that crashes the decoder fails alone (as an ImageError naming it). Returns the
        worker to go on with, or None where none can be started (this thread then stops)."""
        header, _ = request
        if tasks:  # a decode job: one image per request
            singles = [decode_request(header["size"], [t], header["mean"], header["std"]) for t in tasks]
        else:
            singles = [request]
        results, error, worker = [], None, None
        for n, single in enumerate(singles):
            worker = worker or self._fresh()
            if worker is None:
                f.set_exception(WorkerError("a helper process died and could not be restarted"))
                return None
            try:
                results.append(parse(*worker.call(*single)))
            except (EOFError, BrokenPipeError, ConnectionError):
                worker.kill()
                worker = None
                error = error or (ImageError(tasks[n][3], "the image decoder crashed on this file") if tasks
                                  else WorkerError(f"a helper process died twice on a {header['op']} request"))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error = error or e
        if error is not None:
            f.set_exception(error)
        else:
            f.set_result(join_batches(results))  # a single result as it is
        return worker or self._fresh()

    def _fresh(self) -> _Worker | None:
        self.restarts += 1
        try:
            worker = _Worker()
        except WorkerError:
            return None
        try:
            worker.wait_ready()
            return worker
        except WorkerError:
            worker.kill()
            return None


_shared: WorkerPool | None = None
_shared_lock = threading.Lock()
_unavailable = False


def shared_pool(processes: int) -> WorkerPool | None:
    """The process-wide pool with at least `processes` workers (started on first use), or None
    where helper processes cannot be started here."""
    global _shared, _unavailable
    if processes < 1 or _unavailable:
        return None
    with _shared_lock:
        try:
            if _shared is None:
                _shared = WorkerPool(processes)
                atexit.register(_shared.close)
            else:
                _shared.grow(processes)
        except WorkerError:
            _unavailable = True
            return None
        return _shared


def helper_cpu_seconds() -> float:
    """CPU seconds used so far by the shared pool's live workers (Linux /proc; 0 elsewhere), so a
    measurement of "other processes' load" can leave this process's own helpers out."""
    pool = _shared
    if pool is None:
        return 0.0
    total = 0.0
    for pid in pool.worker_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return total


if __name__ == "__main__":
    main()
