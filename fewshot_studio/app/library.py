"""Classes and images of a project: add, rename, describe and delete classes; upload files and
zips; find and remove images; counts; thumbnails."""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import imageio
from ..errors import Cancelled, DataError, FewShotError
from ..jobs import ENCODE
from ..progress import Progress
from ..store import (POOL_NAME, ClassInfo, ImageImport, ImageInfo, NotFoundError, check_class_name,
                     is_reserved_class_name)
from .context import ProjectScope, Workspace

THUMB_SIZE = 160
MAX_UPLOAD_FILES = 1000  # loose files per upload; zips have their own limits (imageio.MAX_ZIP_*)
POOL = POOL_NAME  # the pseudo-class naming the unlabeled pool in pickers; the store refuses it as a class name


# ---- classes ---------------------------------------------------------------------------------
def add_class(scope: ProjectScope, name: str, description: str = "") -> ClassInfo:
    return scope.store.add_class(scope.id, name, description or "")


def get_class(scope: ProjectScope, class_id: int) -> ClassInfo:
    """One class of the project (one sentence if it is another project's)."""
    c = scope.store.get_class(int(class_id))
    if c.project_id != scope.id:
        raise NotFoundError(f"There is no class with id {class_id} in this project.")
    return c


def classes(scope: ProjectScope) -> list[ClassInfo]:
    return scope.store.list_classes(scope.id)


def class_counts(scope: ProjectScope) -> dict[int | None, int]:
    """Images per class id (None: the unlabeled pool)."""
    return scope.store.class_counts(scope.id)


def class_by_name(scope: ProjectScope, name: str) -> ClassInfo:
    for c in classes(scope):
        if c.name == name:
            return c
    raise NotFoundError(f"There is no class called {name!r} in this project.")


def class_id_for(scope: ProjectScope, name: str | None) -> int | None:
    """A class's id from its name; None (the unlabeled pool) for an empty name or POOL."""
    if name in (None, "", POOL):
        return None
    return class_by_name(scope, name).id


def rename_class(scope: ProjectScope, class_id: int, name: str) -> ClassInfo:
    get_class(scope, class_id)
    return scope.store.rename_class(int(class_id), name)


def set_description(scope: ProjectScope, class_id: int, description: str) -> ClassInfo:
    get_class(scope, class_id)
    return scope.store.set_class_description(int(class_id), description or "")


def delete_class(scope: ProjectScope, class_id: int) -> int:
    """Delete a class; its images move to the unlabeled pool (nothing is lost)."""
    get_class(scope, class_id)
    return scope.store.delete_class(int(class_id), delete_images=False)


def class_rows(scope: ProjectScope) -> list[list]:
    """[class, description, images] per class, then the unlabeled pool."""
    counts = class_counts(scope)
    rows = [[c.name, c.description, counts.get(c.id, 0)] for c in classes(scope)]
    return rows + [[POOL, "", counts.get(None, 0)]]


# ---- images -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UploadResult:
    """What an upload stored: `added` new images, `duplicates` uploads whose bytes were
    already there with that label (or repeated in the upload: stored once), and one
    sentence per refused file or folder."""

    added: int
    duplicates: int
    errors: list[str]
    image_ids: tuple[int, ...] = ()  # the images the upload names (new ones and duplicates), in order
    encode_job: str | None = None  # the background encoding that will cover them (prepare_features)


def add_images(scope: ProjectScope, files: Iterable[str | os.PathLike | tuple[str, bytes]],
               class_id: int | None = None) -> tuple[list[ImageInfo], list[str]]:
    """Upload files into a class (or the pool when class_id is None); bad files are reported."""
    if class_id is not None:
        get_class(scope, class_id)
    items = _loose_items(files)
    added, errors = scope.store.add_images(scope.id, items, class_id=class_id,
                                           labeled_by="user" if class_id is not None else None)
    if added:
        prepare_features(scope)
    return added, errors


def _loose_items(files) -> list[tuple[str, object]]:
    items = []
    for f in files or []:
        if isinstance(f, tuple):
            items.append(f)
        else:
            items.append((Path(f).name, Path(f)))
    if not items:
        raise DataError("Choose at least one image to upload.")
    if len(items) > MAX_UPLOAD_FILES:
        raise DataError(f"That is {len(items)} files at once; upload at most {MAX_UPLOAD_FILES} per batch "
                        "(or a zip).")
    return items


