"""The persistent project store: an embedded SQLite database plus content-addressed image files.

Layout under the data directory ``root`` (default: `AppConfig.data_dir`)::

    root/studio.db                 SQLite database (WAL mode, foreign keys on)
    root/images/<hash[:2]>/<hash>  image bytes, named by their SHA-256 (no extension)
    root/models/<model id>/        a registered model directory (weights + config)
    root/staging/                  scratch space: model directories before registration, and
                                   uploads staged by an import (ImageImport) before its commit

* **Schema migrations** are the numbered entries of :data:`MIGRATIONS` (SQL scripts or
  callables taking the connection); ``PRAGMA user_version`` holds how many have been
  applied.  Pending ones are applied on open, each in its own transaction together with
  its version bump, so a failed migration leaves the previous version intact.  A
  database written by a newer version is refused rather than touched.
* **Images** are stored once per distinct content, however many projects or classes
  use them: every ``images`` row references a file by hash, and a file is deleted when
  the last row referencing it goes.  Files are written atomically (temporary file +
  ``os.replace``) *before* the row that references them is committed, and deleted only
  *after* the last referencing row is committed away, so a crash can at worst leave an
  unreferenced file (removed by :meth:`ProjectStore.collect_garbage`), never a row
  without its file.
* **Thread safety**: one connection, every database access and every file
  write/delete serialised by one re-entrant lock.  Image decoding (validation), the slow
  part of an upload, happens outside the lock.  Several ``ProjectStore`` instances or
  processes may share a database (WAL + ``busy_timeout``), but run
  :meth:`~ProjectStore.collect_garbage` only when no other process writes to the store.
* **Damage** (docs: SECURITY.md) is looked for before SQLite touches the files, because SQLite
  silently ignores a damaged write-ahead log and reads a zero-byte file as a new database:
  the log's header and frame checksums are verified (:func:`wal_damage`), the main file's
  header and ``PRAGMA quick_check`` are checked, and a database without tables while image
  or model files are stored means the projects were lost.  ``ProjectStore(root)`` refuses a
  damaged database with one sentence (:class:`DamagedDatabaseError`);
  ``ProjectStore(root, recover=True)`` (the app) moves the damaged files, never deleting
  them, into ``root/damaged-<time>/``, carries on with what SQLite can still read (a
  damaged log: the main file plus the log's intact part) or an empty database, and says
  what happened in one sentence (:attr:`ProjectStore.recovery`).
* **Checkpoints**: the write-ahead log is copied into the main file (``PRAGMA
  wal_checkpoint(TRUNCATE)``) every :data:`CHECKPOINT_SECONDS` after a write, and on
  :meth:`ProjectStore.close`, so the main file alone holds (nearly) everything.
* **Errors** a user can cause raise :class:`StoreError` subclasses whose ``str()`` is
  one sentence: :class:`NotFoundError` for unknown ids (an id that belongs to another
  project is reported as unknown, so hosted sessions learn nothing about each other's
  projects), :class:`ValidationError` for bad names and values.  Invalid uploads are
  not raised but returned, one sentence each, by :meth:`~ProjectStore.add_images`.

Names are stripped and NFC-normalised; class names are unique per project ignoring
case (Unicode case folding, so "Straße" and "STRASSE" collide) and at most
:data:`MAX_NAME_LENGTH` characters; no class may read as :data:`POOL_NAME`, the unlabeled
pool's name in the app (:func:`is_reserved_class_name`).  Timestamps are Unix seconds (float).
"""
from __future__ import annotations

import errno
import json
import math
import operator
import os
import re
import secrets
import shutil
import sqlite3
import struct
import threading
import time
import unicodedata
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

try:  # POSIX: a live import holds a lock on its staging folder, released by the OS if it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: staging folders are judged by age alone
    fcntl = None  # type: ignore[assignment]

from . import imageio
from .config import AppConfig
from .data import ImageRef, SupportSet
from .errors import FewShotError
from .progress import FINISHED, JobStatus

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MAX_NAME_LENGTH",
    "POOL_NAME",
    "is_reserved_class_name",
    "check_class_name",
    "MAX_DESCRIPTION_LENGTH",
    "LABELED_BY",
    "JOB_STATUSES",
    "StoreError",
    "NotFoundError",
    "ValidationError",
    "DuplicateNameError",
    "ReservedNameError",
    "JobFinishedError",
    "DamagedDatabaseError",
    "CHECKPOINT_SECONDS",
    "wal_damage",
    "Project",
    "ClassInfo",
    "ImageInfo",
    "ModelInfo",
    "JobInfo",
    "PredictionInfo",
    "ActionInfo",
    "ACTION_KINDS",
    "REMOVED_KEEP_SECONDS",
    "ProjectStore",
    "ImageImport",
    "ImportResult",
    "STALE_STAGING_SECONDS",
]

#: Longest project or class name, in characters (after stripping).
MAX_NAME_LENGTH = 200
#: What pickers and tables call the unlabeled pool; no class may take this name (see
#: :func:`is_reserved_class_name`).
POOL_NAME = "(unlabeled pool)"
#: Longest class description, in characters.
MAX_DESCRIPTION_LENGTH = 2000
#: Longest stored original file name; longer names are shortened, not refused.
MAX_FILE_NAME_LENGTH = 255
#: Who put an image in its class: the user, an accepted prediction, or a corrected one.
LABELED_BY = ("user", "accepted", "corrected")
#: The kinds of logged (undoable) labeling actions, and the undo that reverses one.
ACTION_KINDS = ("accept", "correct", "remove", "undo")
#: A removed image's file and row data are kept this long for undo, then purged by
#: :meth:`ProjectStore.collect_garbage` (a week: undo is for slips within a labeling session,
#: and a week's removals of a 10,000-image pool cost at most its own size on disk).
REMOVED_KEEP_SECONDS = 7 * 24 * 3600.0
JOB_STATUSES = tuple(s.value for s in JobStatus)
_JOB_FINISHED = FINISHED
#: Decoding an upload to validate it may use JPEG draft mode down to about this size.
_VALIDATE_DRAFT = 256
_BUSY_TIMEOUT_MS = 15_000
#: A staging folder that holds no live lock (its import was killed) and is older than this
#: is removed at start (:meth:`ProjectStore.clean_staging`); the age only matters where
#: locks are unavailable, or in the instant between creating a folder and locking it.
STALE_STAGING_SECONDS = 60
_STAGING_LOCK = ".lock"
_DB_NAME = "studio.db"
#: Seconds between checkpoints of the write-ahead log into the database file while writes happen.
CHECKPOINT_SECONDS = 60.0
_SQLITE_MAGIC = b"SQLite format 3\x00"

Migration = Union[str, Callable[[sqlite3.Connection], None]]

_SCHEMA_V1 = """
CREATE TABLE projects (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    name     TEXT    NOT NULL,
    owner    TEXT,                         -- browser-session token in the hosted demo; NULL locally
    created  REAL    NOT NULL,
    updated  REAL    NOT NULL
);
CREATE INDEX projects_owner ON projects(owner, updated);

CREATE TABLE classes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    name_key    TEXT    NOT NULL,          -- casefold(NFC(strip(name))): uniqueness ignoring case
    description TEXT    NOT NULL DEFAULT '',
    position    INTEGER NOT NULL,
    created     REAL    NOT NULL,
    UNIQUE (project_id, name_key)
);
CREATE INDEX classes_position ON classes(project_id, position);

CREATE TABLE images (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id    INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    hash          TEXT    NOT NULL CHECK (length(hash) = 64),
    original_name TEXT    NOT NULL DEFAULT '',
    class_id      INTEGER REFERENCES classes(id),      -- NULL: the unlabeled pool
    labeled_by    TEXT    CHECK (labeled_by IN ('user', 'accepted', 'corrected')),
    width         INTEGER,
    height        INTEGER,
    created       REAL    NOT NULL,
    CHECK ((class_id IS NULL) = (labeled_by IS NULL))
);
CREATE INDEX images_project_class ON images(project_id, class_id);
CREATE INDEX images_project_hash ON images(project_id, hash);
CREATE INDEX images_hash ON images(hash);

CREATE TRIGGER images_class_project_insert BEFORE INSERT ON images
WHEN NEW.class_id IS NOT NULL AND NOT EXISTS
    (SELECT 1 FROM classes WHERE id = NEW.class_id AND project_id = NEW.project_id)
BEGIN SELECT RAISE(ABORT, 'an image can only be labelled with a class of its own project'); END;

CREATE TRIGGER images_class_project_update BEFORE UPDATE OF class_id, project_id ON images
WHEN NEW.class_id IS NOT NULL AND NOT EXISTS
    (SELECT 1 FROM classes WHERE id = NEW.class_id AND project_id = NEW.project_id)
BEGIN SELECT RAISE(ABORT, 'an image can only be labelled with a class of its own project'); END;

CREATE TABLE models (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: models/<id>/ is unique
    project_id   INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    method       TEXT    NOT NULL,
    backbone_id  TEXT    NOT NULL,
    config       TEXT    NOT NULL DEFAULT '{}',       -- JSON
    metrics      TEXT    NOT NULL DEFAULT '{}',       -- JSON
    weights_path TEXT,                                -- directory relative to the data dir
    status       TEXT    NOT NULL DEFAULT 'ready',
    created      REAL    NOT NULL
);
CREATE INDEX models_project ON models(project_id);

CREATE TABLE predictions (
    image_id   INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    model_id   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    label      INTEGER REFERENCES classes(id) ON DELETE SET NULL,
    confidence REAL    NOT NULL,
    probs      TEXT    NOT NULL DEFAULT '{}',         -- JSON: {class id: probability} or a list
    created    REAL    NOT NULL,
    PRIMARY KEY (image_id, model_id)
);
CREATE INDEX predictions_model ON predictions(model_id, confidence);

CREATE TABLE jobs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL,
    status     TEXT    NOT NULL DEFAULT 'queued'
               CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    message    TEXT    NOT NULL DEFAULT '',
    progress   TEXT    NOT NULL DEFAULT '{}',         -- JSON
    model_id   INTEGER REFERENCES models(id) ON DELETE SET NULL,
    created    REAL    NOT NULL,
    updated    REAL    NOT NULL
);
CREATE INDEX jobs_project ON jobs(project_id, id);
CREATE INDEX jobs_status ON jobs(status);
"""

#: Numbered schema migrations: entry ``i`` takes the database from version ``i`` to
#: ``i + 1``.  Append new entries; never edit or reorder applied ones.
_SCHEMA_V2_LINKS = """
-- project links (docs/design.md, "Storage"): a secret token per project; a hosted session that opens the link
-- becomes a member and sees the project next to its own
CREATE TABLE project_links (
    project_id  INTEGER PRIMARY KEY REFERENCES projects(id) ON DELETE CASCADE,
    token       TEXT    NOT NULL UNIQUE,
    created     REAL    NOT NULL
);
CREATE TABLE project_members (
    project_id  INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    owner       TEXT    NOT NULL,
    joined      REAL    NOT NULL,
    PRIMARY KEY (project_id, owner)
);
CREATE INDEX project_members_owner ON project_members(owner);
"""

_SCHEMA_V3_CURRENT_MODEL = """
-- the model a project uses (graph, predict, label, export): chosen by the user or the newest
-- one registered; deleting it falls back to the newest (the row goes with the model)
CREATE TABLE current_models (
    project_id  INTEGER PRIMARY KEY REFERENCES projects(id) ON DELETE CASCADE,
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE
);
"""

