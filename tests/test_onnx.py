"""The ONNX classifier export (onnx_export.py) and its torch-free predictor (onnx_predict.py):
for every method, onnxruntime's probabilities equal the project's within 1e-4 at batch 1 and 7,
and the exported file runs in a process where torch cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NATO, ROOT, make_task
from fewshot_studio import onnx_predict, shapes
from fewshot_studio.data import ImageRef
from fewshot_studio.errors import DataError
from fewshot_studio.methods import make_method
from fewshot_studio.methods.catalog import method_ids
from fewshot_studio.preprocess import decode_views

# short fits: these tests check that the exported graph is the model, not how well it learns
FAST = {"zeroshot": {}, "tip": {"augment_views": 1}, "tip-f": {"augment_views": 1, "min_steps": 5},
        "gda": {}, "proker": {"augment_views": 1}, "graph": {"steps": 5, "augment_views": 1},
        "mma": {"steps": 3, "augment_views": 1}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """7 image files that exercise every preprocessing step: JPEG draft decoding (a large JPEG),
    landscape and portrait crops, an EXIF rotation, transparency, a palette PNG, an image
    smaller than the input size."""
    d = tmp_path_factory.mktemp("onnx-images")
    rng = np.random.default_rng(3)
    specs = list(NATO.values())

    def shape(i: int, size: int) -> Image.Image:
        return shapes.render(shapes.ShapeSpec(*specs[i % len(specs)].split(" ", 1)), rng, size)

    paths = []
    big = shape(0, 400).resize((520, 400))
    big.save(d / "big.jpg", quality=92)
    shape(1, 90).resize((150, 90)).save(d / "wide.png")
    shape(2, 90).resize((70, 130)).save(d / "tall.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    shape(3, 96).resize((96, 60)).save(d / "rotated.jpg", exif=exif)
    rgba = shape(4, 64).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)))
    rgba.save(d / "alpha.png")
    shape(0, 64).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    shape(1, 30).save(d / "small.png")
    for name in ("big.jpg", "wide.png", "tall.jpg", "rotated.jpg", "alpha.png", "palette.png", "small.png"):
        paths.append(str(d / name))
    return paths


def project_pixels(backbone, paths: list[str]) -> np.ndarray:
    """The pixels the project's own decode path gives (imageio + preprocess, as the feature
    extractor runs them)."""
    tasks = [(i, [0], p, p, str(i), (0,)) for i, p in enumerate(paths)]
    return np.concatenate([px for _, _, px in decode_views(backbone.image_size, tasks, backbone.mean, backbone.std)])


def test_plain_view_matches_the_projects_preprocessing(tiny, images):
    ours = onnx_predict.normalize(np.stack([onnx_predict.plain_view(onnx_predict.load_rgb(p, tiny.image_size),
                                                                    tiny.image_size) for p in images]),
                                  tiny.mean, tiny.std)
    assert ours.shape == (7, 3, tiny.image_size, tiny.image_size) and ours.dtype == np.float32
    assert np.abs(ours - project_pixels(tiny, images)).max() < 1e-4


def test_missing_onnx_is_one_sentence(monkeypatch):
    from fewshot_studio import onnx_export

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DataError, match=r"install them with pip install 'fewshot-studio\[onnx\]'\.$"):
        onnx_export.require_onnx()


@pytest.fixture(scope="module")
def support():
    support, _, _ = make_task(NATO, shots=2, test_per_class=0, seed=11)
    return support


def test_every_method_is_covered():
    assert set(FAST) == set(method_ids())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAST))
def test_onnx_probs_equal_the_projects(name, tiny, support, shared_extractor, images, tmp_path):
    from fewshot_studio.onnx_export import OPSET, export_onnx

    torch.manual_seed(0)
    method = make_method(name, tiny, support.classnames, **FAST[name]).fit(support, shared_extractor)
    result = export_onnx(method, tmp_path / "model.onnx")
    assert result.opset == OPSET and result.bytes == (tmp_path / "model.onnx").stat().st_size
    clf = onnx_predict.OnnxClassifier(str(result.path))
    meta = clf.metadata
    assert json.loads(meta["classes"]) == support.classnames
    assert (meta["method"], meta["backbone"], int(meta["image_size"])) == (name, tiny.id, tiny.image_size)
    assert json.loads(meta["mean"]) == list(tiny.mean) and json.loads(meta["std"]) == list(tiny.std)
    ours = method.predict_proba([ImageRef.from_path(p) for p in images], shared_extractor).numpy()
    assert ours.shape == (7, len(support.classnames))
    batch7 = clf.probs(images)
    assert np.abs(batch7 - ours).max() < 1e-4
    batch1 = np.concatenate([clf.probs([p]) for p in images])
    assert np.abs(batch1 - ours).max() < 1e-4
    assert np.allclose(batch7.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_cli_export_and_predict_without_torch(tiny, support, shared_extractor, images, tmp_path, capsys):
    """export-onnx writes the file; `predict --onnx` and the standalone onnx_predict.py file (in
    a process where `import torch` fails) give the project's probabilities."""
    from fewshot_studio.cli import main

    method = make_method("gda", tiny, support.classnames).fit(support, shared_extractor)
    method.save(tmp_path / "model")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    assert "opset 18" in capsys.readouterr().out
    ours = method.predict_proba([ImageRef.from_path(p) for p in images], shared_extractor).numpy()

    assert main(["predict", "--onnx", str(out), "--json", *images]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = np.array([[r["probs"][c] for c in support.classnames] for r in rows])
    assert np.abs(got - ours).max() < 2e-6 + 1e-4  # rounded to 6 places by the CLI

    script = ("import sys, json, runpy\n"
              "sys.modules['torch'] = None  # any import of torch now fails\n"
              f"mod = runpy.run_path({str(ROOT / 'fewshot_studio' / 'onnx_predict.py')!r})\n"
              "clf = mod['OnnxClassifier'](sys.argv[1])\n"
              "print(json.dumps(clf.probs(sys.argv[2:]).tolist()))\n"
              "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *images], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.abs(np.array(json.loads(proc.stdout)) - ours).max() < 1e-4
    # and the CLI's own `predict --onnx`, with torch blocked the same way
    cli = ("import sys\n"
           "sys.modules['torch'] = None\n"
           "from fewshot_studio.cli import main\n"
           "sys.exit(main(['predict', '--onnx', *sys.argv[1:]]))\n")
    proc = subprocess.run([sys.executable, "-c", cli, str(out), "--json", *images], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.array([[r["probs"][c] for c in support.classnames] for r in json.loads(proc.stdout)])
    assert np.abs(got - ours).max() < 2e-6 + 1e-4


def test_predict_onnx_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    from fewshot_studio.cli import main

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", "--onnx", str(bad), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "could not be loaded" in err