def add_zip(scope: ProjectScope, source: str | os.PathLike | bytes, pool: bool = False,
            class_id: int | None = None) -> UploadResult:
    """A zip of `class_name/image` folders: classes are created as needed. Files at the top
    level (or everything, with pool=True) go to the unlabeled pool; with `class_id`, every
    image joins that class whatever its folder. All or nothing (see `add_uploads`)."""
    if class_id is not None:
        get_class(scope, class_id)
    with scope.store.begin_import(scope.id) as batch:
        errors = _stage_zip(batch, source, pool, class_id)
        result = _commit(batch, errors)
    if result.added:
        result = replace(result, encode_job=prepare_features(scope))
    return result


def _stage_zip(batch: ImageImport, source, pool: bool, class_id: int | None) -> list[str]:
    """Stage a zip's images one entry at a time (only one entry is ever in memory: the
    archive is read with imageio.ZipReader and each image is written to the staging folder
    before the next is read). Returns one sentence per refused entry or class folder."""
    archive = Path(source).name if isinstance(source, (str, os.PathLike)) else "archive.zip"
    errors: list[str] = []
    folders: dict[str, str | None] = {}  # folder -> class name to use, or None if refused
    skipped: dict[str, int] = {}  # refused folder -> files in it
    refusal: dict[str, Callable[[str], str]] = {}
    with imageio.ZipReader(source) as z:
        for m in z:
            if isinstance(m, imageio.ImageError):
                errors.append(str(m))
                continue
            path, data = m.path, m.data
            del m  # so that only `data` holds the entry, dropped before the next one is read
            target: int | str | None = class_id
            if class_id is None and not pool and len(path) >= 2:
                folder = path[0]
                if folder not in folders:
                    folders[folder] = _folder_class(folder, archive, refusal)
                target = folders[folder]
                if target is None:
                    skipped[folder] = skipped.get(folder, 0) + 1
                    del data
                    continue
            error = batch.add("/".join(path), data, target, labeled_by="user" if target is not None else None)
            del data
            if error:
                errors.append(error)
    for folder, n in skipped.items():
        errors.append(refusal[folder](f"so its {n} file{'s were' if n != 1 else ' was'} skipped"))
    return errors


def _folder_class(folder: str, archive: str, refusal: dict[str, Callable[[str], str]]) -> str | None:
    """The class a zip folder's images join (made at commit if new), or None with the
    folder's refusal sentence (given the "so its N files were skipped" clause) in `refusal`."""
    if is_reserved_class_name(folder):  # never into a legacy class of that name
        refusal[folder] = lambda skipped: (f"{folder}/ (in {archive}): the folder name {folder!r} is reserved for "
                                           f"the unlabeled pool, {skipped}; rename the folder.")
        return None
    try:
        return check_class_name(folder)
    except FewShotError as e:
        reason = str(e).rstrip(".")
        refusal[folder] = lambda skipped: f"{folder}/ (in {archive}): {reason}, {skipped}."
        return None


def _commit(batch: ImageImport, errors: list[str]) -> UploadResult:
    if not batch.staged:
        return UploadResult(0, 0, errors)
    result = batch.commit()
    return UploadResult(result.added, result.duplicates, errors, tuple(i.id for i in result.images))


#: Images per step of the background encoding (prepare_features): progress is reported (and
#: the job yields) between steps. Within a step the encoder stops at its next chunk (8 images
#: at most here, features.RAMP_START) once another job is queued, so a training that starts
#: shares the CPU with at most one chunk: about 1 s of ViT-B-32 on 2 CPU cores.
PREPARE_STEP = 16


