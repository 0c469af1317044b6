"""Exports and imports: label records, labels as CSV or JSON, the labeled set as an ImageFolder
zip, a trained model as a zip (config.json + model.safetensors + USAGE.md), and importing one."""
from __future__ import annotations

import csv
import errno
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable

from .. import imageio
from ..errors import DataError, ModelFileError
from ..methods import Method, load_model
from ..methods.base import CONFIG_FILE, WEIGHTS_FILE, check_model_config, read_model_config
from ..store import ModelInfo
from .context import ProjectScope
from .modeling import model

EXPORT_TTL = 600.0  # seconds an export stays on disk for downloading (Gradio serves its own copy)
LABEL_FIELDS = ["image_id", "file", "sha256", "label", "labeled_by", "unlike_every_class"]
PARTIAL = ".partial"  # an export being written; renamed to its name only when complete


def _visitor_tag(scope: ProjectScope) -> str:
    """Names a visitor's exports of a project without revealing its owner token (served paths
    are seen by the browser): an HMAC under the installation's secret."""
    secret = scope.ws.browser_secret().encode()
    return hmac.new(secret, b"export:" + (scope.owner or "").encode(), hashlib.sha256).hexdigest()[:16]


def sweep_exports(exports: Path, now: float | None = None, keep: Path | None = None) -> int:
    """Remove every export folder older than EXPORT_TTL (any project's); returns how many."""
    now = time.time() if now is None else now
    n = 0
    for old in exports.glob("*-*"):
        try:
            if old != keep and now - old.stat().st_mtime > EXPORT_TTL:
                shutil.rmtree(old)
                n += 1
        except OSError:
            pass
    return n


def export_path(scope: ProjectScope, filename: str) -> Path:
    """A fresh, unguessable folder per export (exports are served for download, so another
    session must not be able to guess a path), named exports/<project>-<visitor tag>-<random>/
    filename. Every export older than EXPORT_TTL is removed first; `write_export` removes this
    visitor's previous export of the project once the new one is complete."""
    exports = scope.ws.exports_dir
    exports.mkdir(parents=True, exist_ok=True)
    sweep_exports(exports)
    d = exports / f"{scope.id}-{_visitor_tag(scope)}-{secrets.token_urlsafe(12)}"
    d.mkdir(parents=True)
    return d / filename


def write_export(scope: ProjectScope, filename: str, what: str, write: Callable[[Path], None]) -> Path:
    """Write one export: `write(path)` fills a temporary file, renamed to `filename` when it is
    complete, so a full disk never leaves a truncated zip or an empty CSV to download (the
    partial file goes, and one sentence says why). The visitor's previous export of the
    project is removed: each keeps at most one."""
    path = export_path(scope, filename)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(path.parent, ignore_errors=True)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise DataError(f"The server's disk is full, so {what} could not be exported; nothing was kept. "
                            "Try again later.") from None
        raise DataError(f"{what[0].upper()}{what[1:]} could not be exported ({e.strerror or type(e).__name__}); "
                        "nothing was kept.") from None
    for old in scope.ws.exports_dir.glob(f"{scope.id}-{_visitor_tag(scope)}-*"):
        if old != path.parent:
            shutil.rmtree(old, ignore_errors=True)
    return path


def label_records(scope: ProjectScope) -> list[dict]:
    """One record per image: id, file name, content hash, label (None: the pool), who labeled it,
    and whether the last inspection (app.insight) found the pool image unlike every class
    ("none of these classes?"; None for examples, or when the project was not inspected)."""
    from .insight import latest

    store = scope.store
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    inspected = latest(scope)
    odd = set() if inspected is None else inspected.outlier_ids()
    return [{"image_id": i.id, "file": i.original_name, "sha256": i.hash,
             "label": names.get(i.class_id) if i.class_id is not None else None,
             "labeled_by": i.labeled_by,
             "unlike_every_class": None if inspected is None or i.class_id is not None else i.id in odd}
            for i in store.list_images(scope.id)]


