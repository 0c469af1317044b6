"""Importing a labeled Parquet file (`python -m fewshot_studio label`, local or on Ray) as the
pool predictions of the project's current model: a team labels at scale, then reviews in the
app (least confident first, accept/correct, the station's queue) as after "Label the pool".

Rows are matched to the pool by the SHA-256 of the image bytes (the `sha256` column), never by
`path`: the paths name files on the machines that ran the job, and reading paths named by an
uploaded file would let anyone who can upload pull files of the server into a project. So the
images themselves come into the pool as usual (files or a zip); rows of images that are not in
this project's pool are counted and left out.

The file is untrusted: its size is capped, its schema checked (one sentence per problem), its
rows read in record batches (bounded memory: only the rows of pool images are kept), every
probability row checked (finite, in [0, 1], one per class, summing to 1) before anything is
stored, and the predictions stored in one transaction through store.save_predictions, exactly as modeling.label_pool stores them (label = the
most probable class, confidence = its probability, probs = the list in the model's class order).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..labeling import META_KEY
from .context import ProjectScope
from .modeling import _check_classes, current_model_info

#: The largest Parquet file taken: a million rows of 10 classes without embeddings are ~60 MB.
MAX_IMPORT_BYTES = 1 << 30
#: Rows read and stored per step (one record batch, one store transaction).
IMPORT_BATCH = 20_000
#: A probability row may sum to 1 within this (float32 softmax of thousands of classes).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PredictionImport:
    matched: int  # pool images given the file's prediction
    not_in_pool: int  # labeled rows whose image is not (or no longer) in this project's pool
    errors: int  # rows of files the job could not read
    model: str  # the model the predictions were stored for


def _fail(name: str, why: str) -> DataError:
    return DataError(f"{name} is not a labeled Parquet file from `python -m fewshot_studio label`: {why}.")


def _file_classes(pf, name: str) -> list[str]:
    meta = pf.schema_arrow.metadata or {}
    try:
        classes = json.loads(meta[META_KEY].decode("utf-8")).get("classes")
    except (KeyError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        raise _fail(name, "its schema does not record the model's classes") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes) \
            or len(set(classes)) != len(classes):
        raise _fail(name, "its list of classes is not a list of distinct names")
    return classes


def _check_schema(pf, name: str) -> None:
    import pyarrow as pa

    s = pf.schema_arrow
    need = {"sha256": pa.types.is_string, "error": pa.types.is_string,
            "probs": lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type)}
    for col, ok in need.items():
        if s.get_field_index(col) < 0:
            raise _fail(name, f"it has no {col!r} column")
        if not ok(s.field(col).type):
            raise _fail(name, f"its {col!r} column has type {s.field(col).type}")


def import_predictions(scope: ProjectScope, sources: str | os.PathLike | Sequence[str | os.PathLike],
                       names: Sequence[str] | None = None) -> PredictionImport:
    """Store the predictions of the labeled Parquet file(s) `sources` (one file, or the shards
    of one run) for the project's pool images, matched by SHA-256, as the current model's
    predictions. Each file's classes must be the current model's (any order: probabilities are
    reordered to the model's class order). All or nothing: every file is checked first."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("Choose a labeled Parquet file to import.")
    names = list(names) if names else [os.path.basename(os.fspath(s)) or "The file" for s in sources]
    info = current_model_info(scope)
    if info is None:
        raise DataError("Train or import a model first: imported predictions belong to the project's current model.")
    model_classes = list(info.config.get("classes") or [])
    ids = _check_classes(scope, _Named(model_classes))
    class_ids = np.array([ids[c] for c in model_classes])
    pool: dict[str, list[int]] = {}
    for img in scope.store.list_images(scope.id, pool=True):
        pool.setdefault(img.hash, []).append(img.id)
    rows: dict[int, tuple] = {}  # image id -> its prediction: at most one per pool image is held
    not_in_pool = errors = 0
    for source, name in zip(sources, names):
        for hashes, P in _read_rows(source, name, model_classes):
            if P is None:  # the rows of files the job could not read
                errors += len(hashes)
                continue
            best = P.argmax(1)
            conf = P[np.arange(len(P)), best]
            for h, j, cf, pr in zip(hashes, best.tolist(), conf.tolist(), P.tolist()):
                targets = pool.get(h)
                if not targets:
                    not_in_pool += 1
                for image_id in targets or ():
                    rows[image_id] = (image_id, int(class_ids[j]), cf, pr)
    # after every row of every file was checked, in one transaction
    matched = scope.store.save_predictions(info.id, list(rows.values()), skip_missing=True) if rows else 0
    return PredictionImport(matched, not_in_pool, errors, f"{info.method} (model {info.id})")


def _read_rows(source, name: str, model_classes: list[str]):
    """Yield (sha256 list, (n, C) probabilities in the model's class order) per record batch
    of readable rows, and ([None] * k, None) for the k error rows of a batch; raise a one-sentence
    DataError for anything that is not a labeled file of these classes."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        size = os.path.getsize(source)
    except OSError:
        raise DataError(f"{name} could not be read.") from None
    if size > MAX_IMPORT_BYTES:
        raise DataError(f"{name} is {size / 2**20:.0f} MiB; labeled files of at most "
                        f"{MAX_IMPORT_BYTES // 2**20} MiB are imported.")
    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowException, OSError, ValueError):
        raise _fail(name, "it is not a readable Parquet file") from None
    _check_schema(pf, name)
    classes = _file_classes(pf, name)
    if sorted(classes) != sorted(model_classes):
        raise DataError(f"{name} was labeled with the classes {', '.join(classes)}, but the current model has "
                        f"{', '.join(model_classes)}; import it into a project whose model has the same classes.")
    order = np.array([classes.index(c) for c in model_classes])  # the file's column of each model class
    c, row0 = len(classes), 0
    try:
        for batch in pf.iter_batches(batch_size=IMPORT_BATCH, columns=["sha256", "probs", "error"]):
            failed = batch.column("error").is_valid()
            yield [None] * int(pc.sum(failed).as_py() or 0), None
            good = batch.filter(pc.invert(failed))
            hashes = good.column("sha256").to_pylist()
            probs = good.column("probs")
            lengths = pc.list_value_length(probs).to_numpy(zero_copy_only=False)
            if len(good) and (probs.null_count or np.any(lengths != c)
                              or not all(isinstance(h, str) and len(h) == 64 for h in hashes)):
                raise _fail(name, f"a row after row {row0:,} has no SHA-256 or not one probability per class")
            P = pc.list_flatten(probs).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, c)[:, order]
            if len(P) and (not np.isfinite(P).all() or P.min() < 0 or P.max() > 1
                           or np.abs(P.sum(1) - 1).max() > SUM_TOLERANCE):
                raise _fail(name, f"a row after row {row0:,} has probabilities that are not a distribution")
            if len(P):
                yield hashes, P
            row0 += batch.num_rows
    except (pa.ArrowException, OSError):
        raise _fail(name, f"its data is damaged after row {row0:,}") from None


@dataclass(frozen=True)
class _Named:
    """What _check_classes reads of a method: its class names."""

    classnames: list[str]