def prepare_features(scope: ProjectScope) -> str | None:
    """Encode the plain view of every image of the project not yet in the feature cache, as a
    background job (JobRunner.submit_background: lowest priority, it yields to every other
    job), so that pressing Train finds the features waiting (issue #14, item 6a). The backbone
    is the current model's, else the workspace's default. Called by every upload use case; a
    job already waiting for this project covers the new images too (it lists them when it
    starts), so none is added then. Returns the id of the job that will encode them."""
    ws = scope.ws
    waiting = [j for j in ws.runner.jobs(scope.id, background=True)
               if j.kind == ENCODE and j.status == "queued"]
    if waiting:
        return waiting[0].id
    current = scope.store.current_model(scope.id)
    spec = ws.saved_spec(current.config) if current is not None else ws.default_spec
    project_id = scope.id

    def work(job) -> int:
        backbone = ws.backbone(spec)  # loaded here, never on the request thread
        extractor = ws.extractor(backbone)
        imgs = scope.store.list_images(project_id)
        refs = [i.ref() for i in sorted(imgs, key=lambda i: i.class_id is None)]  # examples first, then the pool
        n, done, a = len(refs), 0, 0
        stop = _StopForOthers(ws.runner, job.cancel_event)
        while a < n:
            if job.cancel_event.is_set():
                raise Cancelled("Cancelled; the features encoded so far are kept.")
            try:
                extractor.image_features(refs[a:a + PREPARE_STEP], (0,), cancel=stop)
                done += len(refs[a:a + PREPARE_STEP])
            except Cancelled:
                if job.cancel_event.is_set():
                    raise Cancelled("Cancelled; the features encoded so far are kept.") from None
                job.report(Progress("Preparing features", a, n))  # another job came: wait here, then redo the rest
                continue
            except (FewShotError, OSError):  # a damaged or vanished file: training will say which
                pass
            a += PREPARE_STEP
            job.report(Progress("Preparing features", min(n, a), n))  # where it yields
        return done

    return ws.runner.submit_background(ENCODE, work, project_id)


class _StopForOthers:
    """The background encoding's cancel flag: set when its job is cancelled or when another job
    is queued or running (the feature pipeline checks it before each chunk; what it encoded
    before is cached)."""

    def __init__(self, runner, cancel):
        self.runner, self.cancel = runner, cancel

    def is_set(self) -> bool:
        return self.cancel.is_set() or self.runner.foreground_busy()


def add_uploads(scope: ProjectScope, files: Iterable[str | os.PathLike], class_name: str | None = None
                ) -> UploadResult:
    """Add uploaded files. `class_name`: a class (every image, zipped or not, joins it), POOL
    (everything goes to the unlabeled pool) or None (a zip's `class_name/image` folders make
    classes as needed; loose files go to the pool). Every file, zip or image, is judged by its
    content, never its name: one that is neither is refused alone, in one sentence.

    All or nothing: the accepted images are staged on disk one at a time, then stored (and
    the zip's classes made) in one transaction, so an upload killed half-way adds nothing
    and memory holds one image or zip entry at a time."""
    class_id = class_id_for(scope, class_name)
    paths = [Path(f) for f in files or []]
    if not paths:
        raise DataError("Choose at least one image to upload.")
    zips = [p for p in paths if zipfile.is_zipfile(p)]
    plain = [p for p in paths if p not in zips]
    items = _loose_items(plain) if plain else []  # the batch-size check, before any work
    errors: list[str] = []
    with scope.store.begin_import(scope.id) as batch:
        for path in zips:
            try:
                errors += _stage_zip(batch, path, pool=class_name == POOL, class_id=class_id)
            except imageio.ImageError as e:  # the whole archive: unreadable, too many files
                errors.append(str(e))
        labeled_by = "user" if class_id is not None else None
        for position, (name, source) in enumerate(items, 1):
            error = batch.add(name, source, class_id, labeled_by=labeled_by, position=position)
            if error:
                errors.append(error)
        result = _commit(batch, errors)
    if result.added:
        result = replace(result, encode_job=prepare_features(scope))
    return result


def image(scope: ProjectScope, image_id: int) -> ImageInfo:
    """One image of the project (one sentence if it is not there or another project's)."""
    img = scope.store.get_image(int(image_id))
    if img.project_id != scope.id:
        raise NotFoundError(f"There is no image with id {image_id} in this project.")
    return img


def images(scope: ProjectScope, class_name: str | None) -> list[ImageInfo]:
    """The images of a class, or of the unlabeled pool for POOL/None, in upload order."""
    class_id = class_id_for(scope, class_name)
    return scope.store.list_images(scope.id, class_id=class_id, pool=class_id is None)


def pool_images(scope: ProjectScope) -> list[ImageInfo]:
    return scope.store.list_images(scope.id, pool=True)


def remove_image(scope: ProjectScope, image_id: int) -> None:
    image(scope, image_id)
    scope.store.remove_image(int(image_id))


def remove_images(scope: ProjectScope, image_ids: Sequence[int]) -> int:
    ids = [int(i) for i in image_ids]
    if not ids:
        raise DataError("Select an image first (click its thumbnail).")
    for i in ids:
        image(scope, i)
    return scope.store.remove_images(ids)