_SCHEMA_V4_ACTIONS = """
-- the labeling station's action log (issue 15): every accept, correct and remove, undoable; the
-- payload (JSON) holds each image's previous and new class_id/labeled_by, or a removed image's row
-- and predictions, so undo restores them exactly
CREATE TABLE actions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    owner       TEXT,                         -- browser-session token in the hosted demo; NULL locally
    kind        TEXT    NOT NULL CHECK (kind IN ('accept', 'correct', 'remove', 'undo')),
    count       INTEGER NOT NULL,             -- images it touched
    labeled     INTEGER NOT NULL DEFAULT 0,   -- images it put in a class (labeled today, labels since a model)
    summary     TEXT    NOT NULL DEFAULT '',
    created     REAL    NOT NULL,
    undone      INTEGER NOT NULL DEFAULT 0,
    undoes      INTEGER REFERENCES actions(id) ON DELETE SET NULL,
    payload     TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX actions_project ON actions(project_id, id);
CREATE INDEX actions_owner ON actions(project_id, owner, undone, id);

-- the files of removed images an undo may bring back: a file is kept while a row here names it
CREATE TABLE removed_files (
    action_id   INTEGER NOT NULL REFERENCES actions(id) ON DELETE CASCADE,
    hash        TEXT    NOT NULL,
    PRIMARY KEY (action_id, hash)
);
CREATE INDEX removed_files_hash ON removed_files(hash);
"""

#: The message (lower case) of a job that was running when the app stopped.
INTERRUPTED = "the app stopped while this job was running"
#: The message (lower case) of a job that was still queued when the app stopped.
INTERRUPTED_QUEUED = "the app stopped before this job started"

MIGRATIONS: list[Migration] = [_SCHEMA_V1, _SCHEMA_V2_LINKS, _SCHEMA_V3_CURRENT_MODEL, _SCHEMA_V4_ACTIONS]
#: The schema version this code writes (``PRAGMA user_version`` after opening).
SCHEMA_VERSION = len(MIGRATIONS)


# ------------------------------------------------------------------------------ errors


class StoreError(FewShotError):
    """The project store cannot do what was asked; ``str()`` is one sentence."""


class NotFoundError(StoreError):
    """An id names no project, class, image, model or job (in the given project)."""


class ValidationError(StoreError):
    """A name, value or request is not acceptable."""


class DuplicateNameError(ValidationError):
    """A class name is already used in the project (ignoring case and surrounding spaces)."""


class ReservedNameError(ValidationError):
    """A class name reads as the unlabeled pool's name (:data:`POOL_NAME`)."""


class JobFinishedError(ValidationError):
    """A job that has finished (done, failed or cancelled) cannot change status again."""


class DamagedDatabaseError(StoreError):
    """The database files are damaged: ``kind`` is "log" (studio.db-wal), "main" (studio.db)
    or "empty" (no tables although images or models are stored: the projects are lost)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    owner: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class ClassInfo:
    id: int
    project_id: int
    name: str
    description: str
    position: int
    created: float


@dataclass(frozen=True)
class ImageInfo:
    id: int
    project_id: int
    hash: str
    original_name: str
    class_id: int | None  # None: in the unlabeled pool
    labeled_by: str | None  # 'user' | 'accepted' | 'corrected' | None (pool)
    width: int | None
    height: int | None
    created: float
    root: Path = field(repr=False, compare=False)

    @property
    def path(self) -> Path:
        """The stored file (content-addressed: shared by every row with the same bytes)."""
        return _blob_path(self.root, self.hash)

    @property
    def labeled(self) -> bool:
        return self.class_id is not None

    def ref(self) -> ImageRef:
        return ImageRef(self.hash, self.path, None, self.original_name)


@dataclass(frozen=True)
class ModelInfo:
    id: int
    project_id: int
    method: str
    backbone_id: str
    config: dict = field(hash=False)
    metrics: dict = field(hash=False)
    weights_path: str | None  # relative to the data dir, e.g. "models/7"
    status: str
    created: float
    root: Path = field(repr=False, compare=False)

    @property
    def path(self) -> Path | None:
        """The model directory (absolute), or None if it has none."""
        return None if self.weights_path is None else self.root / self.weights_path


@dataclass(frozen=True)
class JobInfo:
    id: int
    project_id: int
    kind: str
    status: str  # queued | running | done | failed | cancelled
    message: str
    progress: dict = field(hash=False)
    model_id: int | None
    created: float
    updated: float

    @property
    def finished(self) -> bool:
        return self.status in _JOB_FINISHED


@dataclass(frozen=True)
class PredictionInfo:
    image_id: int
    model_id: int
    label: int | None  # a class id (None if that class was deleted since)
    confidence: float
    probs: Any = field(hash=False)  # dict[class id, probability] or a list, as saved
    created: float


@dataclass(frozen=True)
class ActionInfo:
    """One logged labeling action (:meth:`ProjectStore.label_images`, :meth:`~ProjectStore.remove_undoably`,
    :meth:`~ProjectStore.undo_last`)."""

    id: int
    project_id: int
    owner: str | None
    kind: str  # one of ACTION_KINDS
    count: int  # images it touched
    labeled: int  # images it put in a class
    summary: str
    created: float
    undone: bool
    undoes: int | None  # for an undo: the action it reversed
    image_ids: tuple[int, ...] = field(default=(), hash=False)


# ---------------------------------------------------------------------------- helpers

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Write `data` to `path` whole or not at all (a temporary file, fsync, rename); a failed
    write removes the temporary file and raises its OSError. `sync=False` leaves the fsync to
    the caller (`_fsync_file`), who must make the file durable before anything refers to it."""
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _fsync_file(path: Path) -> None:
    """Make a file's data durable (fsync through a new descriptor: it syncs the file, whichever
    descriptor wrote it)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Threads that fsync an import's staged uploads while the next ones are decoded. One fsync at
#: a time cost 2.3 ms a file on this machine's ext4 (a 10,000-image pool upload: 31 of its 54 s,
#: more than decoding and checking every image); concurrent fsyncs share the journal's commits:
#: 0.17 ms a file with 16 threads, 8 give most of that.
STAGE_SYNC_THREADS = 8


def _blob_path(root: Path, digest: str) -> Path:
    return root / "images" / digest[:2] / digest


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _clean_name(name: object, what: str) -> str:
    """Strip, NFC-normalise and validate a project/class name; one-sentence errors."""
    if not isinstance(name, str):
        raise ValidationError(f"A {what} name must be text, not {type(name).__name__}.")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise ValidationError(f"{what.capitalize()} names cannot be blank.")
    if len(name) > MAX_NAME_LENGTH:
        raise ValidationError(
            f"The {what} name {_short(name)} is {len(name)} characters long; use at most {MAX_NAME_LENGTH}."
        )
    if _CONTROL.search(name):
        raise ValidationError(f"{what.capitalize()} names cannot contain line breaks or other control characters.")
    return name


def _name_key(name: str) -> str:
    return unicodedata.normalize("NFC", name.strip().casefold())


def _loose_key(name: str) -> str:
    """A name as a reader sees it: compatibility-normalised (NFKC: full-width letters, ligatures),
    case-folded, invisible format characters (zero-width spaces...) dropped, runs of whitespace
    made one space and the ends stripped."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


_POOL_KEY = _loose_key(POOL_NAME)


def is_reserved_class_name(name: object) -> bool:
    """Whether `name` would read as :data:`POOL_NAME` (ignoring case, Unicode compatibility
    forms, invisible characters and whitespace), which no class may be called."""
    return isinstance(name, str) and _loose_key(name) == _POOL_KEY


def _clean_class_name(name: object) -> str:
    """A project/class name check plus the one class-only rule: the pool's name is reserved.
    Every way a class is created or renamed (the Classes tab, zip folders, examples, the CLI)
    passes through :meth:`ProjectStore.add_class` or :meth:`ProjectStore.rename_class`, so here."""
    cleaned = _clean_name(name, "class")
    if is_reserved_class_name(cleaned):
        raise ReservedNameError(f"{_short(str(name))} is reserved for the unlabeled pool; choose another class name.")
    return cleaned


def check_class_name(name: object) -> str:
    """``name`` as a class would be called (stripped, NFC), or a one-sentence
    :class:`ValidationError` / :class:`ReservedNameError`; touches no database.  Lets an
    import refuse a bad folder name before staging its files."""
    return _clean_class_name(name)


def _clean_description(text: object) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValidationError(f"A class description must be text, not {type(text).__name__}.")
    text = unicodedata.normalize("NFC", text).strip()
    if len(text) > MAX_DESCRIPTION_LENGTH:
        raise ValidationError(
            f"The class description is {len(text)} characters long; use at most {MAX_DESCRIPTION_LENGTH}."
        )
    return text


def _clean_file_name(name: object, position: int) -> str:
    text = "" if name is None else str(name)
    text = _CONTROL.sub("?", unicodedata.normalize("NFC", text)).strip()
    if not text:
        text = f"image #{position}"
    if len(text) > MAX_FILE_NAME_LENGTH:
        text = text[: MAX_FILE_NAME_LENGTH - 1] + "…"
    return text


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps({} if value is None else value, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"The {what} cannot be saved as JSON ({e}).") from None


def _check_id(value: object, what: str) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # int, numpy integers
        except TypeError:
            pass
    raise ValidationError(f"A {what} id must be a whole number, not {value!r}.")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort; not possible on Windows)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ damage

_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian / big-endian
_WAL_HEADER, _FRAME_HEADER = 32, 24


