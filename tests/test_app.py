"""The Gradio app over HTTP: launched on a free loopback port with the tiny backbone and driven
through its named endpoints with gradio_client (the user flows of docs/design.md), plus `python app.py`."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fewshot_studio.app import library, modeling, projects
from fewshot_studio.ui import presenters
from helpers import CLASSES, ROOT, Endpoint, free_port, render, wait_training

pytestmark = pytest.mark.slow  # launches the app


def test_full_flow_through_named_endpoints(app, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    studio = app.workspace
    out = client.predict("Shapes via API", api_name="/create_project")
    assert out[0].startswith("Created project")
    pid = projects.list_projects(studio)[0].id

    for k, name in enumerate(CLASSES):
        out = client.predict(name, "" if k else "a round red shape", api_name="/add_class")
        assert name in out[0]
        files = [handle_file(render(tmp_path / f"{name}-{i}.png", name, 100 * k + i)) for i in range(4)]
        out = client.predict(name, files, api_name="/add_images")
        assert out[0].startswith("Added 4 images"), out[0]
    counts = {r[0]: r[2] for r in library.class_rows(studio.scope(pid))}
    assert all(counts[c] == 4 for c in CLASSES)
    assert library.class_by_name(studio.scope(pid), "red circle").description == "a round red shape"

    train = Endpoint(client, "/train")
    # MMA first with few steps (advanced settings), then GraphAdapter: the latest model
    out = train(Method="mma", Backbone="tiny", **{"MMA · steps": "30"})
    assert "Training MMA" in out[0]
    html = wait_training(client)
    assert 'data-status="done"' in html and "30 steps" in html
    out = train(Method="graph", Backbone="tiny")
    html = wait_training(client)
    assert 'data-status="done"' in html
    models = modeling.models(studio.scope(pid))
    assert [m.method for m in models] == ["graph", "mma"]
    assert models[1].config["hyperparameters"]["steps"] == 30

    plot, edges, confusable, info = Endpoint(client, "/graph")(**{"Sub-graph": "both", "threshold": -1.0})
    assert plot and plot["type"] == "plotly" and all(c in plot["plot"] for c in CLASSES)
    assert len(edges["data"]) == 6 and edges["headers"][:2] == ["class A", "class B"]
    assert "GraphAdapter" in info

    md, comparison, per_class, confusion, *_ = Endpoint(client, "/evaluate")(**{
        "Methods to compare": ["graph", "zeroshot"], "Backbone": "tiny", "GraphAdapter · optimizer steps": 20})
    assert "leave-one-out over 16 images" in md and "GraphAdapter" in md and "Zero-shot" in md
    assert comparison["type"] == "plotly" and confusion["type"] == "plotly" and per_class["type"] == "plotly"
    out = client.predict(api_name="/use_best")
    method, notice = out[0], out[-1]
    assert method in ("graph", "zeroshot") and "Train tab now uses" in notice

    star = render(tmp_path / "star.png", "yellow star", 999)
    label = client.predict(handle_file(star), api_name="/predict")
    assert label["label"] == "yellow star"

    pool_truth = {}
    files = []
    for k, name in enumerate(CLASSES):
        for i in range(2):
            f = render(tmp_path / f"pool-{k}-{i}.png", name, 5000 + 10 * k + i)
            pool_truth[Path(f).name] = name
            files.append(handle_file(f))
    out = client.predict(files, api_name="/add_pool")
    assert out[0].startswith("Added 8 images to the pool")
    out = client.predict(api_name="/label_pool")
    assert out[0].startswith("Labeled 8 pool images")
    table = out[1]["data"]
    assert len(table) == 8 and [r[3] for r in table] == sorted(r[3] for r in table)
    assert np.mean([pool_truth[r[1]] == r[2] for r in table]) >= 0.75

    # the same pool labeled by `python -m fewshot_studio label` and imported (issue 18): same order
    from fewshot_studio.cli import main as cli_main

    labeled = tmp_path / "labeled"
    info = modeling.current_model_info(studio.scope(pid))
    assert cli_main(["label", "--model", str(info.path), "--output", str(labeled), "--quiet",
                     *[x for f in files for x in ("--input", f["path"])]]) == 0
    out = client.predict([handle_file(str(s)) for s in sorted(labeled.glob("*.parquet"))],
                         api_name="/import_predictions")
    assert out[0].startswith("Imported predictions for 8 pool images"), out[0]
    imported = out[1]["data"]
    assert {r[0]: r[2] for r in imported} == {r[0]: r[2] for r in table}  # the same predicted classes
    assert [r[3] for r in imported] == pytest.approx([r[3] for r in table], abs=0.1)  # least confident first

    first, second = table[0], table[1]
    out = client.predict(f"{first[0]}", api_name="/accept")
    assert out[0].startswith("Accepted 1 prediction")
    img = studio.store.get_image(first[0])
    assert img.labeled_by == "accepted" and img.class_id == library.class_by_name(studio.scope(pid), first[2]).id
    out = client.predict(f"#{second[0]}", pool_truth[second[1]], api_name="/correct")
    assert out[0].startswith("Labeled 1 image as")
    assert studio.store.get_image(second[0]).labeled_by == "corrected"
    assert len(out[1]["data"]) == 6

    out = client.predict(api_name="/retrain")
    assert out[0].startswith("Retraining")
    assert 'data-status="done"' in wait_training(client)
    assert len(modeling.models(studio.scope(pid))) == 3

    notice, path = client.predict(api_name="/export_labels_csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    by_id = {int(r["image_id"]): r for r in rows}
    assert by_id[first[0]]["labeled_by"] == "accepted" and by_id[first[0]]["label"] == first[2]
    notice, path = client.predict(api_name="/export_labels_json")
    assert Path(path).read_text(encoding="utf-8").lstrip().startswith("{")
    notice, path = client.predict(api_name="/export_imagefolder")
    with zipfile.ZipFile(path) as z:
        assert {n.split("/")[0] for n in z.namelist()} == set(CLASSES) | {"manifest.json"}
    notice, path, snippet = client.predict(api_name="/export_model")
    with zipfile.ZipFile(path) as z:
        assert {"model/config.json", "model/model.safetensors"} <= set(z.namelist())
    assert "load_model" in snippet
    model_zip = path

    # the formats other tools load, and Label Studio's labels back in (issue #17)
    notice, path = client.predict(api_name="/export_hf_imagefolder")
    with zipfile.ZipFile(path) as z:
        assert "metadata.jsonl" in z.namelist()
    notice, path = client.predict(api_name="/export_fiftyone")
    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("labels.json"))["classes"] == CLASSES
    notice, path = client.predict(api_name="/export_label_studio")
    with zipfile.ZipFile(path) as z:
        tasks = z.read("tasks.json")
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_bytes(tasks)
    notice, _ = client.predict(handle_file(str(tasks_file)), api_name="/import_label_studio")
    assert notice.startswith("Imported 0 labels from Label Studio; 18 already so"), notice
    notice, path, _ = client.predict(api_name="/export_onnx")
    assert path.endswith(".onnx") and "Exported the model as ONNX" in notice

    out = client.predict(handle_file(model_zip), api_name="/import_model")
    assert out[0].startswith("Imported the model")
    assert len(modeling.models(studio.scope(pid))) == 4

    # a class without images: one sentence for a method that needs images
    client.predict("purple cross", "", api_name="/add_class")
    with pytest.raises(AppError) as e:
        train(Method="graph", Backbone="tiny")
    assert "purple cross" in str(e.value) and "\n" not in str(e.value)


def test_accept_refits_a_closed_form_model_over_http(app, client, tmp_path):
    """Issue 14, item 5: with GDA in use, /accept refits the model at once (no /train, no
    /retrain) and answers with the pool as the new model predicts it."""
    from gradio_client import handle_file

    studio = app.workspace
    client.predict("Instant refit via API", api_name="/create_project")
    pid = max(p.id for p in projects.list_projects(studio))
    for k, name in enumerate(CLASSES):
        client.predict(name, "", api_name="/add_class")
        files = [handle_file(render(tmp_path / f"{name}-{i}.png", name, 300 * k + i)) for i in range(2)]
        client.predict(name, files, api_name="/add_images")
    Endpoint(client, "/train")(Method="gda", Backbone="tiny")
    assert 'data-status="done"' in wait_training(client)
    scope = studio.scope(pid)
    base = modeling.current_model_info(scope)
    assert base.method == "gda"
    pool = [handle_file(render(tmp_path / f"pool-{k}.png", name, 7000 + k)) for k, name in enumerate(CLASSES)]
    client.predict(pool, api_name="/add_pool")
    table = client.predict(api_name="/label_pool")[1]["data"]
    assert len(table) == len(CLASSES)

    out = client.predict(f"{table[0][0]}", api_name="/accept")
    notice, rows, summary, bar = out[0], out[1]["data"], out[-2], out[-1]
    # the answer comes after the refit and its background re-search (followed on the bar)
    assert modeling.active_job(studio, pid) is None
    refit = modeling.current_model_info(scope)
    assert refit.id != base.id and modeling.refit_lineage(refit)["of"] == base.id
    assert modeling.refit_lineage(refit)["searched"] is True
    listed = modeling.models(scope)
    assert [m.id for m in listed[:2]] == [refit.id, base.id]
    # besides them only the first model on plain views that the trained one refines (item 6)
    assert [m.id for m in listed[2:]] == [base.metrics["refines"]] if "refines" in base.metrics else not listed[2:]
    assert notice.startswith("Accepted 1 prediction") and "refitted with it, is now current" in notice
    assert "searched again" in notice
    assert f"Model #{refit.id}" in summary and f"refit 1 of #{base.id}" in summary
    assert 'data-status="done"' in bar
    # the pool on screen is the new model's prediction of every image left in it
    stored = {p.image_id: p for p in studio.store.list_predictions(refit.id, pool_only=True)}
    assert sorted(r[0] for r in rows) == sorted(stored) and len(rows) == len(CLASSES) - 1
    assert all(abs(r[3] - round(100 * stored[r[0]].confidence, 1)) < 0.051 for r in rows)


def test_errors_without_a_project_are_one_sentence(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict("x", "", api_name="/add_class")
    assert "Create or open a project first" in str(e.value)
    with pytest.raises(AppError) as e:
        Endpoint(client, "/train")(Method="graph", Backbone="tiny")
    assert "project" in str(e.value)


def test_example_project_and_project_management(app, client):
    studio = app.workspace
    out = client.predict("shapes", api_name="/load_example")
    assert out[0].startswith("Loaded the example project")
    pid = max(p.id for p in projects.list_projects(studio))
    assert {r[0]: r[2] for r in library.class_rows(studio.scope(pid))}["(unlabeled pool)"] == 15
    out = client.predict("Renamed shapes", api_name="/rename_project")
    assert studio.scope(pid).project.name == "Renamed shapes"
    out = client.predict("red circle", "scarlet disc", api_name="/rename_class")
    assert "scarlet disc" in [c for _, c in presenters.class_choices(studio.scope(pid))]
    out = client.predict(api_name="/delete_project")
    assert out[0].startswith("Deleted")
    assert pid not in [p.id for p in projects.list_projects(studio)]


def test_a_missing_image_file_never_takes_the_page_down(app, client):
    """Bad luck: a stored image and its thumbnail vanish. Opening the project still shows every
    tab (a placeholder for that image) and says so in one sentence."""
    ws = app.workspace
    if client.predict("shapes", api_name="/load_example")[0].startswith("Opened your copy"):
        client.predict("shapes", api_name="/load_example")  # a fresh copy, the newest project
    pid = max(p.id for p in projects.list_projects(ws))
    sc = ws.scope(pid)
    img = library.images(sc, "red circle")[0]
    img.path.unlink()
    key = library.thumbnail_key(ws, img.hash)
    for suffix in (".jpg", ".png"):  # JPEG now; PNG from earlier versions
        (ws.thumbs_dir / key[:2] / f"{key}{suffix}").unlink(missing_ok=True)
    out = client.predict(pid, api_name="/open_project")
    assert out[0].startswith("Opened **Example\\: coloured shapes") and "1 image file is missing" in out[0]
    assert f"#{img.id} {presenters.md(img.original_name)}" in out[0]
    out = client.predict("red circle", api_name="/open_class")  # the class gallery with the placeholder
    gallery = next(o for o in out if isinstance(o, list) and o and isinstance(o[0], dict) and "image" in o[0])
    assert len(gallery) == 4
    client.predict(api_name="/delete_project")


def test_page_stays_responsive_during_training_and_cancel_works(app, client, tmp_path):
    from gradio_client.exceptions import AppError

    client.predict("shapes", api_name="/load_example")
    Endpoint(client, "/train")(Method="graph", Backbone="tiny", **{"GraphAdapter · optimizer steps": 20000})
    time.sleep(1.0)
    t = time.perf_counter()
    out = client.predict("red circle", api_name="/open_class")      # another action while training runs
    assert len(out) > 0 and time.perf_counter() - t < 3.0
    t = time.perf_counter()
    status = client.predict(api_name="/training_status")
    assert time.perf_counter() - t < 3.0
    assert any(isinstance(o, str) and 'data-status="running"' in o for o in status)
    assert "Cancelling" in client.predict(api_name="/cancel_training")
    html = wait_training(client, timeout=60)
    assert 'data-status="cancelled"' in html and "unchanged" in html

    # weights that cannot be had offline: one sentence naming the way out
    with pytest.raises(AppError) as e:
        Endpoint(client, "/train")(Method="zeroshot", Backbone="ViT-B-32/openai",
                                   **{"Local checkpoint": str(tmp_path / "missing.safetensors")})
    assert "tiny" in str(e.value) and "\n" not in str(e.value)


def test_cross_validation_can_be_cancelled(app, client):
    client.predict("shapes", api_name="/load_example")
    assert "No cross-validation" in client.predict(api_name="/cancel_evaluation")
    job = Endpoint(client, "/evaluate").submit(**{"Methods to compare": ["mma"], "Backbone": "tiny"})
    time.sleep(1.5)  # MMA trains 300 steps per fold: this runs for many seconds
    assert "Cancelling" in client.predict(api_name="/cancel_evaluation")
    t = time.perf_counter()
    out = job.result(timeout=120)  # a cancel is what the user asked for: no error, no results
    assert time.perf_counter() - t < 15
    assert out[0].startswith("Cross-validation cancelled") and out[-1] == "Cross-validation cancelled."
    assert out[1] is None  # no plot: nothing of an earlier run passes for this one's
    assert "No cross-validation" in client.predict(api_name="/cancel_evaluation")


def test_hosted_sessions_see_only_their_own_projects(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.app import Workspace
    from fewshot_studio.ui.app import build_app

    studio = Workspace.at(tmp_path, BackboneSpec("tiny", None, device="cpu"), hosted=True)
    demo = build_app(studio)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        out = alice.predict("Alice's secrets", api_name="/create_project")
        assert out[1]["choices"] == [["Alice's secrets", 1]]
        out = bob.predict("Bob's", api_name="/create_project")
        assert [c[0] for c in out[1]["choices"]] == ["Bob's"]
        with pytest.raises(AppError):  # refused: not among Bob's projects
            bob.predict(1, api_name="/open_project")
        assert projects.list_projects(studio, "nobody") == []
        assert [p.name for p in projects.list_projects(studio)] == []  # no owner: nothing
    finally:
        demo.close()
        studio.close()


def test_python_app_py_serves_the_page(tmp_path):
    """`python app.py` honours FEWSHOT_STUDIO_* and GRADIO_SERVER_* and serves the app."""
    port = free_port()
    env = {**os.environ, "FEWSHOT_STUDIO_BACKBONE": "tiny", "FEWSHOT_STUDIO_DATA": str(tmp_path / "data"),
           "FEWSHOT_STUDIO_DEVICE": "cpu", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        end, body = time.time() + 90, ""
        while time.time() < end and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "Few-Shot Studio" in body, proc.stdout.read().decode()[-2000:] if proc.poll() is not None else ""
        assert (tmp_path / "data" / "studio.db").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_reserved_pool_folder_and_csv_formulas_through_the_endpoints(app, client, tmp_path):
    """#13 findings 7 and 9 over HTTP: a zip's '(UNLABELED POOL)' folder is refused in one
    sentence on the Classes tab (the rest imported, one pool row), and labels.csv escapes formulas."""
    from gradio_client import handle_file

    studio = app.workspace
    assert client.predict("Reserved via API", api_name="/create_project")[0].startswith("Created project")
    pid = max(p.id for p in projects.list_projects(studio))
    z = tmp_path / "classes.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(render(tmp_path / "p.png", "red circle", 1), "(UNLABELED POOL)/p.png")
        zf.write(render(tmp_path / "f.png", "blue square", 2), "=HYPERLINK(\"x\")/f.png")
        zf.write(render(tmp_path / "g.png", "green triangle", 3), "@SUM(1+1)/g.png")
    out = Endpoint(client, "/add_zip")(**{"A zip of class_name/image folders": handle_file(str(z))})
    notice, table = out[0], out[1]
    # the notice is Markdown: the sentence quotes a folder name, so it comes escaped (presenters.md)
    assert notice.startswith("Added 2 images from the zip. Refused 1 file: " + presenters.md(
        "(UNLABELED POOL)/ (in classes.zip): the folder name '(UNLABELED POOL)' is reserved for the unlabeled "
        "pool, so its 1 file was skipped; rename the folder.")), notice
    rows = table["data"]
    assert [r[0] for r in rows].count("(unlabeled pool)") == 1 and len(rows) == 3
    assert not any(r[0].casefold() == "(unlabeled pool)" and r[0] != "(unlabeled pool)" for r in rows)
    assert {r[0]: r[2] for r in library.class_rows(studio.scope(pid))} == {
        '=HYPERLINK("x")': 1, "@SUM(1+1)": 1, "(unlabeled pool)": 0}

    notice, path = client.predict(api_name="/export_labels_csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["label"] for r in rows) == ["'=HYPERLINK(\"x\")", "'@SUM(1+1)"]
    assert all(r["image_id"].isdigit() for r in rows)

    notice, path = client.predict(api_name="/export_imagefolder")  # '"' is not allowed in a Windows folder name
    assert notice.endswith(" 1 class name was changed to be a safe folder name; see manifest.json in the zip.")
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        assert {n.split("/")[0] for n in z.namelist()} == {"=HYPERLINK(_x_)", "@SUM(1+1)", "manifest.json"}
    assert manifest["classes"] == [{"folder": "=HYPERLINK(_x_)", "class": '=HYPERLINK("x")', "images": 1},
                                   {"folder": "@SUM(1+1)", "class": "@SUM(1+1)", "images": 1}]


def _poisoned_zip(src: str, dst: Path, **changes) -> str:
    """A copy of the exported model zip `src` whose config.json has `changes` in its hyper-parameters."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for n in z.namelist():
            data = z.read(n)
            if n.endswith("config.json"):
                cfg = json.loads(data)
                cfg["hyperparameters"].update(changes)
                data = json.dumps(cfg).encode()
            out.writestr(n, data)
    return str(dst)


