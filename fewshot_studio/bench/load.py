"""A bounded load test of the real app on loopback (issue: reliability; `bench --load`).

The app is launched in-process on a free 127.0.0.1 port with the given backbone. Each of
`clients` gradio_client sessions loads the shapes example and trains GraphAdapter; then one
long MMA training job starts and every client sends `requests` single-image predictions at
once. Reports p50/p95 latency (ms) and the number of failed requests. Traffic never leaves
the loopback interface, and every loop is bounded in count and time.
"""
from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..backbone import BackboneSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress_status(client) -> str:
    import re

    out = client.predict(api_name="/training_status")
    html = next((o for o in out if isinstance(o, str) and "fs-progress" in o), "")
    m = re.search(r'data-status="(\w+)"', html)
    return m.group(1) if m else ""


def _wait_done(client, timeout: float) -> str:
    end = time.time() + timeout
    status = ""
    while time.time() < end:
        status = _progress_status(client)
        if status in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    return status or "timeout"


def run_load(clients: int = 8, requests: int = 25, backbone: str = "tiny", device: str | None = "cpu",
             during_training: bool = True, timeout: float = 600.0, data_dir: str | None = None) -> dict:
    """Launch the app, drive it with `clients` concurrent sessions × `requests` predictions
    while one training job runs; returns load_p50_ms, load_p95_ms, load_errors and details."""
    from gradio_client import Client, handle_file

    from .. import shapes
    from ..app import Workspace
    from ..ui.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="fewshot-load-")
    root = Path(data_dir or tmp.name)
    spec = BackboneSpec("tiny", None, None, device) if backbone == "tiny" else BackboneSpec(backbone, device=device)
    ws = Workspace.at(root / "data", spec)
    demo = build_app(ws)
    demo.queue(default_concurrency_limit=4, max_size=256).launch(
        server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        sessions = [Client(demo.local_url, verbose=False) for _ in range(clients)]
        for c in sessions:
            c.predict("shapes", api_name="/load_example")
            c.predict(*_train_args(c, "graph", backbone), api_name="/train")
            if _wait_done(c, timeout) != "done":
                raise RuntimeError("a setup training run did not finish")
        images = []
        rng = np.random.default_rng(0)
        for k, label in enumerate(["red circle", "blue square", "green triangle", "yellow star"]):
            path = root / f"query-{k}.png"
            shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), rng, 96).save(path)
            images.append(str(path))
        trainer = sessions[0]
        if during_training:  # a long MMA job runs in the background while predictions flow
            trainer.predict(*_train_args(trainer, "mma", backbone, steps="20000"), api_name="/train")
            end = time.time() + 60
            while _progress_status(trainer) != "running" and time.time() < end:
                time.sleep(0.2)
        deadline = time.time() + timeout
        barrier = threading.Barrier(clients)

        def worker(i: int) -> None:
            c = sessions[i]
            barrier.wait()
            for r in range(requests):
                if time.time() > deadline:
                    with lock:
                        errors.append("timeout")
                    return
                t0 = time.perf_counter()
                try:
                    out = c.predict(handle_file(images[(i + r) % len(images)]), api_name="/predict")
                    ok = isinstance(out, dict) and out.get("label")
                except Exception as e:  # noqa: BLE001 - every failure counts
                    ok, out = False, e
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors.append(str(out)[:200])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        wall = time.perf_counter() - t0
        training_status = _progress_status(trainer) if during_training else "none"
        if during_training:
            trainer.predict(api_name="/cancel_training")
            _wait_done(trainer, 60)
    finally:
        demo.close()
        ws.close()
        tmp.cleanup()
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {
        "load_p50_ms": float(np.percentile(lat, 50)),
        "load_p95_ms": float(np.percentile(lat, 95)),
        "load_errors": len(errors),
        "load_requests": clients * requests,
        "load_clients": clients,
        "load_throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "load_training_status_during": training_status,
        "load_error_samples": errors[:5],
    }


def _train_args(client, method: str, backbone: str, steps: str | None = None) -> list:
    """Positional arguments for /train: defaults, with method, backbone and optional steps set."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/train"]
    args = []
    for p in info["parameters"]:
        label = p["label"]
        if label == "Method":
            args.append(method)
        elif label == "Backbone":
            args.append(backbone)
        elif steps is not None and label == "MMA · steps":
            args.append(steps)
        else:
            args.append(p.get("parameter_default"))
    return args