def _wal_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum (https://www.sqlite.org/fileformat.html#checksum_algorithm)."""
    fmt = ">II" if big_endian else "<II"
    for x0, x1 in struct.iter_unpack(fmt, data):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(path: str | os.PathLike) -> str | None:
    """Why the write-ahead log at ``path`` is damaged, or None (absent, empty or sound).

    SQLite reads a log up to its first bad frame and silently drops the rest, committed
    transactions included; this reads it the same way and calls it damaged when the header
    is not a log's or when a committed frame of this log follows a frame that fails its
    checksum.  Frames of an earlier log generation (other salts) and an unfinished last
    transaction are what SQLite leaves normally and are not damage."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"it cannot be read ({e.strerror or type(e).__name__})"
    if not data:
        return None
    if len(data) < _WAL_HEADER:
        return "it is too short to be a log"
    magic, version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:_WAL_HEADER])
    if magic not in _WAL_MAGIC or version != 3007000:
        return "its header is not a SQLite log's"
    big = magic & 1 == 1
    if _wal_checksum(data[:24], big) != (c1, c2):
        return "its header fails its checksum"
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return "its header names an impossible page size"
    frame = _FRAME_HEADER + page_size
    sums, broken = (c1, c2), False
    for off in range(_WAL_HEADER, len(data) - frame + 1, frame):
        head = data[off:off + _FRAME_HEADER]
        _page, commit, f_salt1, f_salt2, f1, f2 = struct.unpack(">6I", head)
        if (f_salt1, f_salt2) != (salt1, salt2):
            if broken:
                continue  # look further for committed frames of this log beyond the damage
            break  # an earlier generation's frames: SQLite stops here, and so do we
        if broken:
            if commit:
                return "a committed transaction follows a frame that fails its checksum"
            continue
        sums = _wal_checksum(head[:8] + data[off + _FRAME_HEADER:off + frame], big, *sums)
        if sums != (f1, f2):
            broken = True
    return None


def _stored_files(root: Path) -> tuple[int, int]:
    """(image files, model directories) under the data folder: what a lost database leaves."""
    images = 0
    try:
        for sub in (root / "images").iterdir():
            if sub.is_dir():
                images += sum(1 for f in sub.iterdir() if not f.name.startswith(".tmp-"))
    except OSError:
        pass
    try:
        models = sum(1 for d in (root / "models").iterdir() if d.name.isdigit())
    except OSError:
        models = 0
    return images, models


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------------------ store


class ProjectStore:
    """Projects, classes, images, models, predictions and jobs, persisted under ``root``.

    ``migrations`` overrides :data:`MIGRATIONS` (tests use it to add a later one).
    Usable as a context manager; :meth:`close` when done.  Thread-safe.
    """

    def __init__(self, root: str | os.PathLike | None = None, *,
                 migrations: Sequence[Migration] | None = None, recover: bool = False,
                 checkpoint_every: float | None = CHECKPOINT_SECONDS):
        self.root = Path(root).expanduser() if root is not None else AppConfig.from_env().data_dir
        self.db_path = self.root / _DB_NAME
        self.migrations: list[Migration] = list(MIGRATIONS if migrations is None else migrations)
        self._lock = threading.RLock()
        #: One sentence when the database was found damaged and set aside on opening (recover=True).
        self.recovery = ""
        try:
            (self.root / "images").mkdir(parents=True, exist_ok=True)
            (self.root / "models").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"The data folder {self.root} could not be created ({e.strerror or type(e).__name__}); "
                "choose a writable folder with FEWSHOT_STUDIO_DATA or --data-dir."
            ) from None
        self._conn: sqlite3.Connection | None = None
        self._dirty = False
        self._stop = threading.Event()
        try:
            self._check_files()
            self._open()
        except DamagedDatabaseError as e:
            if not recover:
                raise
            self.recovery = self._set_aside(e)
            try:
                self._open(fresh=True)
            except DamagedDatabaseError as again:  # what was put back of a damaged log is damaged too
                self.recovery = self._set_aside(again)
                self._open(fresh=True)
            # into the database file at once, leaving an empty log: later writes must not land
            # in front of the damaged log's leftover frames
            self.checkpoint()
        if checkpoint_every:
            threading.Thread(target=_checkpoint_loop, args=(weakref.ref(self), self._stop, checkpoint_every),
                             name="store-checkpoint", daemon=True).start()

    def _check_files(self) -> None:
        """Damage SQLite would not report: a damaged log, a main file that is no database."""
        wal = self.db_path.with_name(_DB_NAME + "-wal")
        why = wal_damage(wal)
        if why:
            raise DamagedDatabaseError(
                f"The project database's log {wal} is damaged ({why}), so SQLite would silently drop "
                "the changes it holds; Few-Shot Studio sets it aside when it starts.", "log")
        try:
            with open(self.db_path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            head = b""
        except OSError as e:
            raise StoreError(f"The project database {self.db_path} could not be read "
                             f"({e.strerror or type(e).__name__}).") from None
        if head and head != _SQLITE_MAGIC:
            raise self._damaged_main()
        if not head:  # (a database in WAL mode always has its header in the file, log or not)
            self._refuse_if_files_stored()  # now, before SQLite writes a header into the empty file

    def _refuse_if_files_stored(self) -> None:
        """An empty database is new, unless images or models are stored: then it was lost."""
        images, models = _stored_files(self.root)
        if images or models:
            what = " and ".join(t for t in (images and _plural(images, "image file"),
                                            models and _plural(models, "model")) if t)
            raise DamagedDatabaseError(
                f"The project database {self.db_path} is empty although the data folder holds {what}, "
                "so its projects were lost; Few-Shot Studio sets it aside when it starts.", "empty")

    def _damaged_main(self) -> DamagedDatabaseError:
        return DamagedDatabaseError(
            f"The project database {self.db_path} is damaged or not a SQLite database; "
            "move it aside to start with an empty one.", "main")

    def _inspect(self, fresh: bool) -> None:
        """quick_check, and no tables while files are stored, through a read-only connection:
        it leaves the files exactly as they are (a writable one would checkpoint a damaged
        database on closing).  Other errors are left to the real connection to report."""
        if not self.db_path.is_file():
            return
        try:
            ro = sqlite3.connect(self.db_path.resolve().as_uri() + "?mode=ro", uri=True,
                                 timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            if ro.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise self._damaged_main()
            tables = ro.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or "malformed" in str(e):
                raise self._damaged_main() from None
            return
        finally:
            ro.close()
        if not tables and not fresh:
            self._refuse_if_files_stored()

    def _open(self, fresh: bool = False) -> None:
        """Connect, check and migrate; ``fresh``: an empty database is expected (just set aside)."""
        self._inspect(fresh)
        try:
            conn = sqlite3.connect(str(self.db_path), timeout=_BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"The project database {self.db_path} could not be opened ({e}).") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._migrate()
        except sqlite3.DatabaseError as e:
            conn.close()
            self._conn = None
            if "not a database" in str(e) or "malformed" in str(e):
                raise self._damaged_main() from None
            raise StoreError(f"The project database {self.db_path} could not be opened ({e}).") from None
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _set_aside(self, damage: DamagedDatabaseError) -> str:
        """Move the damaged database files into ``damaged-<time>/`` (never deleting them) and
        put back what can still be read; the sentence that tells the user."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.root / f"damaged-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.root / f"damaged-{stamp}-{n}"
        names = [_DB_NAME + suffix for suffix in ("", "-wal", "-shm")]
        try:
            aside.mkdir()
            for name in names:
                if (self.root / name).exists():
                    os.replace(self.root / name, aside / name)
            if damage.kind == "log" and (aside / _DB_NAME).exists():
                # what SQLite can still read: the main file and the log's intact part
                for name in names[:2]:
                    if (aside / name).exists():
                        shutil.copyfile(aside / name, self.root / name)
        except OSError as e:
            raise StoreError(f"The project database {self.db_path} is damaged and could not be set aside in "
                             f"{aside} ({e.strerror or type(e).__name__}); move {_DB_NAME} and its -wal file "
                             "out of the data folder by hand.") from None
        _fsync_dir(self.root)
        where = aside.name
        if damage.kind == "log":
            return (f"The project database's log was damaged, so changes saved shortly before the app last "
                    f"stopped may be missing; the damaged files were kept in the data folder's {where} "
                    "and the app carries on with everything that could be read.")
        if damage.kind == "empty":
            images, models = _stored_files(self.root)
            what = " and ".join(t for t in (images and _plural(images, "image file"),
                                            models and _plural(models, "model")) if t)
            kept = (f"the empty file was kept in the data folder's {where}" if (aside / _DB_NAME).exists()
                    else "it is missing")
            return (f"The project database was found empty although the data folder holds {what}, so the projects "
                    f"could not be shown; {kept}, the files were left in place, and the app started with an "
                    "empty project list.")
        return (f"The project database was damaged, so the app started with an empty project list; the "
                f"damaged file was kept in the data folder's {where} (nothing was deleted).")

    # ----------------------------------------------------------------- plumbing

    def __enter__(self) -> "ProjectStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProjectStore({str(self.root)!r})"

    def close(self) -> None:
        """Checkpoint the log into the database file and close (idempotent).  Every committed
        change is already durable; the checkpoint makes the database file hold it alone."""
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                self.checkpoint()
                self._conn.close()
                self._conn = None

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database file and empty the log
        (``wal_checkpoint(TRUNCATE)``); False when another connection kept it from finishing."""
        with self._lock:
            if self._conn is None:
                return False
            try:
                busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.Error:
                return False
            if not busy:
                self._dirty = False
            return not busy

    @property
    def closed(self) -> bool:
        return self._conn is None

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("The project store is closed; open it again to use it.")
        return self._conn

    def _db_error(self, e: sqlite3.Error) -> StoreError:
        text = str(e)
        if "locked" in text or "busy" in text:
            return StoreError("The project database is busy (another program is writing to it); try again.")
        if "disk" in text and ("full" in text or "I/O" in text):
            return StoreError(f"The project database could not be written ({text}); check the free disk space.")
        return StoreError(f"The project database reported an error ({text}).")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require_open()
            try:
                yield conn
            except sqlite3.Error as e:
                raise self._db_error(e) from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._db_error(e) from e
            try:
                yield conn
                conn.execute("COMMIT")
                self._dirty = True
            except BaseException as e:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(e, sqlite3.Error):
                    raise self._db_error(e) from e
                raise

    def _migrate(self) -> None:
        conn = self._require_open()
        target = len(self.migrations)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > target:
            raise StoreError(
                f"The project database {self.db_path} has schema version {version}, newer than this "
                f"version of Few-Shot Studio understands ({target}); upgrade Few-Shot Studio to open it."
            )
        while version < target:
            with self._tx() as c:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                version = int(c.execute("PRAGMA user_version").fetchone()[0])
                if version >= target:
                    break
                step = self.migrations[version]
                try:
                    if callable(step):
                        step(c)
                    else:
                        for statement in _split_sql(step):
                            c.execute(statement)
                except sqlite3.Error as e:
                    raise StoreError(
                        f"Upgrading the project database to schema version {version + 1} failed ({e}); "
                        "it was left at the previous version."
                    ) from e
                version += 1
                c.execute(f"PRAGMA user_version = {version}")

    def _touch(self, conn: sqlite3.Connection, project_id: int, now: float | None = None) -> None:
        conn.execute("UPDATE projects SET updated = ? WHERE id = ?", (now or time.time(), project_id))

    # ---------------------------------------------------------------- files

    def image_path(self, digest: str) -> Path:
        """Where the file with SHA-256 ``digest`` is (or would be) stored."""
        return _blob_path(self.root, digest)

    def staging_dir(self) -> Path:
        """A scratch folder on the same filesystem as ``models/``: build a model directory
        here, then :meth:`register_model` renames it into place atomically.  Entries left
        by a crash are removed by :meth:`collect_garbage`."""
        path = self.root / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def staging_folder(self, prefix: str = "import") -> Iterator[Path]:
        """A private folder ``staging/<prefix>-<random>`` for the duration of the ``with``,
        removed afterwards.  While in use it holds a lock (``.lock``, flock) that the OS
        drops if the process dies, so :meth:`clean_staging` can tell a killed import's
        leftovers from a live one's, even across processes."""
        name = f"{prefix}-{uuid.uuid4().hex}"
        folder, fresh = self.staging_dir() / name, self.staging_dir() / f".new-{name}"
        try:  # locked before it takes its name, so a folder by that name without a held lock is dead
            fresh.mkdir()
            fd = _lock_staging(fresh)
            os.rename(fresh, folder)
        except OSError as e:
            shutil.rmtree(fresh, ignore_errors=True)
            raise StoreError(f"A staging folder could not be made in {self.root} "
                             f"({e.strerror or type(e).__name__}); check the free disk space and permissions.") from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if fd is not None:
                os.close(fd)

    def clean_staging(self) -> int:
        """Remove the staging folders of imports that are no longer running (killed or
        crashed); call it at start.  A folder is left alone while its import's process
        holds its lock; one without a lock file (being made, or from an older version)
        only once it is older than :data:`STALE_STAGING_SECONDS`.  Job folders
        (``job-*``) are the job runner's.  Returns how many were removed."""
        staging = self.root / "staging"
        removed = 0
        for d in staging.iterdir() if staging.is_dir() else ():
            if d.name.startswith("job-") or not _staging_is_stale(d):
                continue
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            removed += not os.path.lexists(d)
        return removed

    def begin_import(self, project_id: int) -> "ImageImport":
        """An all-or-nothing import of uploads into ``project_id``: see :class:`ImageImport`."""
        with self._read() as conn:  # fail fast, before decoding a large batch
            pid = self._project_row(conn, project_id)["id"]
        return ImageImport(self, pid)

    def _write_blob(self, digest: str, data: bytes) -> bool:
        """Store ``data`` atomically under its hash; False if an intact copy was already there."""
        path = _blob_path(self.root, digest)
        try:
            if path.stat().st_size == len(data):
                return False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_atomic(path, data)
        except OSError as e:
            raise StoreError(
                f"An image could not be saved in the data folder ({e.strerror or type(e).__name__}); "
                "check the free disk space and permissions."
            ) from None
        _fsync_dir(path.parent)
        return True

    def _release_blobs(self, digests: Iterable[str]) -> int:
        """Delete the files of ``digests`` that no image row references any more."""
        removed = 0
        with self._lock:
            conn = self._require_open()
            for digest in set(digests):
                if conn.execute("SELECT 1 FROM images WHERE hash = ? LIMIT 1", (digest,)).fetchone() or \
                        conn.execute("SELECT 1 FROM removed_files WHERE hash = ? LIMIT 1", (digest,)).fetchone():
                    continue  # still used, or kept for undoing a removal
                try:
                    _blob_path(self.root, digest).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError:
                    pass  # left for collect_garbage()
        return removed

    def _remove_model_dir(self, rel: str | None) -> None:
        if not rel:
            return
        path = self.root / rel
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------- row lookup

    def _project_row(self, conn: sqlite3.Connection, project_id: object) -> sqlite3.Row:
        pid = _check_id(project_id, "project")
        row = conn.execute("SELECT * FROM projects WHERE id = ?", (pid,)).fetchone()
        if row is None:
            raise NotFoundError(f"There is no project with id {pid}.")
        return row

    def _class_row(self, conn: sqlite3.Connection, class_id: object, project_id: int | None = None) -> sqlite3.Row:
        cid = _check_id(class_id, "class")
        row = conn.execute("SELECT * FROM classes WHERE id = ?", (cid,)).fetchone()
        if row is None or (project_id is not None and row["project_id"] != project_id):
            raise NotFoundError(f"There is no class with id {cid} in this project.")
        return row

    def _image_row(self, conn: sqlite3.Connection, image_id: object, project_id: int | None = None) -> sqlite3.Row:
        iid = _check_id(image_id, "image")
        row = conn.execute("SELECT * FROM images WHERE id = ?", (iid,)).fetchone()
        if row is None or (project_id is not None and row["project_id"] != project_id):
            raise NotFoundError(f"There is no image with id {iid} in this project.")
        return row

    def _model_row(self, conn: sqlite3.Connection, model_id: object) -> sqlite3.Row:
        mid = _check_id(model_id, "model")
        row = conn.execute("SELECT * FROM models WHERE id = ?", (mid,)).fetchone()
        if row is None:
            raise NotFoundError(f"There is no model with id {mid}.")
        return row

    def _job_row(self, conn: sqlite3.Connection, job_id: object) -> sqlite3.Row:
        jid = _check_id(job_id, "job")
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row is None:
            raise NotFoundError(f"There is no job with id {jid}.")
        return row

    @staticmethod
    def _project(row: sqlite3.Row) -> Project:
        return Project(row["id"], row["name"], row["owner"], row["created"], row["updated"])

    @staticmethod
    def _class(row: sqlite3.Row) -> ClassInfo:
        return ClassInfo(row["id"], row["project_id"], row["name"], row["description"],
                         row["position"], row["created"])

    def _image(self, row: sqlite3.Row) -> ImageInfo:
        return ImageInfo(row["id"], row["project_id"], row["hash"], row["original_name"], row["class_id"],
                         row["labeled_by"], row["width"], row["height"], row["created"], self.root)

    def _model(self, row: sqlite3.Row) -> ModelInfo:
        return ModelInfo(row["id"], row["project_id"], row["method"], row["backbone_id"],
                         json.loads(row["config"]), json.loads(row["metrics"]), row["weights_path"],
                         row["status"], row["created"], self.root)

    @staticmethod
    def _job(row: sqlite3.Row) -> JobInfo:
        return JobInfo(row["id"], row["project_id"], row["kind"], row["status"], row["message"],
                       json.loads(row["progress"]), row["model_id"], row["created"], row["updated"])

    @staticmethod
    def _prediction(row: sqlite3.Row) -> PredictionInfo:
        probs = json.loads(row["probs"])
        if isinstance(probs, dict):
            probs = {int(k): v for k, v in probs.items()}
        return PredictionInfo(row["image_id"], row["model_id"], row["label"], row["confidence"],
                              probs, row["created"])

    # --------------------------------------------------------------- projects

    def create_project(self, name: str, owner: str | None = None) -> Project:
        """A new empty project; ``owner`` is the browser-session token in the hosted demo."""
        name = _clean_name(name, "project")
        if owner is not None and not isinstance(owner, str):
            raise ValidationError("A project owner must be a text token or None.")
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute("INSERT INTO projects (name, owner, created, updated) VALUES (?, ?, ?, ?)",
                               (name, owner, now, now))
            row = self._project_row(conn, cur.lastrowid)
        return self._project(row)

    def list_projects(self, owner: str | None = None) -> list[Project]:
        """Projects, most recently changed first.  ``owner=None``: every project (local
        single-user mode); otherwise that owner's projects and those it joined by a link."""
        with self._read() as conn:
            if owner is None:
                rows = conn.execute("SELECT * FROM projects ORDER BY updated DESC, id DESC").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM projects WHERE owner = ? OR id IN "
                    "(SELECT project_id FROM project_members WHERE owner = ?) ORDER BY updated DESC, id DESC",
                    (owner, owner)).fetchall()
        return [self._project(r) for r in rows]

    # ------------------------------------------------------------ project links

    def project_link(self, project_id: int, renew: bool = False) -> str:
        """The project's link token (made on first use; ``renew``: a new one, and the old link
        stops working; sessions that already joined keep the project)."""
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            row = conn.execute("SELECT token FROM project_links WHERE project_id = ?", (pid,)).fetchone()
            if row is not None and not renew:
                return row["token"]
            token = secrets.token_urlsafe(18)
            conn.execute("INSERT INTO project_links (project_id, token, created) VALUES (?, ?, ?) "
                         "ON CONFLICT(project_id) DO UPDATE SET token = excluded.token, created = excluded.created",
                         (pid, token, time.time()))
            return token

    def project_by_link(self, token: str) -> Project:
        """The project a link token opens; NotFoundError for an unknown (or renewed) token."""
        if not isinstance(token, str) or not token.strip():
            raise NotFoundError("This project link is empty.")
        with self._read() as conn:
            row = conn.execute("SELECT p.* FROM project_links l JOIN projects p ON p.id = l.project_id "
                               "WHERE l.token = ?", (token.strip(),)).fetchone()
        if row is None:
            raise NotFoundError("This project link does not open any project: it may have been mistyped, "
                                "replaced by a newer link, or the project deleted.")
        return self._project(row)

    def add_member(self, project_id: int, owner: str) -> None:
        """Let session ``owner`` see the project (it opened the project's link)."""
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            conn.execute("INSERT OR IGNORE INTO project_members (project_id, owner, joined) VALUES (?, ?, ?)",
                         (pid, owner, time.time()))

    def stop_sharing(self, project_id: int) -> int:
        """Delete the project's link and every member it let in (they no longer see the
        project); returns how many members were removed. A later `project_link` makes a new link."""
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            conn.execute("DELETE FROM project_links WHERE project_id = ?", (pid,))
            return conn.execute("DELETE FROM project_members WHERE project_id = ?", (pid,)).rowcount

    def members(self, project_id: int) -> int:
        """How many sessions joined the project through its link."""
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM project_members WHERE project_id = ?",
                                (int(project_id),)).fetchone()[0]

    def is_member(self, project_id: int, owner: str | None) -> bool:
        if owner is None:
            return False
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM project_members WHERE project_id = ? AND owner = ?",
                                (int(project_id), owner)).fetchone() is not None

    def get_project(self, project_id: int) -> Project:
        with self._read() as conn:
            return self._project(self._project_row(conn, project_id))

    def rename_project(self, project_id: int, name: str) -> Project:
        name = _clean_name(name, "project")
        with self._tx() as conn:
            row = self._project_row(conn, project_id)
            conn.execute("UPDATE projects SET name = ?, updated = ? WHERE id = ?", (name, time.time(), row["id"]))
            row = self._project_row(conn, row["id"])
        return self._project(row)

    def delete_project(self, project_id: int) -> None:
        """Delete the project with its classes, images, models, predictions and jobs; image
        files no other project uses and the project's model directories are removed."""
        with self._lock:
            with self._tx() as conn:
                pid = self._project_row(conn, project_id)["id"]
                digests = [r[0] for r in conn.execute("SELECT DISTINCT hash FROM images WHERE project_id = ?", (pid,))]
                digests += [r[0] for r in conn.execute(
                    "SELECT DISTINCT hash FROM removed_files JOIN actions ON actions.id = removed_files.action_id "
                    "WHERE actions.project_id = ?", (pid,))]
                model_dirs = [r[0] for r in conn.execute("SELECT weights_path FROM models WHERE project_id = ?", (pid,))]
                conn.execute("DELETE FROM projects WHERE id = ?", (pid,))  # cascades
            self._release_blobs(digests)
            for rel in model_dirs:
                self._remove_model_dir(rel)

    # ---------------------------------------------------------------- classes

    def _check_unique(self, conn: sqlite3.Connection, project_id: int, name: str, exclude: int | None = None) -> None:
        row = conn.execute("SELECT id, name FROM classes WHERE project_id = ? AND name_key = ?",
                           (project_id, _name_key(name))).fetchone()
        if row is not None and row["id"] != exclude:
            raise DuplicateNameError(
                f"There is already a class named {_short(row['name'])} in this project; "
                "class names must be unique (ignoring case)."
            )

    def add_class(self, project_id: int, name: str, description: str = "") -> ClassInfo:
        """A new class at the end of the project's class order."""
        name = _clean_class_name(name)
        description = _clean_description(description)
        now = time.time()
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            self._check_unique(conn, pid, name)
            position = conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM classes WHERE project_id = ?",
                                    (pid,)).fetchone()[0]
            cur = conn.execute(
                "INSERT INTO classes (project_id, name, name_key, description, position, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", (pid, name, _name_key(name), description, position, now))
            self._touch(conn, pid, now)
            row = self._class_row(conn, cur.lastrowid)
        return self._class(row)

    def get_class(self, class_id: int) -> ClassInfo:
        with self._read() as conn:
            return self._class(self._class_row(conn, class_id))

    def list_classes(self, project_id: int) -> list[ClassInfo]:
        """The project's classes in position order (the label order of :meth:`support_set`)."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            rows = conn.execute("SELECT * FROM classes WHERE project_id = ? ORDER BY position, id", (pid,)).fetchall()
        return [self._class(r) for r in rows]

    def rename_class(self, class_id: int, name: str) -> ClassInfo:
        name = _clean_class_name(name)
        with self._tx() as conn:
            row = self._class_row(conn, class_id)
            self._check_unique(conn, row["project_id"], name, exclude=row["id"])
            conn.execute("UPDATE classes SET name = ?, name_key = ? WHERE id = ?", (name, _name_key(name), row["id"]))
            self._touch(conn, row["project_id"])
            row = self._class_row(conn, row["id"])
        return self._class(row)

    def set_class_description(self, class_id: int, description: str) -> ClassInfo:
        description = _clean_description(description)
        with self._tx() as conn:
            row = self._class_row(conn, class_id)
            conn.execute("UPDATE classes SET description = ? WHERE id = ?", (description, row["id"]))
            self._touch(conn, row["project_id"])
            row = self._class_row(conn, row["id"])
        return self._class(row)

    def delete_class(self, class_id: int, *, delete_images: bool = False) -> int:
        """Delete a class.  By default its images move to the unlabeled pool (nothing the
        user uploaded is lost); with ``delete_images=True`` they are deleted instead.
        Predictions naming the class keep their row with ``label=None``.  Returns the number
        of images moved or deleted."""
        with self._lock:
            with self._tx() as conn:
                row = self._class_row(conn, class_id)
                cid, pid = row["id"], row["project_id"]
                digests = [r[0] for r in conn.execute("SELECT hash FROM images WHERE class_id = ?", (cid,))]
                if delete_images:
                    conn.execute("DELETE FROM images WHERE class_id = ?", (cid,))
                else:
                    conn.execute("UPDATE images SET class_id = NULL, labeled_by = NULL WHERE class_id = ?", (cid,))
                conn.execute("DELETE FROM classes WHERE id = ?", (cid,))
                self._renumber(conn, pid)
                self._touch(conn, pid)
            if delete_images:
                self._release_blobs(digests)
        return len(digests)

    def _renumber(self, conn: sqlite3.Connection, project_id: int) -> None:
        order = [r[0] for r in conn.execute(
            "SELECT id FROM classes WHERE project_id = ? ORDER BY position, id", (project_id,))]
        conn.executemany("UPDATE classes SET position = ? WHERE id = ?", [(i, cid) for i, cid in enumerate(order)])

    def class_counts(self, project_id: int) -> dict[int | None, int]:
        """Images per class id (every class, zeros included) and in the pool (key ``None``)."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            counts: dict[int | None, int] = {r[0]: 0 for r in conn.execute(
                "SELECT id FROM classes WHERE project_id = ? ORDER BY position, id", (pid,))}
            counts[None] = 0
            for cid, n in conn.execute(
                    "SELECT class_id, COUNT(*) FROM images WHERE project_id = ? GROUP BY class_id", (pid,)):
                counts[cid] = n
        return counts

    # ----------------------------------------------------------------- images

    @staticmethod
    def _labeled_by(class_id: int | None, labeled_by: str | None) -> str | None:
        if class_id is None:
            return None
        if labeled_by is None:
            labeled_by = "user"
        if labeled_by not in LABELED_BY:
            raise ValidationError(f"labeled_by must be 'user', 'accepted' or 'corrected', not {labeled_by!r}.")
        return labeled_by

    def add_images(self, project_id: int, items: Iterable[tuple[str, bytes | str | os.PathLike]],
                   class_id: int | None = None, labeled_by: str | None = "user"
                   ) -> tuple[list[ImageInfo], list[str]]:
        """Store uploads in a class (or, with ``class_id=None``, the unlabeled pool).

        ``items`` are ``(file name, bytes or path)`` pairs.  Every item is untrusted: its
        content must decode as an image (:mod:`imageio`), else it is skipped with one
        sentence naming the file and the reason, and the other items are still stored.
        Returns ``(stored images in input order, error sentences)``.  Bytes already in the
        same project with the same label are not added twice: the existing image is
        returned.  The same bytes in another class or project share one file.  All the
        good items are stored in one transaction, one upload in memory at a time
        (:class:`ImageImport`, which also counts duplicates).
        """
        labeled_by = self._labeled_by(class_id, labeled_by)
        if class_id is not None:
            class_id = _check_id(class_id, "class")
        errors: list[str] = []
        with self.begin_import(project_id) as batch:
            if class_id is not None:
                batch.check_class(class_id)  # fail fast before decoding a large batch
            for position, item in enumerate(items, 1):
                try:
                    raw_name, source = item
                except (TypeError, ValueError):
                    errors.append(f"Upload #{position} was skipped: expected a (file name, data) pair.")
                    continue
                error = batch.add(raw_name, source, class_id, labeled_by, position=position)
                if error:
                    errors.append(error)
            if not batch.staged:
                return [], errors
            result = batch.commit()
        return result.images, errors

    def get_image(self, image_id: int) -> ImageInfo:
        with self._read() as conn:
            return self._image(self._image_row(conn, image_id))

    def list_images(self, project_id: int, class_id: int | None = None, pool: bool = False) -> list[ImageInfo]:
        """The project's images in upload order: all of them, one class's (``class_id``),
        or the unlabeled pool's (``pool=True``)."""
        if pool and class_id is not None:
            raise ValidationError("Ask for either one class's images or the unlabeled pool, not both.")
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            if pool:
                rows = conn.execute("SELECT * FROM images WHERE project_id = ? AND class_id IS NULL ORDER BY id",
                                    (pid,)).fetchall()
            elif class_id is not None:
                cid = self._class_row(conn, class_id, pid)["id"]
                rows = conn.execute("SELECT * FROM images WHERE class_id = ? ORDER BY id", (cid,)).fetchall()
            else:
                rows = conn.execute("SELECT * FROM images WHERE project_id = ? ORDER BY id", (pid,)).fetchall()
        return [self._image(r) for r in rows]

    def move_images(self, assignments: Iterable[tuple[int, int | None]], labeled_by: str | None = "user"
                    ) -> list[ImageInfo]:
        """Relabel images in one transaction: each ``(image_id, class_id)`` puts the image in
        that class (of the image's own project) or, for ``None``, back in the pool.  Use
        ``labeled_by='accepted'``/``'corrected'`` when confirming predictions in bulk.  All or
        nothing: one unknown id changes no image."""
        pairs = [(_check_id(i, "image"), None if c is None else _check_id(c, "class")) for i, c in assignments]
        if pairs and labeled_by is not None and labeled_by not in LABELED_BY:
            raise ValidationError(f"labeled_by must be 'user', 'accepted' or 'corrected', not {labeled_by!r}.")
        out: list[int] = []
        with self._tx() as conn:
            touched: set[int] = set()
            for image_id, class_id in pairs:
                row = self._image_row(conn, image_id)
                if class_id is not None:
                    self._class_row(conn, class_id, row["project_id"])
                conn.execute("UPDATE images SET class_id = ?, labeled_by = ? WHERE id = ?",
                             (class_id, self._labeled_by(class_id, labeled_by), image_id))
                touched.add(row["project_id"])
                out.append(image_id)
            now = time.time()
            for pid in touched:
                self._touch(conn, pid, now)
            rows = [self._image_row(conn, i) for i in out]
        return [self._image(r) for r in rows]

    def remove_images(self, image_ids: Iterable[int]) -> int:
        """Delete image rows (all or nothing); files no other row uses are removed."""
        ids = [_check_id(i, "image") for i in image_ids]
        with self._lock:
            with self._tx() as conn:
                digests, touched = [], set()
                for image_id in dict.fromkeys(ids):
                    row = self._image_row(conn, image_id)
                    digests.append(row["hash"])
                    touched.add(row["project_id"])
                    conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
                for pid in touched:
                    self._touch(conn, pid)
            self._release_blobs(digests)
        return len(digests)

    def remove_image(self, image_id: int) -> None:
        self.remove_images([image_id])

    # ------------------------------------------------------- the action log (undo)
    #
    # Undoable removal keeps the removed rows' data (and predictions) in the action's payload
    # and their files on disk (``removed_files``), and an undo re-inserts the rows under their
    # own ids (AUTOINCREMENT never hands an id out twice, so the id is free). The alternative,
    # soft removal (a ``removed_at`` column), would have to be honoured by every query that
    # lists or counts images, support sets, predictions, duplicate checks of an import and
    # exports: a single query that forgot it would train on removed images. Here every existing
    # query stays correct as it is, and only the file release and garbage collection learn
    # that a file named in ``removed_files`` is still needed.

    @staticmethod
    def _action(row: sqlite3.Row, image_ids: Sequence[int] = ()) -> ActionInfo:
        return ActionInfo(row["id"], row["project_id"], row["owner"], row["kind"], row["count"], row["labeled"],
                          row["summary"], row["created"], bool(row["undone"]), row["undoes"], tuple(image_ids))

    def _log(self, conn: sqlite3.Connection, project_id: int, owner: str | None, kind: str, count: int,
             labeled: int, summary: str, payload: Mapping, undoes: int | None = None,
             now: float | None = None) -> int:
        cur = conn.execute(
            "INSERT INTO actions (project_id, owner, kind, count, labeled, summary, created, undoes, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (project_id, owner, kind, count, labeled, str(summary)[:300], now or time.time(), undoes,
             _to_json(payload, "action")))
        return int(cur.lastrowid)

    def label_images(self, project_id: int, assignments: Iterable[tuple[int, int, str]], *, kind: str,
                     owner: str | None = None, summary: str = "") -> ActionInfo:
        """Put pool or labeled images of one project in classes AND log it as one undoable
        action, in ONE transaction: each ``(image_id, class_id, labeled_by)``. The log keeps each
        image's previous and new (class_id, labeled_by), so :meth:`undo_last` restores them
        exactly. ``kind`` is "accept" or "correct". All or nothing: an unknown image or class, or
        one of another project, changes nothing."""
        if kind not in ("accept", "correct"):
            raise ValidationError(f"A labeling action is 'accept' or 'correct', not {kind!r}.")
        items = []
        for item in assignments:
            image_id, class_id, labeled_by = item
            items.append((_check_id(image_id, "image"), _check_id(class_id, "class"),
                          self._labeled_by(_check_id(class_id, "class"), labeled_by)))
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            changes, seen = [], set()
            for image_id, class_id, labeled_by in items:
                if image_id in seen:
                    continue
                seen.add(image_id)
                row = self._image_row(conn, image_id, pid)
                self._class_row(conn, class_id, pid)
                changes.append([image_id, row["class_id"], row["labeled_by"], class_id, labeled_by])
            conn.executemany("UPDATE images SET class_id = ?, labeled_by = ? WHERE id = ?",
                             [(c[3], c[4], c[0]) for c in changes])
            now = time.time()
            labeled = sum(1 for c in changes if c[1] is None)
            aid = self._log(conn, pid, owner, kind, len(changes), labeled, summary, {"images": changes}, now=now)
            self._touch(conn, pid, now)
            row = conn.execute("SELECT * FROM actions WHERE id = ?", (aid,)).fetchone()
        return self._action(row, [c[0] for c in changes])

    def remove_undoably(self, project_id: int, image_ids: Iterable[int], *, owner: str | None = None,
                        summary: str = "") -> ActionInfo:
        """Remove images of one project and log it as one undoable action, in ONE transaction:
        their rows (and predictions) go into the action's payload and their files stay on disk
        until the action is undone (the rows return) or purged (:meth:`collect_garbage`, after
        :data:`REMOVED_KEEP_SECONDS`). All or nothing."""
        ids = list(dict.fromkeys(_check_id(i, "image") for i in image_ids))
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            rows = [dict(self._image_row(conn, i, pid)) for i in ids]
            preds = []
            if ids:
                marks = ",".join("?" * len(ids))
                preds = [list(r) for r in conn.execute(
                    "SELECT image_id, model_id, label, confidence, probs, created FROM predictions "
                    f"WHERE image_id IN ({marks})", ids)]
            now = time.time()
            aid = self._log(conn, pid, owner, "remove", len(rows), 0, summary,
                            {"images": rows, "predictions": preds}, now=now)
            conn.executemany("INSERT OR IGNORE INTO removed_files (action_id, hash) VALUES (?, ?)",
                             [(aid, r["hash"]) for r in rows])
            conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
            self._touch(conn, pid, now)
            row = conn.execute("SELECT * FROM actions WHERE id = ?", (aid,)).fetchone()
        return self._action(row, ids)

    def undo_last(self, project_id: int, owner: str | None = None, summary: str = ""
                  ) -> tuple[ActionInfo, ActionInfo] | None:
        """Reverse ``owner``'s last action in the project that is not undone (undos themselves
        are not undone: pressing undo twice reverses two actions), in ONE transaction, and log
        the undo; ``(the reversed action, the undo)``, or None when there is nothing to undo.

        Exact: a labeling action puts each image back to its previous (class_id, labeled_by),
        but only an image still in the state the action left it (one changed since, e.g. by
        another member of a shared project, or removed, is left alone and not counted); a
        removal re-inserts the rows under their own ids with their predictions (of models that
        still exist). A class deleted since cannot be restored: such an image returns to the
        pool."""
        with self._lock:
            with self._tx() as conn:
                pid = self._project_row(conn, project_id)["id"]
                row = conn.execute(
                    "SELECT * FROM actions WHERE project_id = ? AND owner IS ? AND undone = 0 AND kind != 'undo' "
                    "ORDER BY id DESC LIMIT 1", (pid, owner)).fetchone()
                if row is None:
                    return None
                payload = json.loads(row["payload"] or "{}")
                classes = {r[0] for r in conn.execute("SELECT id FROM classes WHERE project_id = ?", (pid,))}
                if row["kind"] == "remove":
                    restored = self._restore_removed(conn, pid, payload, classes)
                else:
                    restored = []
                    for image_id, old_c, old_by, new_c, new_by in payload.get("images", []):
                        if old_c is not None and old_c not in classes:
                            old_c, old_by = None, None
                        cur = conn.execute(
                            "UPDATE images SET class_id = ?, labeled_by = ? "
                            "WHERE id = ? AND project_id = ? AND class_id IS ? AND labeled_by IS ?",
                            (old_c, old_by, image_id, pid, new_c, new_by))
                        if cur.rowcount:
                            restored.append(image_id)
                conn.execute("UPDATE actions SET undone = 1 WHERE id = ?", (row["id"],))
                conn.execute("DELETE FROM removed_files WHERE action_id = ?", (row["id"],))
                now = time.time()
                uid = self._log(conn, pid, owner, "undo", len(restored), 0, summary or f"Undid: {row['summary']}",
                                {"undoes": row["id"], "images": restored}, undoes=row["id"], now=now)
                self._touch(conn, pid, now)
                original = conn.execute("SELECT * FROM actions WHERE id = ?", (row["id"],)).fetchone()
                undo = conn.execute("SELECT * FROM actions WHERE id = ?", (uid,)).fetchone()
        ids = [c[0] for c in payload.get("images", [])] if row["kind"] != "remove" else \
            [r["id"] for r in payload.get("images", [])]
        return self._action(original, ids), self._action(undo, restored)

    def _restore_removed(self, conn: sqlite3.Connection, pid: int, payload: Mapping, classes: set) -> list[int]:
        """Re-insert a removal's rows (their own ids, files kept on disk) and predictions."""
        restored = []
        for r in payload.get("images", []):
            r = dict(r)
            if r.get("project_id") != pid or not _blob_path(self.root, r["hash"]).is_file():
                continue  # the file is gone (removed by hand): nothing to bring back
            if r.get("class_id") is not None and r["class_id"] not in classes:
                r["class_id"], r["labeled_by"] = None, None
            cols = ", ".join(r)
            cur = conn.execute(f"INSERT OR IGNORE INTO images ({cols}) VALUES ({', '.join('?' * len(r))})",
                               list(r.values()))
            if cur.rowcount:
                restored.append(r["id"])
        back = set(restored)
        models = {m[0] for m in conn.execute("SELECT id FROM models WHERE project_id = ?", (pid,))}
        conn.executemany(
            "INSERT OR IGNORE INTO predictions (image_id, model_id, label, confidence, probs, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(i, m, lab if lab in classes else None, c, probs, t)
             for i, m, lab, c, probs, t in payload.get("predictions", []) if i in back and m in models])
        return restored

    def list_actions(self, project_id: int, limit: int = 20, owner: str | None = None,
                     everyone: bool = True) -> list[ActionInfo]:
        """The project's last logged actions, newest first (only ``owner``'s unless ``everyone``)."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            sql = "SELECT * FROM actions WHERE project_id = ?" + ("" if everyone else " AND owner IS ?")
            args = (pid,) if everyone else (pid, owner)
            rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, max(0, int(limit)))).fetchall()
        return [self._action(r) for r in rows]

    def labeled_since(self, project_id: int, since: float) -> int:
        """Images put in a class by logged accept/correct actions since ``since`` (unix time),
        net of undo (an undone action does not count)."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            n = conn.execute(
                "SELECT COALESCE(SUM(labeled), 0) FROM actions WHERE project_id = ? AND undone = 0 "
                "AND kind IN ('accept', 'correct') AND created >= ?", (pid, float(since))).fetchone()[0]
        return int(n)

    def prediction_table(self, model_id: int, pool_only: bool = True) -> dict[str, Any]:
        """A model's predictions (of the images still in the unlabeled pool, or of every image
        of the project) as columns, for ranking a whole pool at once (the station's queue), each
        a list in the same order:
        "image_id", "label" (class id, -1 when its class was deleted), "confidence", "probs" (the
        stored JSON texts, for one ``json.loads`` of them all), "name" and "hash".
        One query; image id order."""
        with self._read() as conn:
            mid = self._model_row(conn, model_id)["id"]
            rows = conn.execute(
                "SELECT predictions.image_id, predictions.label, predictions.confidence, predictions.probs, "
                "images.original_name, images.hash FROM predictions JOIN images ON images.id = predictions.image_id "
                "WHERE predictions.model_id = ?" + (" AND images.class_id IS NULL" if pool_only else "") +
                " ORDER BY predictions.image_id", (mid,)).fetchall()
        cols = list(zip(*rows)) if rows else [()] * 6
        return {"image_id": list(cols[0]), "label": [-1 if x is None else x for x in cols[1]],
                "confidence": list(cols[2]), "probs": list(cols[3]), "name": list(cols[4]), "hash": list(cols[5])}

    def prediction_stamp(self, model_id: int) -> tuple[int, float]:
        """(how many predictions the model has, when the last was written): it changes whenever
        they are saved, deleted with their images, or brought back by an undo, so a reader may
        keep a parsed copy while the stamp stays the same."""
        with self._read() as conn:
            n, t = conn.execute("SELECT COUNT(*), MAX(created) FROM predictions WHERE model_id = ?",
                                (_check_id(model_id, "model"),)).fetchone()
        return int(n), float(t or 0.0)

    def pool_ids(self, project_id: int) -> list[int]:
        """The ids of the project's images in the unlabeled pool, in upload order."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            return [r[0] for r in conn.execute(
                "SELECT id FROM images WHERE project_id = ? AND class_id IS NULL ORDER BY id", (pid,))]

    def predictions_of(self, model_id: int, image_ids: Iterable[int]) -> dict[int, PredictionInfo]:
        """A model's predictions of these images only ({image id: prediction}; images it has not
        predicted are absent): what accepting a few predictions needs, without reading the other
        10,000 (`list_predictions` parses every row's probabilities: ~40 ms per 1,000 rows)."""
        ids = [_check_id(i, "image") for i in image_ids]
        out: dict[int, PredictionInfo] = {}
        with self._read() as conn:
            mid = self._model_row(conn, model_id)["id"]
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                chunk = ids[start:start + 500]
                for r in conn.execute(f"SELECT * FROM predictions WHERE model_id = ? AND image_id IN "
                                      f"({','.join('?' * len(chunk))})", (mid, *chunk)):
                    out[r["image_id"]] = self._prediction(r)
        return out

    def set_model_metrics(self, model_id: int, metrics: Mapping) -> ModelInfo:
        """Merge ``metrics`` into a model's stored metrics (e.g. a cross-validated accuracy
        measured after it was registered)."""
        with self._tx() as conn:
            row = self._model_row(conn, model_id)
            merged = {**json.loads(row["metrics"] or "{}"), **dict(metrics)}
            conn.execute("UPDATE models SET metrics = ? WHERE id = ?", (_to_json(merged, "metrics"), row["id"]))
            row = self._model_row(conn, row["id"])
        return self._model(row)

    def support_set(self, project_id: int) -> SupportSet:
        """The labelled examples: classes in position order (label = index), their
        descriptions, and every labelled image ordered by class then upload order.
        Raises :class:`~fewshot_studio.errors.DataError` if the project has no class."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            classes = conn.execute("SELECT * FROM classes WHERE project_id = ? ORDER BY position, id",
                                   (pid,)).fetchall()
            rows = conn.execute(
                "SELECT images.*, classes.position AS pos FROM images JOIN classes ON images.class_id = classes.id "
                "WHERE images.project_id = ? ORDER BY classes.position, classes.id, images.id", (pid,)).fetchall()
        index = {c["id"]: i for i, c in enumerate(classes)}
        images = [self._image(r).ref() for r in rows]
        labels = [index[r["class_id"]] for r in rows]
        return SupportSet([c["name"] for c in classes], images, labels, [c["description"] for c in classes])

    # ----------------------------------------------------------------- models

    def register_model(self, project_id: int, method: str, backbone_id: str, config: Mapping | None,
                       metrics: Mapping | None, source_dir: str | os.PathLike, status: str = "ready",
                       current: bool = True) -> ModelInfo:
        """Move the finished model directory ``source_dir`` to ``root/models/<id>/`` and record it
        (and make it the project's current model, unless ``current`` is False).

        The directory is renamed into place (copied first only if it lives on another
        filesystem) and the row committed in one transaction; if anything fails the row is
        rolled back and the directory moved back to ``source_dir``, so neither a model row
        without its directory nor a half-written directory is ever visible.
        """
        for value, what in ((method, "method"), (backbone_id, "backbone")):
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"A model needs a {what} name.")
        config_json, metrics_json = _to_json(config, "model config"), _to_json(metrics, "model metrics")
        source = Path(source_dir)
        if not source.is_dir():
            raise NotFoundError(f"The model folder {source} does not exist or is not a folder.")
        models_dir = self.root / "models"
        with self._lock:
            moved: tuple[Path, bool] | None = None  # (target, copied)
            try:
                with self._tx() as conn:
                    pid = self._project_row(conn, project_id)["id"]
                    cur = conn.execute(
                        "INSERT INTO models (project_id, method, backbone_id, config, metrics, weights_path, status, "
                        "created) VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                        (pid, method.strip(), backbone_id.strip(), config_json, metrics_json, status, time.time()))
                    model_id = cur.lastrowid
                    rel = f"models/{model_id}"
                    target = self.root / rel
                    if target.exists():  # left by a crash before a commit: no row can own it
                        shutil.rmtree(target)
                    moved = (target, self._move_dir(source, target, models_dir))
                    conn.execute("UPDATE models SET weights_path = ? WHERE id = ?", (rel, model_id))
                    # a model just trained or imported is the one the user wants to use next
                    if current:
                        conn.execute("INSERT OR REPLACE INTO current_models (project_id, model_id) VALUES (?, ?)",
                                     (pid, model_id))
                    self._touch(conn, pid)
                    row = self._model_row(conn, model_id)
            except BaseException:
                if moved is not None:
                    target, copied = moved
                    try:
                        if copied:
                            shutil.rmtree(target)
                        else:
                            os.rename(target, source)
                    except OSError:
                        shutil.rmtree(target, ignore_errors=True)
                raise
            if moved[1]:
                shutil.rmtree(source, ignore_errors=True)
            _fsync_dir(models_dir)
        return self._model(row)

    @staticmethod
    def _move_dir(source: Path, target: Path, models_dir: Path) -> bool:
        """Rename ``source`` to ``target`` atomically; True if it had to be copied (another
        filesystem: copied to a hidden staging folder, then renamed into place)."""
        try:
            os.rename(source, target)
            return False
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise StoreError(f"The model folder {source} could not be moved into the data folder "
                                 f"({e.strerror or type(e).__name__}).") from None
        staging = models_dir / f".staging-{uuid.uuid4().hex}"
        try:
            shutil.copytree(source, staging)
            os.rename(staging, target)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"The model folder {source} could not be copied into the data folder "
                             f"({e.strerror or type(e).__name__}).") from None
        return True

    def get_model(self, model_id: int) -> ModelInfo:
        with self._read() as conn:
            return self._model(self._model_row(conn, model_id))

    def list_models(self, project_id: int) -> list[ModelInfo]:
        """The project's models, newest first."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            rows = conn.execute("SELECT * FROM models WHERE project_id = ? ORDER BY id DESC", (pid,)).fetchall()
        return [self._model(r) for r in rows]

    def current_model(self, project_id: int) -> ModelInfo | None:
        """The model the project uses: the one set by :meth:`set_current_model` (or the last
        registered), else the newest; None when the project has no model."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            row = conn.execute("SELECT m.* FROM current_models c JOIN models m ON m.id = c.model_id "
                               "WHERE c.project_id = ?", (pid,)).fetchone()
            if row is None:
                row = conn.execute("SELECT * FROM models WHERE project_id = ? ORDER BY id DESC LIMIT 1",
                                   (pid,)).fetchone()
        return None if row is None else self._model(row)

    def set_current_model(self, project_id: int, model_id: int) -> ModelInfo:
        """Make one of the project's models the one it uses."""
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            row = self._model_row(conn, model_id)
            if row["project_id"] != pid:
                raise NotFoundError(f"There is no model with id {model_id} in this project.")
            conn.execute("INSERT OR REPLACE INTO current_models (project_id, model_id) VALUES (?, ?)",
                         (pid, row["id"]))
            self._touch(conn, pid)
        return self._model(row)

    def delete_model(self, model_id: int) -> None:
        """Delete the model row, its predictions and its directory (jobs keep ``model_id=None``)."""
        with self._lock:
            with self._tx() as conn:
                row = self._model_row(conn, model_id)
                conn.execute("DELETE FROM models WHERE id = ?", (row["id"],))
                self._touch(conn, row["project_id"])
            self._remove_model_dir(row["weights_path"])

    # ------------------------------------------------------------ predictions

    def save_predictions(self, model_id: int,
                         predictions: Iterable[tuple[int, int | None, float, Mapping[int, float] | Sequence[float]]],
                         *, skip_missing: bool = False) -> int:
        """Store ``(image_id, label class id, confidence, probs)`` rows for a model,
        replacing earlier predictions of that model for those images.  ``probs`` is
        ``{class id: probability}`` (or a list).  All or nothing.  Returns the count.
        ``skip_missing`` leaves out images no longer in the model's project (removed while a
        labeling job scored them) instead of failing."""
        with self._tx() as conn:
            model = self._model_row(conn, model_id)
            pid = model["project_id"]
            class_ids = {r[0] for r in conn.execute("SELECT id FROM classes WHERE project_id = ?", (pid,))}
            now, rows = time.time(), []
            for item in predictions:
                try:
                    image_id, label, confidence, probs = item
                except (TypeError, ValueError):
                    raise ValidationError("Each prediction must be (image id, class id, confidence, probabilities).") \
                        from None
                try:
                    image_id = self._image_row(conn, image_id, pid)["id"]
                except NotFoundError:
                    if skip_missing:
                        continue
                    raise
                if label is not None:
                    label = _check_id(label, "class")
                    if label not in class_ids:
                        raise NotFoundError(f"There is no class with id {label} in this project.")
                try:
                    confidence = float(confidence)
                except (TypeError, ValueError):
                    confidence = math.nan
                if not 0.0 <= confidence <= 1.0:
                    raise ValidationError(f"A confidence must be between 0 and 1, not {confidence!r}.")
                if isinstance(probs, Mapping):
                    probs = {str(_check_id(k, "class")): float(v) for k, v in probs.items()}
                elif probs is not None:
                    probs = [float(v) for v in probs]
                rows.append((image_id, model["id"], label, confidence, _to_json(probs, "probabilities"), now))
            conn.executemany(
                "INSERT OR REPLACE INTO predictions (image_id, model_id, label, confidence, probs, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def list_predictions(self, model_id: int, *, pool_only: bool = False) -> list[PredictionInfo]:
        """A model's predictions, least confident first (active learning order);
        ``pool_only`` keeps those of images still in the unlabeled pool."""
        with self._read() as conn:
            mid = self._model_row(conn, model_id)["id"]
            sql = ("SELECT predictions.* FROM predictions JOIN images ON images.id = predictions.image_id "
                   "WHERE predictions.model_id = ?")
            if pool_only:
                sql += " AND images.class_id IS NULL"
            rows = conn.execute(sql + " ORDER BY predictions.confidence, predictions.image_id", (mid,)).fetchall()
        return [self._prediction(r) for r in rows]

    def pool_prediction_page(self, model_id: int, offset: int = 0, limit: int = 200
                             ) -> tuple[list[tuple[PredictionInfo, ImageInfo]], int]:
        """One page of a model's predictions of images still in the unlabeled pool, least
        confident first (as `list_predictions(pool_only=True)`), each with its image; and how
        many such predictions there are in all.  SQL orders and cuts the page (the
        ``predictions_model (model_id, confidence)`` index walks them in order), so a call costs
        the page, not the pool: with 10,000 scored pool images, a 200-row page takes a few ms."""
        offset, limit = max(0, int(offset)), max(0, int(limit))
        with self._read() as conn:
            mid = self._model_row(conn, model_id)["id"]
            where = ("FROM predictions JOIN images ON images.id = predictions.image_id "
                     "WHERE predictions.model_id = ? AND images.class_id IS NULL")
            total = conn.execute("SELECT COUNT(*) " + where, (mid,)).fetchone()[0]
            rows = conn.execute(
                "SELECT predictions.image_id, predictions.model_id, predictions.label, predictions.confidence, "
                "predictions.probs, predictions.created AS p_created, images.* " + where +
                " ORDER BY predictions.confidence, predictions.image_id LIMIT ? OFFSET ?",
                (mid, limit, offset)).fetchall()
        page = []
        for r in rows:
            probs = json.loads(r["probs"])
            if isinstance(probs, dict):
                probs = {int(k): v for k, v in probs.items()}
            page.append((PredictionInfo(r["image_id"], r["model_id"], r["label"], r["confidence"], probs,
                                        r["p_created"]), self._image(r)))
        return page, total

    def in_pool(self, project_id: int, image_ids: Iterable[int]) -> set[int]:
        """Which of these images are still in the project's unlabeled pool (not removed, not
        labeled since): a labeling job asks before each chunk, as the review runs beside it."""
        ids = [_check_id(i, "image") for i in image_ids]
        out: set[int] = set()
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            for k in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[k:k + 500]
                out.update(r[0] for r in conn.execute(
                    f"SELECT id FROM images WHERE project_id = ? AND class_id IS NULL AND id IN "
                    f"({','.join('?' * len(part))})", (pid, *part)))
        return out

    def unscored_pool_images(self, project_id: int, model_id: int | None, limit: int) -> list[ImageInfo]:
        """Up to ``limit`` images of the unlabeled pool that ``model_id`` has not predicted (all
        pool images for ``None``), in upload order: what a paged pool view shows after the
        scored ones."""
        with self._read() as conn:
            pid = self._project_row(conn, project_id)["id"]
            if model_id is None:
                rows = conn.execute("SELECT * FROM images WHERE project_id = ? AND class_id IS NULL "
                                    "ORDER BY id LIMIT ?", (pid, max(0, int(limit)))).fetchall()
            else:
                mid = self._model_row(conn, model_id)["id"]
                rows = conn.execute(
                    "SELECT * FROM images WHERE project_id = ? AND class_id IS NULL AND NOT EXISTS "
                    "(SELECT 1 FROM predictions WHERE predictions.image_id = images.id AND predictions.model_id = ?) "
                    "ORDER BY id LIMIT ?", (pid, mid, max(0, int(limit)))).fetchall()
        return [self._image(r) for r in rows]

    # ------------------------------------------------------------------- jobs

    def create_job(self, project_id: int, kind: str, *, status: str = "queued", message: str = "",
                   progress: Mapping | None = None, model_id: int | None = None) -> JobInfo:
        if not isinstance(kind, str) or not kind.strip():
            raise ValidationError("A job needs a kind (for example 'train').")
        if status not in JOB_STATUSES:
            raise ValidationError(f"A job status must be one of {', '.join(JOB_STATUSES)}, not {status!r}.")
        progress_json = _to_json(progress, "job progress")
        now = time.time()
        with self._tx() as conn:
            pid = self._project_row(conn, project_id)["id"]
            if model_id is not None:
                model_id = self._model_row(conn, model_id)["id"]
            cur = conn.execute(
                "INSERT INTO jobs (project_id, kind, status, message, progress, model_id, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, kind.strip(), status, str(message or ""), progress_json, model_id, now, now))
            row = self._job_row(conn, cur.lastrowid)
        return self._job(row)

    def update_job(self, job_id: int, *, status: str | None = None, message: str | None = None,
                   progress: Mapping | None = None, model_id: int | None = None) -> JobInfo:
        """Change what is given (``None`` leaves a field as it is; ``progress`` replaces the
        whole dict).  A finished job (done/failed/cancelled) keeps its status:
        changing it raises :class:`JobFinishedError`."""
        if status is not None and status not in JOB_STATUSES:
            raise ValidationError(f"A job status must be one of {', '.join(JOB_STATUSES)}, not {status!r}.")
        progress_json = None if progress is None else _to_json(progress, "job progress")
        with self._tx() as conn:
            row = self._job_row(conn, job_id)
            if status is not None and status != row["status"] and row["status"] in _JOB_FINISHED:
                raise JobFinishedError(f"Job {row['id']} has already finished ({row['status']}); "
                                       "its status cannot change.")
            if model_id is not None:
                model_id = self._model_row(conn, model_id)["id"]
            conn.execute(
                "UPDATE jobs SET status = COALESCE(?, status), message = COALESCE(?, message), "
                "progress = COALESCE(?, progress), model_id = COALESCE(?, model_id), updated = ? WHERE id = ?",
                (status, None if message is None else str(message), progress_json, model_id, time.time(), row["id"]))
            row = self._job_row(conn, row["id"])
        return self._job(row)

    def get_job(self, job_id: int) -> JobInfo:
        with self._read() as conn:
            return self._job(self._job_row(conn, job_id))

    def list_jobs(self, project_id: int | None = None, status: str | Iterable[str] | None = None) -> list[JobInfo]:
        """Jobs, newest first; optionally one project's and/or with the given status(es)."""
        sql, args = "SELECT * FROM jobs WHERE 1", []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = [s for s in statuses if s not in JOB_STATUSES]
            if bad:
                raise ValidationError(f"A job status must be one of {', '.join(JOB_STATUSES)}, not {bad[0]!r}.")
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += statuses
        with self._read() as conn:
            if project_id is not None:
                sql += " AND project_id = ?"
                args.append(self._project_row(conn, project_id)["id"])
            rows = conn.execute(sql + " ORDER BY id DESC", args).fetchall()
        return [self._job(r) for r in rows]

    def mark_interrupted_jobs(self, reason: str = INTERRUPTED, queued_reason: str = INTERRUPTED_QUEUED) -> int:
        """Mark every running job failed with ``reason`` and every queued one with
        ``queued_reason`` (call once on start-up, before any job runs); finished jobs keep
        their status and message.  Returns how many jobs were marked."""
        def sentence(text: str) -> str:
            text = text.strip()
            if text:
                text = text[0].upper() + text[1:]
                if text[-1] not in ".!?":
                    text += "."
            return text

        now = time.time()
        with self._tx() as conn:
            n = conn.execute("UPDATE jobs SET status = 'failed', message = ?, updated = ? WHERE status = 'running'",
                             (sentence(reason), now)).rowcount
            return n + conn.execute("UPDATE jobs SET status = 'failed', message = ?, updated = ? "
                                    "WHERE status = 'queued'", (sentence(queued_reason), now)).rowcount

    # ------------------------------------------------------------ maintenance

    def check_integrity(self) -> list[str]:
        """Problems found (empty when healthy): SQLite's integrity and foreign-key checks,
        image rows whose file is missing, and model rows whose directory is missing."""
        problems: list[str] = []
        with self._read() as conn:
            problems += [r[0] for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"A row of {r[0]} points at a missing row of {r[2]}."
                         for r in conn.execute("PRAGMA foreign_key_check")]
            digests = [r[0] for r in conn.execute("SELECT DISTINCT hash FROM images")]
            model_dirs = [(r[0], r[1]) for r in conn.execute("SELECT id, weights_path FROM models")]
        problems += [f"The image file {d} is missing." for d in digests if not _blob_path(self.root, d).is_file()]
        problems += [f"The directory of model {mid} is missing." for mid, rel in model_dirs
                     if rel and not (self.root / rel).is_dir()]
        return problems

    def collect_garbage(self) -> dict[str, int]:
        """Delete what a crash can leave behind: image files no row references, temporary
        files, and model directories no row owns; and the files of removals older than
        :data:`REMOVED_KEEP_SECONDS` (their undo is no longer offered).  Run it only while no other process is
        writing to this data folder.  Returns counts of what was removed."""
        removed = {"images": 0, "temporary": 0, "models": 0}
        staging = self.root / "staging"
        with self._lock:
            with self._tx() as conn:  # removals older than REMOVED_KEEP_SECONDS can no longer be undone
                conn.execute("DELETE FROM actions WHERE kind = 'remove' AND undone = 0 AND created < ?",
                             (time.time() - REMOVED_KEEP_SECONDS,))
            with self._read() as conn:
                digests = {r[0] for r in conn.execute("SELECT DISTINCT hash FROM images")}
                digests |= {r[0] for r in conn.execute("SELECT DISTINCT hash FROM removed_files")}
                model_dirs = {r[0] for r in conn.execute("SELECT weights_path FROM models") if r[0]}
            for sub in (self.root / "images").iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    try:
                        if f.name.startswith(".tmp-"):
                            f.unlink()
                            removed["temporary"] += 1
                        elif f.name not in digests:
                            f.unlink()
                            removed["images"] += 1
                    except OSError:
                        pass
            for d in (self.root / "models").iterdir():
                if f"models/{d.name}" in model_dirs:
                    continue
                if d.name.startswith(".staging-"):
                    removed["temporary"] += 1
                elif d.name.isdigit():
                    removed["models"] += 1
                else:
                    continue
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
            for d in staging.iterdir() if staging.is_dir() else ():
                if _staging_locked(d):
                    continue  # a live import in another process
                removed["temporary"] += 1
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
        return removed


def _lock_staging(folder: Path) -> int | None:
    """Create and lock ``folder/.lock``; the open descriptor keeps the lock (None without flock)."""
    if fcntl is None:
        return None
    fd = os.open(folder / _STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _staging_locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s staging lock."""
    if fcntl is None or folder.is_symlink() or not folder.is_dir():
        return False
    try:
        fd = os.open(folder / _STAGING_LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held: its import is running
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _staging_is_stale(folder: Path) -> bool:
    if _staging_locked(folder):
        return False
    if fcntl is not None and not folder.name.startswith(".") and (folder / _STAGING_LOCK).is_file():
        return True  # locked from birth (see staging_folder) and no longer: its process is gone
    try:
        age = time.time() - folder.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_STAGING_SECONDS


@dataclass(frozen=True)
class ImportResult:
    """What :meth:`ImageImport.commit` stored: one image per staged upload, in order (the
    existing image for a duplicate); ``added`` rows were new, ``duplicates`` were already
    in the project with that label (or repeated within the import)."""

    images: list[ImageInfo]
    added: int
    duplicates: int
    classes_created: list[str] = field(default_factory=list)


class ImageImport:
    """Uploads staged on disk, then stored in ONE transaction: all of them or none.

    Made by :meth:`ProjectStore.begin_import`; use it as a context manager.  :meth:`add`
    judges one upload by its content (decoding it outside the store's lock) and writes
    its bytes to a private, locked staging folder, so an import holds one upload in
    memory at a time however many it has.  :meth:`commit` moves the staged files into
    the store, creates the named classes and inserts every row in one transaction.  A
    kill or crash before the commit changes nothing in the project: it leaves only the
    staging folder, which :meth:`ProjectStore.clean_staging` removes at the next start
    (and a crash during the commit at worst unreferenced files, see
    :meth:`ProjectStore.collect_garbage`).
    """

    def __init__(self, store: ProjectStore, project_id: int):
        self.store = store
        self.project_id = project_id
        self._folder_cm = store.staging_folder("import")
        self.folder = self._folder_cm.__enter__()
        # (name, digest, width, height, target, labeled_by): a few hundred bytes per upload
        self._items: list[tuple[str, str, int, int, int | str | None, str | None]] = []
        self._checked: set[int] = set()
        self._closed = False
        # the staged files' fsyncs, run beside the decoding; commit waits for them all
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future] = []

    def __enter__(self) -> "ImageImport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop what is staged (after :meth:`commit`, the files are already moved)."""
        if not self._closed:
            self._closed = True
            self._stop_syncing()
            self._folder_cm.__exit__(None, None, None)

    def _stop_syncing(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown(wait=True, cancel_futures=True)
            self._syncer = None

    @property
    def staged(self) -> int:
        """Uploads staged so far (accepted by content, not yet committed)."""
        return len(self._items)

    def check_class(self, class_id: int) -> int:
        """``class_id`` if it is a class of this project, else NotFoundError."""
        class_id = _check_id(class_id, "class")
        if class_id not in self._checked:
            with self.store._read() as conn:
                self.store._class_row(conn, class_id, self.project_id)
            self._checked.add(class_id)
        return class_id

    def add(self, name: object, source: bytes | str | os.PathLike, target: int | str | None = None,
            labeled_by: str | None = "user", position: int | None = None) -> str | None:
        """Stage one upload: ``target`` is a class id, a class NAME (made at commit unless the
        project has it, ignoring case) or None (the unlabeled pool).  Returns None if it was
        staged, else one sentence naming the file and why it was refused."""
        if self._closed:
            raise StoreError("This import is finished; begin another one.")
        if isinstance(target, str):
            target = check_class_name(target)
        elif target is not None:
            target = self.check_class(target)
        labeled_by = self.store._labeled_by(None if target is None else 0, labeled_by)
        name = _clean_file_name(name, position or len(self._items) + 1)
        try:
            data, name = imageio.read_bytes(source, name)
            image = imageio.decode_image(data, name, draft_size=_VALIDATE_DRAFT)
            width, height = image.size
            image.close()
            del image
        except imageio.ImageError as e:
            return str(e)
        except TypeError:
            return f"{name}: the upload is neither file data nor a file path."
        digest = imageio.content_hash(data)
        staged = self.folder / digest
        if not staged.exists():
            self._stage(staged, data)
        self._items.append((name, digest, width, height, target, labeled_by))
        return None

    def _stage(self, path: Path, data: bytes) -> None:
        """Write one accepted upload into the staging folder; its fsync runs on a helper thread
        (STAGE_SYNC_THREADS) and `commit` waits for every one before a row can refer to it."""
        try:
            _write_atomic(path, data, sync=False)
        except OSError as e:
            raise self._staging_error(e) from None
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(STAGE_SYNC_THREADS, thread_name_prefix="stage-fsync")
        self._syncs.append(self._syncer.submit(_fsync_file, path))

    @staticmethod
    def _staging_error(e: OSError) -> StoreError:
        return StoreError(f"An upload could not be staged in the data folder ({e.strerror or type(e).__name__}); "
                          "check the free disk space and permissions; nothing was imported.")

    def _synced(self) -> None:
        """Wait until every staged file is durable (one sentence if an fsync failed)."""
        try:
            for f in self._syncs:
                f.result()
        except OSError as e:
            raise self._staging_error(e) from None
        finally:
            self._stop_syncing()
        self._syncs.clear()

    def commit(self) -> ImportResult:
        """Store everything staged in one transaction and return what was stored."""
        if self._closed:
            raise StoreError("This import is finished; begin another one.")
        store, pid = self.store, self.project_id
        moved: list[str] = []
        created: list[str] = []
        self._synced()  # the files are durable before the rows that refer to them
        with store._lock:
            try:
                with store._tx() as conn:
                    store._project_row(conn, pid)  # the project may have gone meanwhile
                    class_ids: dict[int | str | None, int | None] = {None: None}
                    for *_, target, _lb in self._items:
                        if target in class_ids:
                            continue
                        if isinstance(target, int):
                            class_ids[target] = store._class_row(conn, target, pid)["id"]
                            continue
                        row = conn.execute("SELECT id FROM classes WHERE project_id = ? AND name_key = ?",
                                           (pid, _name_key(target))).fetchone()
                        if row is None:
                            position = conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM classes "
                                                    "WHERE project_id = ?", (pid,)).fetchone()[0]
                            cur = conn.execute(
                                "INSERT INTO classes (project_id, name, name_key, description, position, created) "
                                "VALUES (?, ?, ?, '', ?, ?)", (pid, target, _name_key(target), position, time.time()))
                            created.append(target)
                            class_ids[target] = cur.lastrowid
                        else:
                            class_ids[target] = row[0]
                    now = time.time()
                    ids: list[int] = []
                    added = 0
                    dirs: set[Path] = set()
                    for name, digest, width, height, target, labeled_by in self._items:
                        class_id = class_ids[target]
                        if self._place(digest):
                            moved.append(digest)
                            dirs.add(_blob_path(store.root, digest).parent)
                        # `+class_id`: look the hash up (images_project_hash); SQLite chose the
                        # (project, class) index instead, a scan of the whole pool per upload
                        # (10,000 pool images: 1.3 ms a row, 12 of a zip upload's 41 s)
                        row = conn.execute("SELECT id FROM images WHERE project_id = ? AND hash = ? AND +class_id IS ? "
                                           "ORDER BY id LIMIT 1", (pid, digest, class_id)).fetchone()
                        if row is not None:
                            ids.append(row[0])
                            continue
                        cur = conn.execute(
                            "INSERT INTO images (project_id, hash, original_name, class_id, labeled_by, width, height, "
                            "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (pid, digest, name, class_id, labeled_by if class_id is not None else None,
                             width, height, now))
                        ids.append(cur.lastrowid)
                        added += 1
                    store._touch(conn, pid, now)
                    for d in dirs:  # the renames are durable before the rows that need them
                        _fsync_dir(d)
                    rows: dict[int, sqlite3.Row] = {}
                    unique = list(dict.fromkeys(ids))
                    for i in range(0, len(unique), 500):
                        chunk = unique[i:i + 500]
                        rows.update((r["id"], r) for r in conn.execute(
                            f"SELECT * FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk))
            except BaseException:
                store._release_blobs(moved)
                raise
        self.close()
        return ImportResult([store._image(rows[i]) for i in ids], added, len(ids) - added, created)

    def _place(self, digest: str) -> bool:
        """Move a staged file into the store unless an intact copy is there; True if moved."""
        target = _blob_path(self.store.root, digest)
        staged = self.folder / digest
        try:
            if not staged.exists():
                return False  # moved already, for an earlier upload of the same bytes
            if target.is_file() and target.stat().st_size == staged.stat().st_size:
                return False
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        except OSError as e:
            raise StoreError(
                f"An image could not be saved in {self.store.root} ({e.strerror or type(e).__name__}); "
                "check the free disk space and permissions; nothing was imported."
            ) from None
        return True


def _split_sql(script: str) -> list[str]:
    """Split a migration script into complete statements (triggers' inner ';' included)."""
    statements, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \t\r\n;"):
                statements.append(buf.strip())
            buf = ""
    rest = buf.rstrip(";").strip()
    if rest and not all(line.strip().startswith("--") or not line.strip() for line in rest.splitlines()):
        raise StoreError("A schema migration script ends with an incomplete SQL statement.")
    return statements


def _checkpoint_loop(ref: "weakref.ref[ProjectStore]", stop: threading.Event, every: float) -> None:
    """Checkpoint a store every ``every`` seconds while it has new writes (holds no strong
    reference, so a store nobody closes can still be collected)."""
    while not stop.wait(every):
        store = ref()
        if store is None:
            return
        if store._dirty:
            store.checkpoint()
        del store