#: A CSV cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A CSV cell that a spreadsheet shows as text, never runs: text starting with =, +, -, @, a
    tab or a carriage return gets a leading single quote (OWASP's advice against CSV injection);
    numbers and empty cells are kept as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def export_labels_csv(scope: ProjectScope) -> Path:
    """labels.csv: one row per image (LABEL_FIELDS); text cells are escaped by `csv_cell`, so a
    class or file name that starts with = + - @ gains a leading ' (labels.json keeps them exact)."""
    rows = label_records(scope)

    def write(path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=LABEL_FIELDS)
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)

    return write_export(scope, "labels.csv", "the labels", write)


def export_labels_json(scope: ProjectScope) -> Path:
    classes = [{"name": c.name, "description": c.description} for c in scope.store.list_classes(scope.id)]
    text = json.dumps({"project": scope.project.name, "classes": classes, "images": label_records(scope)},
                      indent=1, ensure_ascii=False)
    return write_export(scope, "labels.json", "the labels", lambda path: path.write_text(text, encoding="utf-8"))


# ---- safe file names -------------------------------------------------------------------------
#: Longest folder or file name part an export writes, in characters and in UTF-8 bytes of the
#: decomposed form (macOS stores NFD; Linux allows 255 bytes, Windows 255 UTF-16 units), leaving
#: room for a " (12)" suffix and an extension.
MAX_PART_CHARS = 100
MAX_PART_BYTES = 200
_UNSAFE = frozenset('<>:"/\\|?*')
#: Names Windows reserves for devices, with or without an extension (CON, CON.txt...).
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{d}{i}" for d in ("COM", "LPT") for i in [*"0123456789", "¹", "²", "³"]])
MANIFEST = "manifest.json"


def _fits(text: str, extra: int = 0) -> bool:
    return (len(text) + extra <= MAX_PART_CHARS
            and len(unicodedata.normalize("NFD", text).encode("utf-8")) + extra <= MAX_PART_BYTES)


def _trim(text: str, extra: int = 0) -> str:
    """`text` shortened (whole characters) so that it and `extra` more ASCII characters fit."""
    while text and not _fits(text, extra):
        text = text[:-1]
    return text.rstrip(" .")


def safe_name(name: str, fallback: str = "_") -> str:
    """One folder or file name valid on Windows, macOS and Linux: NFC; path separators,
    Windows-reserved characters (< > : " / \\ | ? *) and control characters become "_"; no
    leading or trailing dots or spaces (no hidden files, nothing Windows drops); device names
    (CON, nul.txt, COM1...) get a leading "_"; at most MAX_PART_CHARS characters and
    MAX_PART_BYTES bytes. Different names can map to the same safe name: see `unique_name`."""
    text = unicodedata.normalize("NFC", str(name))
    text = "".join("_" if ch in _UNSAFE or unicodedata.category(ch) == "Cc" else ch for ch in text)
    text = _trim(text.strip(" ."))
    if not text:
        return fallback
    if text.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        text = _trim("_" + text)
    return text or fallback


