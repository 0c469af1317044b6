"""#13 finding 11 (the disk cannot be filled by visitors) and finding 12 (a, b): link members
cannot manage a project, thumbnails are not named by content, no sentence shows a server path.
The service-level tests are fast; the ones over HTTP (gradio_client) launch the app."""
from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import Workspace, exports, library, modeling, projects
from fewshot_studio.backbone import BackboneSpec, load_backbone
from fewshot_studio.cache import FeatureCache
from fewshot_studio.errors import DataError, ModelFileError
from fewshot_studio.markup import no_paths
from fewshot_studio.methods.base import read_model_config
from fewshot_studio.store import ValidationError
from fewshot_studio.ui.uploads import UploadBudget, discard, upload_folder
from helpers import Endpoint, free_port, wait_training

TINY = BackboneSpec("tiny", None, device="cpu")


def make_ws(root, tiny, hosted=False) -> Workspace:
    def loader(spec):
        return tiny if (spec.name, spec.pretrained, spec.checkpoint) == ("tiny", None, None) else load_backbone(spec)

    return Workspace.at(root, TINY, hosted=hosted, loader=loader)


def png(path: Path, label: str, seed: int) -> Path:
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 64).save(path)
    return path


def one_sentence(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and "Traceback" not in msg and msg.rstrip().endswith((".", ")"))


def labeled_project(ws, tmp_path, owner=None):
    p = projects.create_project(ws, "disk", owner)
    sc = ws.scope(p.id, ws.owner_of(owner))
    red = library.add_class(sc, "red circle")
    library.add_images(sc, [png(tmp_path / f"r{i}.png", "red circle", i) for i in range(3)], class_id=red.id)
    return sc


def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- exports ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "json", "imagefolder"])
def test_an_export_on_a_full_disk_leaves_no_partial_file(tiny, tmp_path, monkeypatch, kind):
    ws = make_ws(tmp_path / "data", tiny)
    sc = labeled_project(ws, tmp_path)
    if kind == "csv":
        import csv
        monkeypatch.setattr(csv.DictWriter, "writerows", no_space)  # the header is written, then the disk fills
        run = exports.export_labels_csv
    elif kind == "json":
        monkeypatch.setattr(Path, "write_text", no_space)
        run = exports.export_labels_json
    else:
        real = zipfile.ZipFile.write
        calls = []

        def write(self, *a, **k):  # the first image goes in, the second finds the disk full
            calls.append(1)
            if len(calls) > 1:
                no_space()
            return real(self, *a, **k)
        monkeypatch.setattr(zipfile.ZipFile, "write", write)
        run = exports.export_imagefolder
    with pytest.raises(DataError) as e:
        run(sc)
    assert one_sentence(str(e.value)) and "disk is full" in str(e.value) and str(tmp_path) not in str(e.value)
    assert [p for p in ws.exports_dir.rglob("*") if p.is_file()] == []  # no truncated zip, no 0-byte CSV
    monkeypatch.undo()
    path = Path(run(sc).path if kind == "imagefolder" else run(sc))
    assert path.stat().st_size > 0 and not list(ws.exports_dir.rglob("*.partial"))


def test_a_visitor_keeps_one_export_per_project_and_old_ones_are_swept(tiny, tmp_path):
    ws = make_ws(tmp_path / "data", tiny, hosted=True)
    sc = labeled_project(ws, tmp_path, owner="alice")
    projects.open_link(ws, projects.project_link(sc), "bob")
    bob = ws.scope(sc.id, "bob")
    first = exports.export_labels_csv(sc)
    theirs = exports.export_labels_csv(bob)
    second = exports.export_labels_json(sc)
    assert not first.exists() and second.exists() and theirs.exists()  # alice's previous one went, bob's stays
    assert "alice" not in str(second) and "bob" not in str(theirs)  # served paths name no owner token
    old = time.time() - exports.EXPORT_TTL - 5
    os.utime(theirs.parent, (old, old))
    exports.export_labels_csv(sc)
    assert not theirs.exists()  # another project's or visitor's export older than EXPORT_TTL is swept too
    assert len(list(ws.exports_dir.iterdir())) == 1