def test_out_of_bounds_settings_and_poisoned_models_are_refused_over_http(app, client, tmp_path):
    """#13 findings 3 and 5: the Train form refuses steps=10**7 with the catalog's sentence and
    queues nothing; a model zip with ill-typed or out-of-bounds hyper-parameters is refused with
    one sentence and the project keeps its current model."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from fewshot_studio.app import exports

    studio = app.workspace
    # the page's number boxes take their range from the catalog
    with urllib.request.urlopen(app.local_url.rstrip("/") + "/config", timeout=10) as r:
        components = json.loads(r.read())["components"]
    boxes = {c["props"].get("label"): c for c in components if c.get("type") == "number"}
    assert (boxes["GraphAdapter · optimizer steps"]["props"]["minimum"],
            boxes["GraphAdapter · optimizer steps"]["props"]["maximum"]) == (1, 20000)
    assert boxes["MMA · adapter width r"]["props"]["maximum"] == 256

    out = client.predict("shapes", api_name="/load_example")
    if out[0].startswith("Opened your copy"):  # an earlier test of this module loaded it: a fresh copy
        client.predict("shapes", api_name="/load_example")
    pid = max(p.id for p in projects.list_projects(studio))
    scope = studio.scope(pid)
    train = Endpoint(client, "/train")
    jobs_before = len(scope.store.list_jobs(pid))
    with pytest.raises(AppError) as e:
        train(Method="graph", Backbone="tiny", **{"GraphAdapter · optimizer steps": 10**7})
    assert str(e.value) == "The GraphAdapter setting 'steps' must be between 1 and 20000, not 10000000."
    with pytest.raises(AppError) as e:
        train(Method="mma", Backbone="tiny", **{"MMA · adapter width r": 8000})
    assert str(e.value) == "The MMA setting 'rank' must be between 1 and 256, not 8000."
    assert len(scope.store.list_jobs(pid)) == jobs_before and modeling.active_job(studio, pid) is None

    # two real models: MMA (few steps), then GraphAdapter, the current one; export both
    train(Method="mma", Backbone="tiny", **{"MMA · steps": "20"})
    assert 'data-status="done"' in wait_training(client)
    mma_id = modeling.current_model_info(scope).id
    train(Method="graph", Backbone="tiny", **{"GraphAdapter · optimizer steps": 20})
    assert 'data-status="done"' in wait_training(client)
    notice, graph_zip, _ = client.predict(api_name="/export_model")
    mma_zip = str(exports.export_model(scope, mma_id))
    current, count = modeling.current_model_info(scope).id, len(modeling.models(scope))

    for src, changes, sentence in [
        (graph_zip, {"alpha": "lots"}, "the GraphAdapter setting 'alpha' must be a number, not 'lots'."),
        (graph_zip, {"steps": [1, 2]}, "the GraphAdapter setting 'steps' must be a whole number, not [1, 2]."),
        (mma_zip, {"rank": 8000}, "the MMA setting 'rank' must be between 1 and 256, not 8000."),
    ]:
        bad = _poisoned_zip(src, tmp_path / f"bad-{len(list(tmp_path.iterdir()))}.zip", **changes)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(bad), api_name="/import_model")
        assert str(e.value) == f"The model's config.json has an invalid setting: {sentence}"
        assert modeling.current_model_info(scope).id == current and len(modeling.models(scope)) == count
    # the project still predicts with its model, and a clean zip still imports
    assert client.predict(handle_file(render(tmp_path / "star.png", "yellow star", 999)), api_name="/predict")["label"]
    out = client.predict(handle_file(graph_zip), api_name="/import_model")
    assert out[0].startswith("Imported the model") and len(modeling.models(scope)) == count + 1


def test_a_visitor_cannot_fill_the_queue_and_cancel_stops_every_training(tmp_path):
    """#13 finding 3 over HTTP in hosted mode: a third job is refused in one sentence while two
    of the visitor's trainings are queued or running; Cancel stops both, not only the latest;
    meanwhile another visitor's training still runs to the end."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from fewshot_studio.app import Workspace
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.ui.app import build_app

    ws = Workspace.at(tmp_path, BackboneSpec("tiny", None, device="cpu"), hosted=True)
    demo = build_app(ws)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        for c in (alice, bob):
            c.predict("shapes", api_name="/load_example")
        train = Endpoint(alice, "/train")
        for _ in range(2):
            train(Method="graph", Backbone="tiny", **{"GraphAdapter · optimizer steps": 20000})
        with pytest.raises(AppError) as e:
            train(Method="zeroshot", Backbone="tiny")
        assert str(e.value).startswith("You already have 2 jobs queued or running")
        Endpoint(bob, "/train")(Method="zeroshot", Backbone="tiny")
        assert "the 2 jobs stop" in alice.predict(api_name="/cancel_training")
        end = time.time() + 60
        while time.time() < end and any(j.status not in ("done", "failed", "cancelled") for j in ws.runner.jobs()):
            time.sleep(0.2)
        by_status = sorted((j.owner is not None, j.status) for j in ws.runner.jobs())
        assert [s for _, s in by_status].count("cancelled") == 2 and [s for _, s in by_status].count("done") == 1
        assert 'data-status="done"' in wait_training(bob)
    finally:
        demo.close()
        ws.close()
