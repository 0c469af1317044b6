"""Load on loopback: concurrent sessions predicting while a training job runs; overload is refused clearly."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import modeling, projects
from fewshot_studio.bench.load import run_load
from helpers import free_port

pytestmark = pytest.mark.slow  # launches the app


def test_eight_clients_predict_while_training_without_errors():
    r = run_load(clients=8, requests=25, during_training=True, timeout=300)
    assert r["load_errors"] == 0, r["load_error_samples"]
    assert r["load_requests"] == 200 and r["load_training_status_during"] == "running"
    assert 0 < r["load_p50_ms"] <= r["load_p95_ms"] < 30_000


def test_overload_gets_a_clear_busy_message(tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.app import Workspace
    from fewshot_studio.ui.app import build_app

    studio = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"))
    real = modeling.predict

    def slow_predict(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(modeling, "predict", slow_predict)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=1).launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        img = tmp_path / "q.png"
        shapes.render(shapes.ShapeSpec("red", "circle"), np.random.default_rng(0), 64).save(img)
        clients = [Client(demo.local_url, verbose=False) for _ in range(6)]
        for c in clients:
            c.predict("shapes", api_name="/load_example")
        modeling.start_training(studio.scope(projects.list_projects(studio)[0].id), "zeroshot")
        time.sleep(1.0)
        outcomes: list[str] = []

        def hit(c):
            try:
                c.predict(handle_file(str(img)), api_name="/predict")
                outcomes.append("ok")
            except Exception as e:  # noqa: BLE001
                outcomes.append(str(e))

        threads = [threading.Thread(target=hit, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        busy = [o for o in outcomes if "queue is full" in o.lower()]
        assert busy, outcomes
        assert all(o == "ok" or o in busy or "Train a model first" in o for o in outcomes), outcomes
        # the server is still healthy afterwards
        assert clients[0].predict(api_name="/training_status") is not None
    finally:
        demo.close()
        studio.close()


def test_bench_load_command_writes_its_keys(tmp_path, capsys):
    import json

    from fewshot_studio.cli import main

    assert main(["bench", "--load", "--clients", "2", "--requests", "3", "--json", str(tmp_path / "l.json")]) == 0
    r = json.loads((tmp_path / "l.json").read_text())
    assert r["load_errors"] == 0 and r["load_p50_ms"] > 0 and r["load_p95_ms"] >= r["load_p50_ms"]
    assert "load_p95_ms" in capsys.readouterr().out
