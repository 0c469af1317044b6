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


def export_model(scope: ProjectScope, model_id: int | None = None) -> Path:
    """The trained model directory (config.json + model.safetensors + USAGE.md) as a zip."""
    info, method = model(scope, model_id)

    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(info.path / CONFIG_FILE, f"model/{CONFIG_FILE}")
            z.write(info.path / WEIGHTS_FILE, f"model/{WEIGHTS_FILE}")
            z.writestr("model/USAGE.md", "```python\n" + usage_snippet(method) + "```\n")

    return write_export(scope, f"model-{info.id}-{info.method}.zip", "the model", write)


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
