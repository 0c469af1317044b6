"""Hostile input through the app's real HTTP endpoints, file serving, and restarts of `python app.py`."""
from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_studio import shapes
from fewshot_studio.ui import presenters
from helpers import ROOT, Endpoint, free_port, wait_training

pytestmark = pytest.mark.slow  # launches the app and subprocesses


def shape_png(label="red circle", seed=0, size=64) -> bytes:
    buf = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), size).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def corpus() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(good-or-convertible files, files that must be refused), by upload name."""
    rgb = Image.open(io.BytesIO(shape_png("blue square", 1)))
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    tiff = io.BytesIO()
    frames[0].save(tiff, "TIFF", save_all=True, append_images=frames[1:])
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    jpeg = encoded(rgb, "JPEG")
    good = {
        "plain.png": shape_png("red circle", 2),
        "animated.gif": gif.getvalue(),
        "multipage.tif": tiff.getvalue(),
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encoded(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG"),
        "palette_alpha.png": encoded(pal, "PNG"),
        "really_a_png.jpg": shape_png("green triangle", 3),
        "日本語の画像 🎨.png": shape_png("yellow star", 4),
        ("x" * 240) + ".png": shape_png("white cross", 5),
        "CON.png": shape_png("black hexagon", 6),
        "tiny_1x1.webp": encoded(Image.new("RGB", (1, 1), "red"), "WEBP"),
    }
    bad = {
        "not_an_image.jpg": b"just some text pretending to be a jpeg\n" * 10,
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "bomb.png": png_header_only(60_000, 60_000),
        "huge.png": png_header_only(20_000, 20_000),
        "drawing.png": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        "page.jpg": b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
    }
    return good, bad


def hostile_zip(escape_name: str) -> tuple[bytes, int, list[str]]:
    """A zip mixing good class folders with every archive trick; (bytes, n good, bad member names)."""
    buf = io.BytesIO()
    bad = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("red circle/ok1.png", shape_png("red circle", 10))
        z.writestr("ünïcødé class/ok2.png", shape_png("blue star", 11))
        for name in (f"../../{escape_name}", f"/tmp/{escape_name}", "red circle/../../../x.png"):
            z.writestr(name, shape_png("red circle", 12))
            bad.append(name)
        link = zipfile.ZipInfo("red circle/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        bad.append("link.png")
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as zi:
            zi.writestr("deep/ok.png", shape_png())
        z.writestr("red circle/nested.zip", inner.getvalue())
        bad.append("nested.zip")
        z.writestr("red circle/ratio_bomb.png", b"\0" * (40 * 2**20))
        bad.append("ratio_bomb.png")
        z.writestr("red circle/fake.png", b"<html>not an image</html>")
        bad.append("fake.png")
    return buf.getvalue(), 2, bad


@pytest.fixture
def hosted_app(tmp_path):
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.app import Workspace
    from fewshot_studio.ui.app import build_app

    studio = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"), hosted=True)
    demo = build_app(studio)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, studio
    demo.close()
    studio.close()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_uploads_are_refused_one_by_one(hosted_app, tmp_path):
    from gradio_client import Client, handle_file

    demo, studio = hosted_app
    client = Client(demo.local_url, verbose=False)
    client.predict("hostile", api_name="/create_project")
    (project,) = [p for p in studio.store.list_projects()]
    client.predict("red circle", "", api_name="/add_class")
    good, bad = corpus()
    up = tmp_path / "uploads"
    up.mkdir()
    paths = []
    for name, data in {**good, **bad}.items():
        p = up / name
        p.write_bytes(data)
        paths.append(handle_file(str(p)))
    outside_before = files_under(tmp_path) - files_under(tmp_path / "data") - files_under(up)
    notice = client.predict("red circle", paths, api_name="/add_images")[0]
    assert notice.startswith(f"Added {len(good)} images"), notice
    assert f"Refused {len(bad)} files" in notice
    for name in bad:
        assert presenters.md(name) in notice, name  # named in the Markdown notice, escaped as text
    assert "Traceback" not in notice
    # the store holds exactly the good files; the cache nothing of the bad ones
    stored = studio.store.list_images(project.id)
    assert len(stored) == len(good)
    bad_hashes = {__import__("hashlib").sha256(d).hexdigest() for d in bad.values()}
    assert not bad_hashes & {i.hash for i in stored}
    cache_files = " ".join(str(p) for p in files_under(tmp_path / "data"))
    assert not any(h in cache_files for h in bad_hashes)
    for img in stored:  # every stored image decodes as RGB
        assert studio.store.image_path(img.hash).exists()

    # a zip with traversal, absolute paths, a symlink, a nested zip and a ratio bomb
    escape = f"escaped-{uuid.uuid4().hex}.png"
    data, n_good, bad_members = hostile_zip(escape)
    zpath = up / "classes.zip"
    zpath.write_bytes(data)
    notice = client.predict("red circle", handle_file(str(zpath)), api_name="/add_zip")[0]
    assert notice.startswith(f"Added {n_good} images"), notice
    for name in bad_members:
        assert presenters.md(name) in notice, name  # named in the Markdown notice, escaped as text
    names = {c.name for c in studio.store.list_classes(project.id)}
    assert names == {"red circle", "ünïcødé class"}
    # nothing was written outside the data directory
    assert not (tmp_path.parent.parent / escape).exists() and not Path(f"/tmp/{escape}").exists()
    outside_after = files_under(tmp_path) - files_under(tmp_path / "data") - files_under(up)
    assert outside_after == outside_before
    assert not list(tmp_path.rglob(escape)) and not list(up.rglob("x.png"))
    assert studio.store.check_integrity() == []


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening (yet)
        return 0


def test_file_server_exposes_only_thumbnails_and_exports(hosted_app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    demo, studio = hosted_app
    alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    alice.predict("alice", api_name="/create_project")
    alice.predict("red circle", "", api_name="/add_class")
    img = tmp_path / "secret.png"
    img.write_bytes(shape_png("red circle", 42))
    alice.predict("red circle", [handle_file(str(img))], api_name="/add_images")
    (p,) = studio.store.list_projects()
    (secret,) = studio.store.list_images(p.id)
    base = demo.local_url.rstrip("/")
    for target in (studio.store.image_path(secret.hash), studio.root / "studio.db", Path("/etc/passwd"),
                   ROOT / "app.py"):
        for route in ("/gradio_api/file=", "/file="):
            assert http_status(f"{base}{route}{target}") in (403, 404), (route, target)
    # bob cannot open alice's project, nor list its images, by guessing its id
    bob.predict("bob", api_name="/create_project")
    with pytest.raises(AppError):
        bob.predict(p.id, api_name="/open_project")
    with pytest.raises(Exception):
        presenters.image_gallery(studio.scope(p.id, "someone-else"), "red circle")


def _serve(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "FEWSHOT_STUDIO_BACKBONE": "tiny", "FEWSHOT_STUDIO_DATA": str(tmp_path / "data"),
           "FEWSHOT_STUDIO_DEVICE": "cpu", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.time() + 90
    while time.time() < end:
        if http_status(f"http://127.0.0.1:{port}/config") == 200:
            return proc
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("app.py did not start")


def test_killing_the_app_during_training_loses_nothing(tmp_path):
    from gradio_client import Client


    port = free_port()
    proc = _serve(tmp_path, port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict("shapes", api_name="/load_example")
        train = Endpoint(client, "/train")
        train(Method="mma", Backbone="tiny", **{"MMA · steps": "20000"})
        end = time.time() + 60
        while time.time() < end:  # wait until the job is really training
            html = next((o for o in client.predict(api_name="/training_status")
                         if isinstance(o, str) and "fs-progress" in o), "")
            if 'data-status="running"' in html and "Training" in html:
                break
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()

    from fewshot_studio.store import ProjectStore

    store = ProjectStore(tmp_path / "data")
    try:
        (job,) = store.list_jobs()
        assert job.status == "running"  # as the killed process left it
    finally:
        store.close()
    proc = _serve(tmp_path, port)  # restart: the app marks the interrupted job failed
    try:
        store = ProjectStore(tmp_path / "data")
        (p,) = store.list_projects()
        (job,) = store.list_jobs()
        assert job.status == "failed" and "stopped" in job.message
        assert store.list_models(p.id) == []
        assert sum(store.support_set(p.id).counts()) == 20 and len(store.list_images(p.id, pool=True)) == 15
        store.close()
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict("shapes", api_name="/load_example")  # the restarted app trains as usual
        Endpoint(client, "/train")(Method="graph", Backbone="tiny")
        assert 'data-status="done"' in wait_training(client)
    finally:
        proc.terminate()  # a clean stop checkpoints the database first: seconds on a busy machine
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
