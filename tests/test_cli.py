"""The command line, run as a user would: subprocesses, exit codes, output formats."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fewshot_studio import shapes

pytestmark = pytest.mark.slow  # runs the CLI in subprocesses

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "fewshot_studio", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shapes.write_image_folder(root / "train", {"red_circle": "red circle", "blue square": "blue square",
                                               "green triangle": "green triangle"}, per_class=3, seed=11)
    shapes.write_image_folder(root / "test", {"red_circle": "red circle", "blue square": "blue square",
                                              "green triangle": "green triangle"}, per_class=4, seed=12)
    (root / "test" / "bad.jpg").write_text("<html>not an image</html>")
    return root


def test_train_then_predict_zeroshot(folder, tmp_path):
    env = {"FEWSHOT_STUDIO_CACHE": str(tmp_path / "cache")}
    r = run("train", "--data", str(folder / "train"), "--method", "zeroshot", "--backbone", "tiny",
            "--out", str(tmp_path / "m"), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == "zeroshot" and cfg["classes"] == ["blue square", "green triangle", "red_circle"]
    assert (tmp_path / "m" / "model.safetensors").exists()

    r = run("predict", "--model", str(tmp_path / "m"), "--json", str(folder / "test"), env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 13
    bad = [x for x in rows if "error" in x]
    assert len(bad) == 1 and bad[0]["path"].endswith("bad.jpg") and "not an image" in bad[0]["error"]
    good = [x for x in rows if "error" not in x]
    correct = sum(os.path.basename(os.path.dirname(x["path"])) == x["label"] for x in good)
    assert correct >= 10
    assert all(abs(sum(x["probs"].values()) - 1) < 1e-4 for x in good)

    r = run("predict", "--model", str(tmp_path / "m"), str(folder / "test" / "red_circle"), env=env)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 4 and all(len(l.split("\t")) == 3 for l in lines)

    # a reader that stops early (`predict ... | head`): no traceback
    p = subprocess.Popen([sys.executable, "-m", "fewshot_studio", "predict", "--model", str(tmp_path / "m"),
                          "--json", str(folder / "test")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**ENV, **env})
    p.stdout.close()  # the reader is gone before the first line (loading the model takes seconds)
    assert p.wait(timeout=300) == 141 and "Traceback" not in p.stderr.read().decode()


def test_user_errors_exit_2_with_one_line(folder, tmp_path):
    r = run("train", "--data", str(tmp_path / "missing"), "--method", "zeroshot", "--backbone", "tiny",
            "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run("train", "--data", str(folder / "train"), "--method", "zeroshot", "--backbone", "ViT-B-32",
            "--out", str(tmp_path / "m"), env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tiny" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    r = run("predict", "--model", str(tmp_path / "nomodel"), str(folder / "test"))
    assert r.returncode == 2 and "not a saved model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["train", "predict", "graph", "pretrain-tiny", "doctor", "label"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout


@pytest.mark.parametrize("method", ["tip", "tip-f", "graph", "mma", "gda", "proker"])
def test_every_method_trains_predicts_and_graphs(folder, tmp_path, method):
    env = {"FEWSHOT_STUDIO_CACHE": str(tmp_path / "cache")}
    extra = ["--steps", "40"] if method == "mma" else []
    r = run("train", "--data", str(folder / "train"), "--method", method, "--backbone", "tiny",
            "--out", str(tmp_path / "m"), "--quiet", *extra, env=env)
    assert r.returncode == 0, r.stderr
    r = run("predict", "--model", str(tmp_path / "m"), "--json", str(folder / "test"), env=env)
    assert r.returncode == 0, r.stderr
    good = [x for x in json.loads(r.stdout) if "error" not in x]
    assert len(good) == 12
    assert sum(os.path.basename(os.path.dirname(x["path"])) == x["label"] for x in good) >= 9
    r = run("graph", "--model", str(tmp_path / "m"), "--json", env=env)
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert g["classes"] == ["blue square", "green triangle", "red_circle"]
    assert len(g["text_edges"]) == 3 and len(g["visual_edges"]) == 3


def test_doctor_reports_problems_and_collects_garbage(tmp_path, capsys, monkeypatch):
    import io

    from PIL import Image

    from fewshot_studio.cli import main
    from fewshot_studio.store import ProjectStore

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(buf, "PNG")
        return buf.getvalue()

    root = tmp_path / "data"
    assert main(["doctor", "--data-dir", str(root)]) == 0  # no database yet: nothing checked or created
    assert "nothing to check" in capsys.readouterr().out and not root.exists()

    with ProjectStore(root) as store:
        p = store.create_project("doctor")
        cat = store.add_class(p.id, "cat")
        (kept, gone), errors = store.add_images(p.id, [("a.png", png("red")), ("b.png", png("blue"))], cat.id)
        assert errors == []
    assert main(["doctor", "--data-dir", str(root)]) == 0
    assert capsys.readouterr().out == "No problems found.\n"

    data = gone.path.read_bytes()
    gone.path.unlink()  # damage: a row whose file is missing
    orphan = root / "images" / "ff" / ("f" * 64)  # garbage: a file no row references
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left over")
    assert main(["doctor", "--data-dir", str(root)]) == 1
    assert capsys.readouterr().out == f"The image file {gone.hash} is missing.\n"
    assert main(["doctor", "--data-dir", str(root), "--collect-garbage"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"The image file {gone.hash} is missing." and out[1].startswith("Nothing was removed")
    assert orphan.exists() and kept.path.exists()

    gone.path.write_bytes(data)  # repaired; the default data dir comes from FEWSHOT_STUDIO_DATA
    monkeypatch.setenv("FEWSHOT_STUDIO_DATA", str(root))
    assert main(["doctor", "--collect-garbage"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "No problems found.",
        "Removed 1 unreferenced image file, 0 temporary files or folders and 0 orphaned model directories."]
    assert not orphan.exists() and kept.path.read_bytes() == png("red") and gone.path.read_bytes() == data