def _fold(name: str) -> str:
    """Names that one file system may treat as the same (Windows and macOS ignore case)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKC", name).casefold())


def unique_name(base: str, used: set[str], ext: str = "") -> str:
    """`base` + `ext`, or the first free `base (2)` + `ext`, `base (3)` + `ext`... (the base
    shortened to stay within the length bound), compared ignoring case; added to `used`."""
    name, k = base + ext, 2
    while _fold(name) in used:
        suffix = f" ({k}){ext}"
        name = (_trim(base, len(suffix.encode("utf-8"))) or "_") + suffix
        k += 1
    used.add(_fold(name))
    return name


def class_folders(names: list[str]) -> dict[str, str]:
    """A distinct safe folder per class name, deterministic: names that are already safe keep
    themselves (class names are unique ignoring case), the others take their `safe_name`, or
    `safe_name (2)`, `(3)`... in class order when that is taken."""
    folders: dict[str, str] = {}
    used: set[str] = set()
    for n in names:
        if safe_name(n) == n and _fold(n) not in used:
            folders[n] = n
            used.add(_fold(n))
    for n in names:
        if n not in folders:
            folders[n] = unique_name(safe_name(n), used)
    return folders


@dataclass(frozen=True)
class FolderExport:
    """An ImageFolder zip: where it is, its manifest rows (folder, class, images) in class
    order, and how many class names had to change to be safe, distinct folder names."""
    path: Path
    folders: list[dict]
    renamed: int


def export_imagefolder(scope: ProjectScope) -> FolderExport:
    """A zip of the labeled set as class_name/file folders (torchvision's ImageFolder layout)
    plus manifest.json at its root: {"project", "classes": [{"folder", "class", "images"}]}, the
    folder of every class with images. Folder and file names are safe on every system and
    distinct ignoring case (class_folders, unique_name), so no two classes or images merge."""
    store = scope.store
    classes = store.list_classes(scope.id)
    by_class: dict[int, list] = {c.id: [] for c in classes}
    for img in store.list_images(scope.id):
        if img.class_id is not None:
            by_class[img.class_id].append(img)
    exported = [c for c in classes if by_class[c.id]]
    folders = class_folders([c.name for c in exported])
    rows = [{"folder": folders[c.name], "class": c.name, "images": len(by_class[c.id])} for c in exported]
    missing = [img for c in exported for img in by_class[c.id] if not img.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} labeled image file{'s are' if len(missing) != 1 else ' is'} missing from "
                        f"the server (the first: #{missing[0].id} {missing[0].original_name}); remove "
                        f"{'them' if len(missing) != 1 else 'it'} from the project, then export again.")

    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for c in exported:
                used: set[str] = set()
                for img in by_class[c.id]:
                    fmt = imageio.probe_image(img.path.read_bytes(), img.original_name)[0].lower()
                    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
                    stem = safe_name(PurePath(img.original_name.replace("\\", "/")).stem, f"image_{img.id}")
                    z.write(img.path, f"{folders[c.name]}/{unique_name(stem, used, '.' + ext)}")
            z.writestr(MANIFEST, json.dumps({"project": scope.project.name, "classes": rows},
                                            indent=1, ensure_ascii=False) + "\n")

    path = write_export(scope, "imagefolder.zip", "the labeled set", write)
    return FolderExport(path, rows, sum(r["folder"] != r["class"] for r in rows))


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


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or line (a class name may hold | or newlines)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def model_card(info: ModelInfo, method: Method) -> str:
    """The README.md of an exported model (a model card, after Mitchell et al., "Model Cards for
    Model Reporting", FAT* 2019, cut to what is known here): classes and example counts, backbone,
    method and hyper-parameters, cross-validated accuracy when measured, training date, intended
    use and limits, and how to load it (this project, or ONNX with export-onnx)."""
    cfg = info.config or {}
    counts = cfg.get("support_counts") or method.support_counts or [None] * method.num_classes
    rows = "".join(f"| {_md(c)} | {'?' if n is None else n} |\n" for c, n in zip(method.classnames, counts))
    hp = cfg.get("hyperparameters") or {}
    hps = "".join(f"  - `{k}`: {json.dumps(v, ensure_ascii=False)}\n" for k, v in hp.items()) or "  - (none)\n"
    metrics = {**(cfg.get("metrics") or {}), **(info.metrics or {})}
    cv = metrics.get("cv") or {}
    auto = metrics.get("auto") or {}
    auto_acc = (auto.get("cv_accuracy") or {}).get(method.name) if isinstance(auto, dict) else None
    if isinstance(cv, dict) and isinstance(cv.get("accuracy"), (int, float)):
        acc = f"{100 * cv['accuracy']:.1f}% ({cv.get('folds', '?')}-fold cross-validation on the labeled images)"
    elif isinstance(metrics.get("cv_accuracy"), (int, float)):  # GDA's own search of α
        acc = (f"{100 * metrics['cv_accuracy']:.1f}% (the method's own {metrics.get('folds', '?')}-fold "
               "search of its settings on the labeled images)")
    elif isinstance(auto_acc, (int, float)):
        acc = f"{100 * auto_acc:.1f}% (Auto's cross-validation on {auto.get('folds', '?')}, when it chose this method)"
    else:
        acc = "not measured for this model (the Evaluate tab cross-validates methods on the labeled images)"
    bb = method.backbone
    total = sum(n for n in counts if n is not None)
    return (
        f"# {_md(method.label)} classifier: {method.num_classes} classes\n\n"
        f"Exported by Few-Shot Studio from model #{info.id}; trained {cfg.get('created', '?')} (UTC).\n\n"
        f"## Classes and examples\n\n| class | labeled examples |\n|---|---|\n{rows}\n"
        f"{total} labeled images in all.\n\n"
        f"## Model\n\n- Backbone: {_md(bb.spec.label)} (`{_md(bb.id)}`), frozen; input {bb.image_size}×{bb.image_size} RGB.\n"
        f"- Method: {_md(method.label)} (`{method.name}`): {_md(method.summary)}\n"
        f"- Hyper-parameters:\n{hps}"
        f"- Cross-validated accuracy: {acc}.\n\n"
        "## Intended use and limits\n\n"
        "Sorting images into exactly these classes, as the person who labeled them meant them. It was fitted on "
        f"a few examples per class ({total} in all), so its accuracy on new images may be well below what "
        "the examples suggest, and it has no 'none of these' answer: every image gets one of the classes. It "
        "inherits the backbone's knowledge and blind spots (CLIP models learned from web photos and captions; the "
        "offline `tiny` backbone knows only synthetic coloured shapes). Check it on images from where it will be "
        "used before relying on it, and do not use it for decisions about people.\n\n"
        "## How to load it\n\nWith Few-Shot Studio (Python):\n\n```python\n" + usage_snippet(method) + "```\n\n"
        "Or from the command line: `python -m fewshot_studio predict --model model photo.jpg`.\n\n"
        "As ONNX, to run where only onnxruntime is installed:\n\n```\n"
        "python -m fewshot_studio export-onnx --model model --out model.onnx\n"
        "python fewshot_studio/onnx_predict.py model.onnx photo.jpg   # numpy + Pillow + onnxruntime, no torch\n"
        "```\n\nThe graph's input is `pixels`, float32 (N, 3, H, W), the image preprocessed as the "
        "backbone's plain view; its output `probs` (N, C); the class names and preprocessing are in its metadata.\n")


def export_model(scope: ProjectScope, model_id: int | None = None) -> Path:
    """The trained model directory (config.json + model.safetensors + USAGE.md + README.md, the
    model card) as a zip."""
    info, method = model(scope, model_id)

    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(info.path / CONFIG_FILE, f"model/{CONFIG_FILE}")
            z.write(info.path / WEIGHTS_FILE, f"model/{WEIGHTS_FILE}")
            z.writestr("model/USAGE.md", "```python\n" + usage_snippet(method) + "```\n")
            z.writestr("model/README.md", model_card(info, method))

    return write_export(scope, f"model-{info.id}-{info.method}.zip", "the model", write)


def export_onnx(scope: ProjectScope, model_id: int | None = None, progress=None) -> Path:
    """The model as one ONNX graph, pixels -> class probabilities (onnx_export.export_onnx):
    seconds to a minute of tracing, so the app runs it as a job (`start_onnx_export`)."""
    from ..onnx_export import export_onnx as write_onnx, require_onnx
    from ..progress import Progress

    require_onnx()
    info, method = model(scope, model_id)
    if progress:
        progress(Progress("Exporting the model as ONNX", 0, 1))
    path = write_export(scope, f"model-{info.id}-{info.method}.onnx", "the ONNX model",
                        lambda tmp: write_onnx(method, tmp))
    if progress:
        progress(Progress("Exporting the model as ONNX", 1, 1))
    return path


def start_onnx_export(scope: ProjectScope, model_id: int | None = None) -> str:
    """`export_onnx` as a job of the one runner (its result: the file's path); a missing model
    or missing onnx packages fail here, in the request."""
    from ..jobs import EXPORT
    from ..onnx_export import require_onnx
    from .modeling import check_job_limit

    require_onnx()
    info, method = model(scope, model_id)
    check_job_limit(scope)
    return scope.ws.runner.submit(EXPORT, lambda job: export_onnx(scope, info.id, job.report), scope.id,
                                  owner=scope.owner)


def import_model(scope: ProjectScope, source: str | os.PathLike | bytes) -> ModelInfo:
    """Import a model zip (safetensors + config.json only; never unpickles). Its config.json must
    pass `check_model_config` (the catalog's rule for its hyper-parameters) before its backbone
    loads; its backbone must load and its classes must be this project's classes. A refused zip
    leaves the project (and its current model) as it was."""
    store = scope.store
    # locked while in use, so a killed import's folder is cleaned at start; the model is built in a
    # subfolder, which register_model renames into models/ (the lock file stays behind)
    with store.staging_folder("import") as folder:
        staging = folder / "model"
        staging.mkdir()
        found: set[str] = set()
        with imageio.ZipReader(source) as z:  # one entry in memory at a time
            for m in z:
                if isinstance(m, imageio.ImageError):
                    first = str(m).rstrip(".")
                    raise ModelFileError(f"The model zip has an unsafe or unreadable entry ({first}); "
                                         "nothing was imported.")
                if m.path[-1] in (CONFIG_FILE, WEIGHTS_FILE):
                    (staging / m.path[-1]).write_bytes(m.data)
                    found.add(m.path[-1])
                del m
        if found != {CONFIG_FILE, WEIGHTS_FILE}:
            raise ModelFileError("The zip must contain a model folder with config.json and model.safetensors.")
        cfg = read_model_config(staging)
        check_model_config(cfg)  # the catalog's rule, before a backbone loads or anything is built
        method = load_model(staging, backbone=scope.ws.backbone(scope.ws.saved_spec(cfg)))
        ours = [c.name for c in store.list_classes(scope.id)]
        if sorted(method.classnames) != sorted(ours):
            raise ModelFileError(f"The model's classes ({', '.join(method.classnames)}) differ from this "
                                 f"project's classes ({', '.join(ours) or 'none'}).")
        info = store.register_model(scope.id, method.name, method.backbone.id, cfg,
                                    cfg.get("metrics") or {}, staging)
    return info


# ---- formats other tools load ------------------------------------------------------------------
def _labeled_set(scope: ProjectScope) -> tuple[list, list]:
    """(classes in order, [(image, class)] of every labeled image), refusing (one sentence) when a
    labeled image's file is missing from the server."""
    store = scope.store
    classes = store.list_classes(scope.id)
    by_id = {c.id: c for c in classes}
    pairs = [(img, by_id[img.class_id]) for img in store.list_images(scope.id) if img.class_id in by_id]
    missing = [img for img, _ in pairs if not img.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} labeled image file{'s are' if len(missing) != 1 else ' is'} missing from "
                        f"the server (the first: #{missing[0].id} {missing[0].original_name}); remove "
                        f"{'them' if len(missing) != 1 else 'it'} from the project, then export again.")
    return classes, pairs


def _file_name(img, used: set[str]) -> str:
    """A safe file name for the image, unique (ignoring case) among `used`, its extension from
    its content."""
    fmt = imageio.probe_image(img.path.read_bytes(), img.original_name)[0].lower()
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
    stem = safe_name(PurePath(img.original_name.replace("\\", "/")).stem, f"image_{img.id}")
    return unique_name(stem, used, "." + ext)


def export_hf_imagefolder(scope: ProjectScope) -> Path:
    """The labeled set as a Hugging Face `imagefolder` dataset, zipped: images/<file> plus
    metadata.jsonl at the root, one JSON line per image {"file_name": "images/<file>", "label":
    <class name, exact>, "sha256", "labeled_by"} (the layout of
    https://huggingface.co/docs/datasets/image_dataset#imagefolder: `file_name` links a row to
    its image, the other keys become columns). Class names stay exact in the metadata, so
    no folder name has to carry them. Load with
    datasets.load_dataset("imagefolder", data_dir=<unzipped folder>)."""
    _, pairs = _labeled_set(scope)

    def write(path: Path) -> None:
        used: set[str] = set()
        lines = []
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for img, c in pairs:
                name = f"images/{_file_name(img, used)}"
                z.write(img.path, name)
                lines.append(json.dumps({"file_name": name, "label": c.name, "sha256": img.hash,
                                         "labeled_by": img.labeled_by}, ensure_ascii=False))
            z.writestr("metadata.jsonl", "".join(line + "\n" for line in lines))

    return write_export(scope, "hf-imagefolder.zip", "the labeled set", write)


def export_fiftyone(scope: ProjectScope) -> Path:
    """The labeled set in FiftyOne's image classification layout
    (`fiftyone.types.FiftyOneImageClassificationDataset`), zipped: data/<file> and labels.json
    {"classes": [class names], "labels": {<file name without extension>: <index into classes>}}
    (https://docs.voxel51.com/user_guide/export_datasets.html#fiftyoneimageclassificationdataset).
    File stems are unique across the whole set, as the labels are keyed by them."""
    classes, pairs = _labeled_set(scope)
    index = {c.id: i for i, c in enumerate(classes)}

    def write(path: Path) -> None:
        used: set[str] = set()
        labels: dict[str, int] = {}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for img, c in pairs:
                name = _file_name(img, used)
                z.write(img.path, f"data/{name}")
                labels[PurePath(name).stem] = index[c.id]
            z.writestr("labels.json", json.dumps({"classes": [c.name for c in classes], "labels": labels},
                                                 indent=1, ensure_ascii=False) + "\n")

    return write_export(scope, "fiftyone-classification.zip", "the labeled set", write)


LS_FROM, LS_TO = "label", "image"  # the <Choices> and <Image> names of the labeling config
LS_PREFIX = "/data/local-files/?d="  # Label Studio's local-files URL (its local storage serves them)


def label_studio_config(classes: list[str]) -> str:
    """Label Studio's labeling config for single-choice image classification
    (https://labelstud.io/templates/image_classification): an <Image> and one <Choice> per class."""
    from xml.sax.saxutils import quoteattr

    choices = "".join(f"    <Choice value={quoteattr(c)}/>\n" for c in classes)
    return (f'<View>\n  <Image name="{LS_TO}" value="$image"/>\n'
            f'  <Choices name="{LS_FROM}" toName="{LS_TO}" choice="single" showInLine="true">\n'
            f"{choices}  </Choices>\n</View>\n")


def _ls_choice(label: str) -> dict:
    return {"from_name": LS_FROM, "to_name": LS_TO, "type": "choices", "value": {"choices": [label]}}


def export_label_studio(scope: ProjectScope) -> Path:
    """Every image as a Label Studio task, zipped: tasks.json, labeling_config.xml and images/.
    Each task is {"data": {"image": LS_PREFIX + "images/<file>", "fewshot_image_id", "sha256"},
    "annotations": [the label] (labeled images), "predictions": [the current model's label,
    "score": its probability] (images it predicted)} in Label Studio's task format
    (https://labelstud.io/guide/task_format, https://labelstud.io/guide/predictions): the team
    reviews the pre-annotations in Label Studio. Serving: Label Studio's local storage with
    LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and the unzipped folder as
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    from .modeling import current_model_info

    store = scope.store
    classes = store.list_classes(scope.id)
    names = {c.id: c.name for c in classes}
    images = [img for img in store.list_images(scope.id) if img.path.is_file()]
    info = current_model_info(scope)
    preds = {p.image_id: p for p in store.list_predictions(info.id)} if info is not None else {}
    version = f"fewshot-studio model #{info.id} ({info.method})" if info is not None else None

    def write(path: Path) -> None:
        used: set[str] = set()
        tasks = []
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for img in images:
                name = f"images/{_file_name(img, used)}"
                z.write(img.path, name)
                task: dict = {"data": {"image": LS_PREFIX + name, "fewshot_image_id": img.id, "sha256": img.hash}}
                if img.class_id in names:
                    task["annotations"] = [{"result": [_ls_choice(names[img.class_id])], "was_cancelled": False}]
                p = preds.get(img.id)
                if p is not None and p.label in names:
                    task["predictions"] = [{"model_version": version, "score": round(float(p.confidence), 6),
                                            "result": [_ls_choice(names[p.label])]}]
                tasks.append(task)
            z.writestr("tasks.json", json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
            z.writestr("labeling_config.xml", label_studio_config([c.name for c in classes]))

    return write_export(scope, "label-studio.zip", "the tasks", write)


MAX_LS_BYTES = 64 * 2**20  # a Label Studio export of 100,000 classified tasks is ~50 MB


@dataclass(frozen=True)
class LabelImport:
    """What importing a Label Studio export did: images labeled (or relabeled), already so,
    tasks without a label, and tasks whose image matched no image of the project."""
    labeled: int
    unchanged: int
    unlabeled: int
    unmatched: int


def _ls_label(task: dict) -> str | None:
    """The class a task's newest kept annotation chose (a `choices` result), or None."""
    for ann in reversed(task.get("annotations") or []):
        if not isinstance(ann, dict) or ann.get("was_cancelled"):
            continue
        for r in ann.get("result") or []:
            choices = r.get("value", {}).get("choices") if isinstance(r, dict) and isinstance(r.get("value"), dict) else None
            if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], str):
                return choices[0]
    return None


def _ls_file_name(url: str) -> str:
    """The file name a task's image URL points at: the `d` query of a local-files URL or the URL
    path's last part, percent-decoded; Label Studio's upload prefix (8 hex digits and "-") dropped."""
    import re
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    path = parse_qs(parts.query).get("d", [parts.path])[0] if parts.query else unquote(parts.path)
    name = PurePath(path.replace("\\", "/")).name
    return re.sub(r"^[0-9a-f]{8}-", "", name)


def import_label_studio(scope: ProjectScope, source: str | os.PathLike | bytes) -> LabelImport:
    """Label the project's images from a Label Studio JSON export of a classification project
    (a list of tasks, each with "data" and "annotations", as `export_label_studio` writes and
    Label Studio exports). A task's image is this project's image with the same content hash
    (data.sha256, present in tasks this project exported) or else the same file name; its label
    is its newest annotation that was not cancelled. Every label must be a class of the project.
    One undoable action; anything invalid is refused with one sentence and changes nothing."""
    from .modeling import log_labels

    raw = Path(source).read_bytes() if not isinstance(source, (bytes, bytearray)) else bytes(source)
    if len(raw) > MAX_LS_BYTES:
        raise DataError(f"The Label Studio export is larger than {MAX_LS_BYTES // 2**20} MB; export fewer tasks.")
    try:
        tasks = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DataError("The file is not a Label Studio JSON export (it is not valid JSON).") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise DataError("The file is not a Label Studio JSON export: it must be a list of tasks, each with a "
                        "\"data\" object.")
    store = scope.store
    classes = {c.name: c.id for c in store.list_classes(scope.id)}
    images = store.list_images(scope.id)
    by_hash = {img.hash: img for img in images}
    by_name: dict[str, list] = {}
    for img in images:
        by_name.setdefault(PurePath(img.original_name.replace("\\", "/")).name, []).append(img)
    moves, unchanged, unlabeled, unmatched, unknown = {}, 0, 0, 0, []
    for task in tasks:
        label = _ls_label(task)
        if label is None:
            unlabeled += 1
            continue
        data = task["data"]
        img = by_hash.get(data.get("sha256")) if isinstance(data.get("sha256"), str) else None
        if img is None:
            url = data.get("image") if isinstance(data.get("image"), str) else next(
                (v for v in data.values() if isinstance(v, str)), "")
            found = by_name.get(_ls_file_name(url), [])
            img = found[0] if len(found) == 1 else None
        if img is None:
            unmatched += 1
            continue
        if label not in classes:
            unknown.append(label)
            continue
        if img.class_id == classes[label]:
            unchanged += 1
            moves.pop(img.id, None)
        else:
            moves[img.id] = (img.id, classes[label], "user")
    if unknown:
        shown = ", ".join(repr(u) for u in list(dict.fromkeys(unknown))[:3])
        raise DataError(f"The export labels {len(unknown)} image{'s' if len(unknown) != 1 else ''} with classes this "
                        f"project does not have ({shown}); add those classes first, then import again.")
    if moves:
        log_labels(scope, list(moves.values()), "correct")
    return LabelImport(len(moves), unchanged, unlabeled, unmatched)