THUMB_KEY_CHARS = 40  # hex characters of a thumbnail's name (a content hash has 64: see forget_hash_thumbnails)


def thumbnail_key(ws: Workspace, digest: str) -> str:
    """A thumbnail's file name (without its .jpg/.png suffix): an HMAC of the image's content
    hash under the installation's secret, so that nobody can compute the URL of an image's
    thumbnail from its content (or from a hash seen elsewhere), while the same image keeps one
    thumbnail."""
    secret = ws.browser_secret().encode()
    return hmac.new(secret, b"thumbnail:" + digest.encode(), hashlib.sha256).hexdigest()[:THUMB_KEY_CHARS]


#: JPEG quality of gallery thumbnails. Measured on a 2,000-image pool at ViT-B-32 size (issue
#: #15): PNG thumbnails took 15 ms each and were 2.8x the size of the source JPEGs; JPEG q85 takes
#: 1.7 ms and about 3.8 KB at 160 px, with no artefact visible at gallery size (q95 doubles the
#: bytes for no visible gain; q75 starts to ring around the edges of line drawings).
THUMB_QUALITY = 85


#: The long side of the labeling station's large review image: a 160 px thumbnail scaled up is
#: too blurry to judge a photo by, and 512 px is what a 1400 px wide page shows it at (about
#: 40–60 KB as JPEG q85, made once per image when it comes up for review).
PREVIEW_SIZE = 512


def thumbnail(ws: Workspace, img: ImageInfo, size: int = THUMB_SIZE) -> str:
    """A small JPEG (quality THUMB_QUALITY) for galleries, at most `size` px on its long side
    (THUMB_SIZE; PREVIEW_SIZE for the station's review image), generated once per image content
    and size (named by `thumbnail_key`, plus "-<size>" for sizes other than THUMB_SIZE). JPEG always fits: `imageio.decode_image` composites any alpha on
    white (as the model sees the image), so a thumbnail never has transparency to show. A PNG
    thumbnail made by an earlier version is still served as it is (same key, same folder) rather
    than decoded again. An image whose stored file is gone or damaged gets the placeholder
    instead (`missing_images` names them), so one lost file never takes a page down; nor does a
    full disk (the thumbnail is then made again next time)."""
    key = thumbnail_key(ws, img.hash)
    size = int(size)
    folder = ws.thumbs_dir / key[:2]
    path = folder / (f"{key}.jpg" if size == THUMB_SIZE else f"{key}-{size}.jpg")
    if path.exists():
        return str(path)
    old = folder / f"{key}.png"
    if size == THUMB_SIZE and old.exists():
        return str(old)
    try:
        im = imageio.decode_image(img.path.read_bytes(), img.original_name, draft_size=size)
    except (OSError, imageio.ImageError):
        return placeholder(ws)
    im.thumbnail((size, size))
    try:
        _write_image(im, path, "JPEG", quality=THUMB_QUALITY)
    except OSError:
        return placeholder(ws)
    return str(path)


def forget_hash_thumbnails(ws: Workspace) -> int:
    """Delete thumbnails of the old layout, named by the image's content hash (servable to
    whoever knew the hash); `thumbnail` makes keyed ones again as needed. Returns how many."""
    n = 0
    for f in ws.thumbs_dir.glob("??/*.png"):
        if len(f.stem) == 64:
            try:
                f.unlink()
                n += 1
            except OSError:
                pass
    return n


def placeholder(ws: Workspace) -> str:
    """The thumbnail of an image whose file is missing: a grey square with a cross."""
    path = ws.thumbs_dir / "missing.png"
    if not path.exists():
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (229, 231, 235))
        d, m = ImageDraw.Draw(im), THUMB_SIZE // 3
        d.line((m, m, THUMB_SIZE - m, THUMB_SIZE - m), fill=(156, 163, 175), width=6)
        d.line((m, THUMB_SIZE - m, THUMB_SIZE - m, m), fill=(156, 163, 175), width=6)
        _write_image(im, path, "PNG")
    return str(path)


def _write_image(im, path: Path, fmt: str, **params) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # atomic: readers never see half
    try:
        im.save(tmp, fmt, **params)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def missing_images(scope: ProjectScope) -> list[ImageInfo]:
    """The project's images whose stored file is gone (deleted or moved outside the app)."""
    return [i for i in scope.store.list_images(scope.id) if not i.path.is_file()]