# ---- feature cache on a full disk ------------------------------------------------------------
def test_predict_and_label_work_without_the_feature_cache_on_a_full_disk(tiny, tmp_path, monkeypatch):
    ws = make_ws(tmp_path / "data", tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    monkeypatch.setattr(FeatureCache, "_write", lambda self, folder, name, data: no_space())
    st = ws.runner.wait(modeling.start_training(sc, "graph"), timeout=300)
    assert st.status == "done", st.message
    img = library.images(sc, "red circle")[0]
    top = modeling.predict(sc, str(img.path), k=2)
    assert top and max(top.values()) > 0
    st = ws.runner.wait(modeling.start_labeling(sc), timeout=300)
    assert st.status == "done", st.message
    assert len(st.result) == len(library.pool_images(sc))
    assert ws.cache.write_failures >= 1


# ---- members (12a) ---------------------------------------------------------------------------
def test_link_members_label_but_only_the_creator_manages_the_project(tiny, tmp_path):
    ws = make_ws(tmp_path / "data", tiny, hosted=True)
    sc = labeled_project(ws, tmp_path, owner="alice")
    token = projects.project_link(sc)
    projects.open_link(ws, token, "bob")
    bob = ws.scope(sc.id, "bob")
    library.add_class(bob, "blue square")  # members work on it as before
    for act in (lambda: projects.rename_project(bob, "mine"), lambda: projects.delete_project(bob),
                lambda: projects.project_link(bob, renew=True), lambda: projects.stop_sharing(bob)):
        with pytest.raises(ValidationError) as e:
            act()
        assert one_sentence(str(e.value)) and "Only the session that created this project" in str(e.value)
    assert ws.store.get_project(sc.id).name == "disk"
    assert projects.stop_sharing(sc) == 1
    with pytest.raises(Exception):
        ws.scope(sc.id, "bob")  # bob no longer sees it
    assert projects.list_projects(ws, "bob") == []
    with pytest.raises(Exception):
        projects.open_link(ws, token, "carol")  # the old link opens nothing
    assert projects.project_link(sc) != token  # sharing again makes a new link


# ---- thumbnails and paths (12b) --------------------------------------------------------------
def test_a_thumbnail_url_cannot_be_computed_from_the_image(tiny, tmp_path):
    a = make_ws(tmp_path / "a", tiny)
    b = make_ws(tmp_path / "b", tiny)
    imgs = []
    for ws in (a, b):
        sc = labeled_project(ws, tmp_path)
        imgs.append((ws, library.images(sc, "red circle")[0]))
    (wa, ia), (wb, ib) = imgs
    assert ia.hash == ib.hash
    ta, tb = Path(library.thumbnail(wa, ia)), Path(library.thumbnail(wb, ib))
    assert ia.hash not in str(ta) and hashlib.sha256(ta.read_bytes()).hexdigest() not in str(ta)
    assert ta.name != tb.name  # keyed by each installation's secret
    # thumbnails of the old layout (named by the content hash) are removed
    old = wa.thumbs_dir / ia.hash[:2] / f"{ia.hash}.png"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(ta.read_bytes())
    assert library.forget_hash_thumbnails(wa) == 1 and not old.exists() and ta.exists()


def test_no_sentence_shows_a_server_path(tmp_path):
    text = no_paths(f"[Errno 2] No such file or directory: '{tmp_path}/data/images/ab/abc.png'")
    assert str(tmp_path) not in text and "abc.png" in text
    assert no_paths("see https://example.org/a/b and red / blue, a/b.png") == "see https://example.org/a/b and red / blue, a/b.png"
    d = tmp_path / "data" / "models" / "7"
    d.mkdir(parents=True)
    with pytest.raises(ModelFileError) as e:
        read_model_config(d)
    assert str(tmp_path) not in str(e.value) and one_sentence(str(e.value))


# ---- uploads ---------------------------------------------------------------------------------
def test_the_upload_budget_counts_bytes_per_visitor_and_in_total():
    now = [0.0]
    budget = UploadBudget(per_visitor=100, total=150, window=60, clock=lambda: now[0])
    assert budget.charge("a", 60) is None and budget.charge("a", 40) is None
    refusal = budget.charge("a", 1)
    assert one_sentence(refusal) and "one visitor" in refusal
    assert budget.charge("b", 50) is None
    assert "all visitors" in budget.charge("c", 1)
    now[0] = 61  # the window moved on
    assert budget.charge("a", 100) is None


def test_discard_deletes_only_gradio_uploads(tmp_path):
    outside = tmp_path / "keep.png"
    outside.write_bytes(b"x")
    inside = upload_folder() / f"test-{uuid.uuid4().hex}" / "up.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"y")
    assert discard([str(outside), str(inside), None]) == 1
    assert outside.exists() and not inside.exists() and not inside.parent.exists()


# ---- over HTTP -------------------------------------------------------------------------------
@pytest.fixture(params=[None])
def hosted(request, tmp_path, monkeypatch):
    from fewshot_studio.ui import app as ui_app

    if request.param:
        monkeypatch.setattr(ui_app, "CACHE_SWEEP", request.param)
    studio = Workspace.at(tmp_path / "data", TINY, hosted=True)
    demo = ui_app.build_app(studio)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, studio
    demo.close()
    studio.close()


def uploads_named(marker: str) -> list[Path]:
    return [p for p in upload_folder().rglob(f"*{marker}*") if p.is_file()]


@pytest.mark.slow
def test_the_upload_cache_is_cleaned(hosted, tmp_path):
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    demo, studio = hosted
    client = Client(demo.local_url, verbose=False)
    client.predict("up", api_name="/create_project")
    client.predict("red circle", "", api_name="/add_class")
    marker = uuid.uuid4().hex
    good = png(tmp_path / f"good-{marker}.png", "red circle", 1)
    bad = tmp_path / f"bad-{marker}.png"
    bad.write_bytes(b"<html>not an image</html>" * 1000)
    notice = client.predict("red circle", [handle_file(str(good)), handle_file(str(bad))], api_name="/add_images")[0]
    assert notice.startswith("Added 1 image") and "Refused 1 file" in notice
    assert uploads_named(marker) == []  # accepted and refused uploads alike are gone once read
    zmarker = uuid.uuid4().hex
    zpath = tmp_path / f"classes-{zmarker}.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(good, "blue square/b.png")
    client.predict("red circle", handle_file(str(zpath)), api_name="/add_zip")
    assert uploads_named(zmarker) == []
    client.predict(api_name="/delete_project")
    with pytest.raises(AppError, match="project first"):  # a refused call deletes its upload too
        client.predict(None, [handle_file(str(good))], api_name="/add_images")
    assert uploads_named(marker) == []


@pytest.mark.slow
@pytest.mark.parametrize("hosted", [(1, 2)], indirect=True)  # Gradio's sweep: every second, files 2 s old
def test_an_upload_no_handler_reads_is_swept(hosted):
    import httpx

    demo, studio = hosted
    orphan = f"orphan-{uuid.uuid4().hex}.bin"
    r = httpx.post(demo.local_url + "gradio_api/upload", files={"files": (orphan, b"\0" * 4096)})
    assert r.status_code == 200 and uploads_named(orphan)
    end = time.time() + 15
    while uploads_named(orphan) and time.time() < end:
        time.sleep(0.5)
    assert uploads_named(orphan) == []


@pytest.mark.slow
def test_a_visitor_over_the_upload_budget_is_refused_in_one_sentence(hosted):
    import httpx

    demo, studio = hosted
    demo.upload_budget.per_visitor = 100_000
    url = demo.local_url + "gradio_api/upload"
    marker = uuid.uuid4().hex
    assert httpx.post(url, files={"files": (f"a-{marker}.bin", b"\0" * 60_000)}).status_code == 200
    r = httpx.post(url, files={"files": (f"b-{marker}.bin", b"\0" * 60_000)})
    assert r.status_code == 413 and one_sentence(r.text) and "one visitor" in r.text
    assert not [p for p in uploads_named(marker) if p.name.startswith("b-")]  # never reached the disk
    r = httpx.post(url, files={"files": (f"c-{marker}.bin", b"\0" * 60_000)},
                   headers={"X-Forwarded-For": "203.0.113.9"})  # another visitor (the proxy's address)
    assert r.status_code == 200


@pytest.mark.slow
def test_exports_over_http_keep_one_copy_per_visitor(hosted):
    from gradio_client import Client

    demo, studio = hosted
    client = Client(demo.local_url, verbose=False)
    client.predict("shapes", api_name="/load_example")
    t0 = time.time() - 1
    _, first = client.predict(api_name="/export_labels_csv")
    served = [p for p in upload_folder().rglob("labels.csv")
              if p.stat().st_ctime >= t0 and p.read_bytes() == Path(first).read_bytes()
              and p.resolve() != Path(first).resolve()]  # (not the client's download, kept in the same folder)
    assert served  # Gradio's copy, which it serves for the download
    _, second = client.predict(api_name="/export_labels_json")
    exports_left = [p for p in studio.exports_dir.rglob("*") if p.is_file()]
    assert len(exports_left) == 1 and exports_left[0].name == "labels.json"  # ours: the latest only
    assert not any(p.exists() for p in served)  # Gradio's copy of the previous one went too


@pytest.mark.slow
def test_members_and_paths_over_http(hosted):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    demo, studio = hosted
    alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    alice.predict("shapes", api_name="/load_example")
    (p,) = studio.store.list_projects()
    token = alice.predict(api_name="/share_project")[0]
    projects.open_link(studio, token, bob.session_hash)  # what opening ?project=<token> does
    bob.predict("bob's own", api_name="/create_project")  # bob's project menu now lists both
    assert bob.predict(p.id, api_name="/open_project")[0].startswith("Opened")
    for api, args in (("/rename_project", ("bob's now",)), ("/delete_project", ()), ("/renew_project_link", ()),
                      ("/stop_sharing", ())):
        with pytest.raises(AppError, match="Only the session that created this project"):
            bob.predict(*args, api_name=api)
    assert "no longer see" in alice.predict(api_name="/stop_sharing")[-1]
    with pytest.raises(AppError, match="no project"):
        bob.predict(p.id, api_name="/open_project")
    # a failing action's sentence names no part of the data folder
    img = library.images(studio.scope(p.id, p.owner), "red circle")[0]
    img.path.unlink()
    with pytest.raises(AppError) as e:
        alice.predict(api_name="/export_imagefolder")
    assert str(studio.root) not in str(e.value) and "missing" in str(e.value)


@pytest.mark.slow
def test_predict_over_http_on_a_full_disk(hosted, monkeypatch):
    from gradio_client import Client, handle_file

    demo, studio = hosted
    monkeypatch.setattr(FeatureCache, "_write", lambda self, folder, name, data: no_space())
    client = Client(demo.local_url, verbose=False)
    client.predict("shapes", api_name="/load_example")
    Endpoint(client, "/train")(Method="graph", Backbone="tiny")
    assert 'data-status="done"' in wait_training(client)
    (p,) = studio.store.list_projects()
    img = library.images(studio.scope(p.id, p.owner), "red circle")[0]
    out = client.predict(handle_file(str(img.path)), api_name="/predict")
    assert out["label"] == "red circle"
