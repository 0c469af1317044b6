"""A shared, long-lived app over HTTP (#13 findings 3 and 10): one visitor's long training does
not stop another's, and a damaged project database is reported in one sentence while the app
keeps serving; `python app.py` checkpoints its database when it is stopped."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fewshot_studio.store import ProjectStore
from helpers import HAVE_CHROMIUM, NO_CHROMIUM, ROOT, Endpoint, free_port, launch, wait_training

pytestmark = pytest.mark.slow  # launches the app, a browser, subprocesses


def status_of(client) -> str:
    out = client.predict(api_name="/training_status")
    return next((o for o in out if isinstance(o, str) and "fs-progress" in o), "")


# ---- finding 3: fair share ---------------------------------------------------------------------
def test_two_visitors_trainings_both_progress(tmp_path):
    """Visitor A starts a training at the 20,000-step cap; B's training, started after it, runs to
    the end while A's still runs (they take turns on the one CPU slot); A then cancels cleanly."""
    from gradio_client import Client

    from fewshot_studio.app import Workspace
    from fewshot_studio.backbone import BackboneSpec

    ws = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"), hosted=True)
    demo = launch(ws)
    try:
        alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        for c in (alice, bob):
            c.predict("shapes", api_name="/load_example")
        Endpoint(alice, "/train")(Method="mma", Backbone="tiny", **{"MMA · steps": 20000})
        end = time.time() + 90
        while time.time() < end and not ('data-status="running"' in status_of(alice) and "Training" in status_of(alice)):
            time.sleep(0.3)
        assert 'data-status="running"' in status_of(alice)
        Endpoint(bob, "/train")(Method="graph", Backbone="tiny")
        t0 = time.time()
        assert 'data-status="done"' in wait_training(bob, timeout=240)
        took = time.time() - t0
        (a,) = [j for j in ws.runner.jobs() if j.kind == "train" and j.status == "running"]
        assert a.step < a.total  # A's long training is still running, and got its turns back
        end = time.time() + 30
        while time.time() < end and "Paused" in ws.runner.get(a.id).stage:
            time.sleep(0.2)
        assert "Paused" not in ws.runner.get(a.id).stage
        print(f"B's training finished in {took:.1f} s while A's ran (A at step {a.step} of {a.total})")
        alice.predict(api_name="/cancel_training")
        assert 'data-status="cancelled"' in wait_training(alice, timeout=60)
        assert {j.status for j in ws.runner.jobs()} == {"done", "cancelled"}
    finally:
        demo.close()
        ws.close()


# ---- finding 10: database damage -----------------------------------------------------------------
def png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 80, 120)).save(buf, "PNG")
    return buf.getvalue()


def killed_data_dir(root: Path, tmp: Path) -> Path:
    """A data folder as a killed app leaves it: project 'Early' checkpointed into studio.db,
    project 'Late' only in the write-ahead log, and their image files."""
    store = ProjectStore(tmp / "live", checkpoint_every=None)
    try:
        p = store.create_project("Early")
        store.add_images(p.id, [(f"{k}.png", png(k)) for k in range(3)])
        assert store.checkpoint()
        q = store.create_project("Late")
        store.add_images(q.id, [("late.png", png(9))])
        root.mkdir(parents=True)
        for name in ("studio.db", "studio.db-wal"):
            shutil.copyfile(store.root / name, root / name)
        shutil.copytree(store.root / "images", root / "images")
    finally:
        store.close()
    return root


DAMAGE = {
    "junk in the log": ("studio.db-wal", lambda b: os.urandom(len(b)), "log was damaged", ["Early"]),
    "zero-byte database": ("studio.db", lambda b: b"", "found empty", []),
    "damaged database file": ("studio.db", lambda b: b[:100] + os.urandom(len(b) - 100), "database was damaged", []),
}


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_database_damage_is_told_in_one_sentence_and_the_app_serves(tmp_path, damage):
    from gradio_client import Client
    from playwright.sync_api import expect, sync_playwright

    from fewshot_studio.app import Workspace
    from fewshot_studio.backbone import BackboneSpec
    from helpers import CHROMIUM, CHROMIUM_ARGS

    name, spoil, words, left = DAMAGE[damage]
    root = killed_data_dir(tmp_path / "data", tmp_path)
    before = spoil((root / name).read_bytes())
    (root / name).write_bytes(before)
    ws = Workspace.at(root, BackboneSpec("tiny", None, device="cpu"))  # starts (a damaged file used to stop it)
    demo = launch(ws)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(demo.local_url)
                notice = page.locator("#notice")
                expect(notice).to_contain_text(words, timeout=60_000)
                text = notice.inner_text()
                assert text.count(". ") == 0 or text.index(words) < text.index(". ") + 2
                assert "damaged-" in text
            finally:
                browser.close()
        client = Client(demo.local_url, verbose=False)
        assert sorted(p.name for p in ws.store.list_projects()) == left
        out = client.predict("After the damage", api_name="/create_project")
        assert "Created project" in out[0]
        (aside,) = root.glob("damaged-*")
        assert (aside / name).read_bytes() == before  # kept, byte for byte
        assert len([f for f in (root / "images").rglob("*") if f.is_file()]) == 4  # no image deleted
    finally:
        demo.close()
        ws.close()


# ---- finding 10: `python app.py` comes up on a damaged database and checkpoints when stopped ------
def _serve(data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "FEWSHOT_STUDIO_BACKBONE": "tiny", "FEWSHOT_STUDIO_DATA": str(data),
           "FEWSHOT_STUDIO_DEVICE": "cpu", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.time() + 90
    while time.time() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"app.py did not start (exit code {proc.poll()})")


def test_app_py_starts_on_a_damaged_database_and_checkpoints_when_stopped(tmp_path):
    from gradio_client import Client

    data = tmp_path / "data"
    data.mkdir()
    (data / "studio.db").write_bytes(b"this is not sqlite at all" * 100)
    port = free_port()
    proc = _serve(data, port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert "Created project" in client.predict("Kept", api_name="/create_project")[0]
        assert (data / "studio.db-wal").stat().st_size > 0  # the new project is in the log ...
    finally:
        proc.send_signal(signal.SIGTERM)  # how a Space (docker stop) ends the app
        proc.wait(30)
    wal = data / "studio.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # ... and in the database file after the stop
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(data / "studio.db", alone / "studio.db")
    with ProjectStore(alone) as store:
        assert [p.name for p in store.list_projects()] == ["Kept"]
    (aside,) = data.glob("damaged-*")
    assert (aside / "studio.db").read_bytes() == b"this is not sqlite at all" * 100
