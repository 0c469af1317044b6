"""Exports and imports: label records, labels as CSV or JSON, the labeled set as an ImageFolder
zip, a trained model as a zip (config.json + model.safetensors + USAGE.md), and importing one."""
from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from .. import imageio
from ..errors import ModelFileError
from ..methods import Method, load_model
from ..methods.base import CONFIG_FILE, WEIGHTS_FILE, check_model_config, read_model_config
from ..store import ModelInfo
from .context import ProjectScope
from .modeling import model

EXPORT_TTL = 3600.0  # seconds an export stays on disk for downloading
LABEL_FIELDS = ["image_id", "file", "sha256", "label", "labeled_by"]


def export_path(scope: ProjectScope, filename: str) -> Path:
    """A fresh, unguessable folder per export (exports are served for download, so another
    session must not be able to guess a path), named exports/<project>-<random>/filename;
    the project's exports older than EXPORT_TTL are removed."""
    exports = scope.ws.exports_dir
    exports.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in exports.glob(f"{scope.id}-*"):
        try:
            if now - old.stat().st_mtime > EXPORT_TTL:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    d = exports / f"{scope.id}-{secrets.token_urlsafe(12)}"
    d.mkdir(parents=True)
    return d / filename


def label_records(scope: ProjectScope) -> list[dict]:
    """One record per image: id, file name, content hash, label (None: the pool), who labeled it."""
    store = scope.store
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    return [{"image_id": i.id, "file": i.original_name, "sha256": i.hash,
             "label": names.get(i.class_id) if i.class_id is not None else None,
             "labeled_by": i.labeled_by}
            for i in store.list_images(scope.id)]


def export_labels_csv(scope: ProjectScope) -> Path:
    rows = label_records(scope)
    path = export_path(scope, "labels.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LABEL_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def export_labels_json(scope: ProjectScope) -> Path:
    path = export_path(scope, "labels.json")
    classes = [{"name": c.name, "description": c.description} for c in scope.store.list_classes(scope.id)]
    path.write_text(json.dumps({"project": scope.project.name, "classes": classes, "images": label_records(scope)},
                               indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def _safe_part(name: str) -> str:
    bad = '<>:"/\\|?*\x00'
    s = "".join("_" if ch in bad or ord(ch) < 32 else ch for ch in name).strip(" .")
    return s[:100] or "_"


def export_imagefolder(scope: ProjectScope) -> Path:
    """A zip of the labeled set as class_name/file folders."""
    store = scope.store
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    path = export_path(scope, "imagefolder.zip")
    used: set[str] = set()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for img in store.list_images(scope.id):
            if img.class_id is None:
                continue
            fmt = imageio.probe_image(img.path.read_bytes(), img.original_name)[0].lower()
            ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
            stem = Path(img.original_name).stem.replace("/", "_") or f"image_{img.id}"
            arc = f"{_safe_part(names[img.class_id])}/{_safe_part(stem)}.{ext}"
            if arc in used:
                arc = f"{_safe_part(names[img.class_id])}/{_safe_part(stem)}_{img.id}.{ext}"
            used.add(arc)
            z.write(img.path, arc)
    return path


def usage_snippet(method: Method) -> str:
    """Python that loads and uses an exported model (the export's USAGE.md, and the Export tab)."""
    return (
        "# pip install -r requirements.txt  (Few-Shot Studio)\n"
        "from fewshot_studio.methods import load_model\n"
        "from fewshot_studio.features import FeatureExtractor\n"
        "from fewshot_studio.data import ImageRef\n\n"
        "model = load_model(\"model\")  # the unzipped folder; loads its backbone "
        f"({method.backbone.spec.label.split(' (')[0]})\n"
        "extractor = FeatureExtractor(model.backbone)\n"
        "probs = model.predict_proba([ImageRef.from_path(\"photo.jpg\")], extractor)[0]\n"
        "print(dict(zip(model.classnames, probs.tolist())))\n"
        f"# classes: {', '.join(method.classnames)}; method: {method.label}\n"
    )


def export_model(scope: ProjectScope, model_id: int | None = None) -> Path:
    """The trained model directory (config.json + model.safetensors + USAGE.md) as a zip."""
    info, method = model(scope, model_id)
    path = export_path(scope, f"model-{info.id}-{info.method}.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(info.path / CONFIG_FILE, f"model/{CONFIG_FILE}")
        z.write(info.path / WEIGHTS_FILE, f"model/{WEIGHTS_FILE}")
        z.writestr("model/USAGE.md", "```python\n" + usage_snippet(method) + "```\n")
    return path


def import_model(scope: ProjectScope, source: str | os.PathLike | bytes) -> ModelInfo:
    """Import a model zip (safetensors + config.json only; never unpickles). Its config.json must
    pass `check_model_config` (the catalog's rule for its hyper-parameters) before its backbone
    loads; its backbone must load and its classes must be this project's classes. A refused zip
    leaves the project (and its current model) as it was."""
    members, errors = imageio.read_zip(source)
    if errors:
        first = str(errors[0]).rstrip(".")
        raise ModelFileError(f"The model zip has an unsafe or unreadable entry ({first}); nothing was imported.")
    files = {m.path[-1]: m.data for m in members if m.path[-1] in (CONFIG_FILE, WEIGHTS_FILE)}
    if set(files) != {CONFIG_FILE, WEIGHTS_FILE}:
        raise ModelFileError("The zip must contain a model folder with config.json and model.safetensors.")
    store = scope.store
    staging = Path(tempfile.mkdtemp(prefix="import-", dir=store.staging_dir()))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        cfg = read_model_config(staging)
        check_model_config(cfg)  # the catalog's rule, before a backbone loads or anything is built
        method = load_model(staging, backbone=scope.ws.backbone(scope.ws.saved_spec(cfg)))
        ours = [c.name for c in store.list_classes(scope.id)]
        if sorted(method.classnames) != sorted(ours):
            raise ModelFileError(f"The model's classes ({', '.join(method.classnames)}) differ from this "
                                 f"project's classes ({', '.join(ours) or 'none'}).")
        info = store.register_model(scope.id, method.name, method.backbone.id, cfg,
                                    cfg.get("metrics") or {}, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
