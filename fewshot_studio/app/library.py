"""Classes and images of a project: add, rename, describe and delete classes; upload files and
zips; find and remove images; counts; thumbnails."""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
import unicodedata
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

from .. import imageio
from ..errors import DataError, FewShotError
from ..store import POOL_NAME, ClassInfo, ImageInfo, NotFoundError, is_reserved_class_name
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


def _key(name: str) -> str:
    """Class names are unique ignoring case (and NFC form, and surrounding spaces) in the store."""
    return unicodedata.normalize("NFC", name.strip().casefold())


# ---- images -------------------------------------------------------------------------------------
def add_images(scope: ProjectScope, files: Iterable[str | os.PathLike | tuple[str, bytes]],
               class_id: int | None = None) -> tuple[list[ImageInfo], list[str]]:
    """Upload files into a class (or the pool when class_id is None); bad files are reported."""
    if class_id is not None:
        get_class(scope, class_id)
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
    return scope.store.add_images(scope.id, items, class_id=class_id,
                                  labeled_by="user" if class_id is not None else None)


def add_zip(scope: ProjectScope, source: str | os.PathLike | bytes, pool: bool = False,
            class_id: int | None = None) -> tuple[int, list[str]]:
    """A zip of `class_name/image` folders: classes are created as needed. Files at the top
    level (or everything, with pool=True) go to the unlabeled pool; with `class_id`, every
    image joins that class whatever its folder."""
    store, pid = scope.store, scope.id
    members, errors = imageio.read_zip(source)
    errors = [str(e) for e in errors]
    if class_id is not None:
        infos, errs = store.add_images(pid, [("/".join(m.path), m.data) for m in members],
                                       class_id=class_id, labeled_by="user")
        return len(infos), errors + list(errs)
    by_class: dict[str | None, list[tuple[str, bytes]]] = {}
    for m in members:
        cls = None if pool or len(m.path) < 2 else m.path[0]
        by_class.setdefault(cls, []).append(("/".join(m.path), m.data))
    added = 0
    archive = Path(source).name if isinstance(source, (str, os.PathLike)) else "archive.zip"
    existing = {_key(c.name): c for c in store.list_classes(pid)}
    for cls, items in by_class.items():
        class_id = None
        if cls is not None:
            n = len(items)
            skipped = f"so its {n} file{'s were' if n != 1 else ' was'} skipped"
            if is_reserved_class_name(cls):  # before the look-up: never into a legacy class of that name
                errors.append(f"{cls}/ (in {archive}): the folder name {cls!r} is reserved for the unlabeled "
                              f"pool, {skipped}; rename the folder.")
                continue
            c = existing.get(_key(cls))
            if c is None:
                try:
                    c = store.add_class(pid, cls)
                except FewShotError as e:
                    errors.append(f"{cls}/ (in {archive}): {str(e).rstrip('.')}, {skipped}.")
                    continue
                existing[_key(c.name)] = c
            class_id = c.id
        infos, errs = store.add_images(pid, items, class_id=class_id, labeled_by="user" if class_id else None)
        added += len(infos)
        errors += errs
    return added, errors


def add_uploads(scope: ProjectScope, files: Iterable[str | os.PathLike], class_name: str | None = None
                ) -> tuple[int, list[str]]:
    """Add uploaded files. `class_name`: a class (every image, zipped or not, joins it), POOL
    (everything goes to the unlabeled pool) or None (a zip's `class_name/image` folders make
    classes as needed; loose files go to the pool). Zip archives are judged by content.
    Returns (images added, one sentence per refused file)."""
    class_id = class_id_for(scope, class_name)
    paths = [Path(f) for f in files or []]
    if not paths:
        raise DataError("Choose at least one image to upload.")
    added, errors, plain = 0, [], []
    for path in paths:
        if zipfile.is_zipfile(path):
            n, errs = add_zip(scope, path, pool=class_name == POOL, class_id=class_id)
            added += n
            errors += errs
        else:
            plain.append(path)
    if plain:
        infos, errs = add_images(scope, plain, class_id=class_id)
        added += len(infos)
        errors += errs
    return added, [str(e) for e in errors]


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
    """A thumbnail's file name (without .png): an HMAC of the image's content hash under the
    installation's secret, so that nobody can compute the URL of an image's thumbnail from its
    content (or from a hash seen elsewhere), while the same image keeps one thumbnail."""
    secret = ws.browser_secret().encode()
    return hmac.new(secret, b"thumbnail:" + digest.encode(), hashlib.sha256).hexdigest()[:THUMB_KEY_CHARS]


def thumbnail(ws: Workspace, img: ImageInfo) -> str:
    """A small PNG for galleries, generated once per image content (named by `thumbnail_key`).
    An image whose stored file is gone or damaged gets the placeholder instead
    (`missing_images` names them), so one lost file never takes a page down; nor does a full
    disk (the thumbnail is then made again next time)."""
    key = thumbnail_key(ws, img.hash)
    path = ws.thumbs_dir / key[:2] / f"{key}.png"
    if not path.exists():
        try:
            im = imageio.decode_image(img.path.read_bytes(), img.original_name, draft_size=THUMB_SIZE)
        except (OSError, imageio.ImageError):
            return placeholder(ws)
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        try:
            _write_png(im, path)
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
        _write_png(im, path)
    return str(path)


def _write_png(im, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # atomic: readers never see half
    try:
        im.save(tmp, "PNG")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def missing_images(scope: ProjectScope) -> list[ImageInfo]:
    """The project's images whose stored file is gone (deleted or moved outside the app)."""
    return [i for i in scope.store.list_images(scope.id) if not i.path.is_file()]
