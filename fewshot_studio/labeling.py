"""Labeling a large set of image files with a saved model, into Parquet shards.

One engine, two runners: `label_local` (this machine, the FeatureExtractor's decode helpers and
its FeatureCache) and `scale.label_ray` (Ray Data). Both turn features into rows with the one
function `label_table`, so the two give the same labels and probabilities for the same model
and images (to float rounding of the encoder's batch: well within 1e-5).

Output: a folder of Parquet shards (`part-00000.parquet`, ...; Ray names its own), read as one
table by `pyarrow.parquet.read_table(folder)`. Columns (SCHEMA):

    path        string   the path as found (input expansion order)
    sha256      string   SHA-256 of the file's bytes (null on error)
    label       string   the most probable class (null on error)
    confidence  float32  its probability (null on error)
    topk        list<struct<class: string, prob: float32>>  the K most probable classes
    probs       list<float32>  every class's probability, in the model's class order
                         (schema metadata "classes"), what the app's review queue ranks by
    error       string   why the image could not be labeled (null when it was)
    embedding   fixed_size_list<float32>[d]  the L2-normalised image feature (--embeddings only)

No saved method has an out-of-distribution score, so there is no `outlier` column.

A shard is written to a hidden temporary file in the same folder and renamed into place
(rename is atomic on POSIX), so a killed run leaves whole shards or none; `pyarrow.dataset`
ignores names starting with "." (ignore_prefixes), so a left-over temporary file is never read.
Resume reads the `path` column of the shards already there and skips those paths.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import DataError

#: Images per local shard. A shard is what a kill can lose and what a resume redoes: 1024 images
#: are 6-25 s of tiny work and 1-7 minutes of ViT-B-32 work on a 2-core CPU (measured 41-168 and
#: 2.5-18 images/s), and each shard restarts the feature pipeline's ramp, under 1% of a
#: 1024-image chunk (app.modeling.LABEL_CHUNK_MAX). A million images make 1,000 files of about
#: 120 KB (measured: 115 bytes a row with 4 classes, without embeddings).
SHARD_ROWS = 1024
#: Classes listed per row in `topk`, capped by the model's class count.
DEFAULT_TOP_K = 5
#: Suffixes of an --input that is a list of paths rather than an image.
LIST_SUFFIXES = (".txt", ".lst", ".parquet")

META_KEY = b"fewshot_studio"


def schema(top_k: int, embed_dim: int | None = None, meta: dict | None = None):
    """The output schema (see the module docstring); `embed_dim` adds the embedding column."""
    import pyarrow as pa

    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("label", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("topk", pa.list_(pa.struct([("class", pa.string()), ("prob", pa.float32())]))),
        pa.field("probs", pa.list_(pa.float32())),
        pa.field("error", pa.string()),
    ]
    if embed_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embed_dim)))
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta or {}).encode()})


def model_meta(method, model_dir: str | os.PathLike) -> dict:
    """What the shards' schema metadata records: the classes (the order of `probs`), the method
    and backbone, and the model folder's name."""
    return {"classes": list(method.classnames), "method": method.name, "backbone": method.backbone.id,
            "model": Path(model_dir).name}


def probabilities(method, features: torch.Tensor) -> np.ndarray:
    """(N,d) normalised image features -> (N,C) float32 probabilities: softmax of the method's
    logits, exactly as Method.predict_proba computes them."""
    method.eval()
    with torch.no_grad():
        return method.logits_from_features(features.to(method._device())).float().softmax(-1).cpu().numpy()


def label_table(method, paths: Sequence[str], hashes: Sequence[str | None], errors: Sequence[str | None],
                features: torch.Tensor, top_k: int, embeddings: bool, meta: dict):
    """The rows of one batch as a pyarrow Table (SCHEMA): `features` (M,d) are those of the
    images whose `errors` entry is None, in order; the other rows get the error and nulls.
    Vectorised: one softmax and one top-k for the batch, Arrow arrays built from flat buffers."""
    import pyarrow as pa

    n = len(paths)
    ok = np.array([e is None for e in errors], dtype=bool)
    k = min(top_k, method.num_classes)
    c = method.num_classes
    classes = np.asarray(method.classnames, dtype=object)
    d = method.backbone.embed_dim
    probs = np.zeros((n, c), dtype=np.float32)
    if ok.any():
        probs[ok] = probabilities(method, features)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # stable: ties keep class order, as torch.max
    top_p = np.take_along_axis(probs, top, axis=1)
    bad = pa.array(~ok)
    label = pa.array(np.where(ok, classes[top[:, 0]], None), pa.string())
    confidence = pa.array(top_p[:, 0], pa.float32(), mask=~ok)
    struct = pa.StructArray.from_arrays([pa.array(classes[top.ravel()], pa.string()),
                                         pa.array(top_p.ravel(), pa.float32())], names=["class", "prob"])
    topk = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), struct, mask=bad)
    probs_col = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c),
                                         pa.array(probs.ravel(), pa.float32()), mask=bad)
    cols = [pa.array(list(paths), pa.string()), pa.array(list(hashes), pa.string()), label, confidence, topk,
            probs_col, pa.array(list(errors), pa.string())]
    if embeddings:
        emb = np.zeros((n, d), dtype=np.float32)
        if ok.any():
            emb[ok] = features.float().numpy()
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), d, mask=bad))
    return pa.Table.from_arrays(cols, schema=schema(top_k, d if embeddings else None, meta))


# ------------------------------------------------------------------ inputs


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """The image paths of the --input values, in order, each once: a folder is recursed (sorted,
    hidden files skipped), a .txt/.lst file lists one path per line, a .parquet file lists paths
    in its `path` column, a name with glob characters that is not a file is a glob (** recurses),
    anything else is a file (a missing one becomes an error row, not a failed run)."""
    from .data import list_image_files

    out: dict[str, None] = {}
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            found = _read_list(p)
        elif p.is_dir():
            found = [str(q) for q in list_image_files([p])]
        elif not p.exists() and glob.has_magic(raw):
            found = sorted(q for q in glob.glob(raw, recursive=True) if os.path.isfile(q))
            if not found:
                raise DataError(f"No file matches {raw}.")
        else:
            found = [raw]
        out.update(dict.fromkeys(found))
    return list(out)


def _read_list(p: Path) -> list[str]:
    if p.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p, columns=["path"])
        except (pa.ArrowInvalid, KeyError, OSError) as e:
            raise DataError(f"{p.name} is not a Parquet file with a 'path' column ({_short(e)}).") from None
        return [s for s in table.column("path").to_pylist() if s]
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"The list {p.name} could not be read as UTF-8 text ({_short(e)}).") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


# ------------------------------------------------------------------ the output folder


def prepare_output(out: str | os.PathLike, resume: bool) -> tuple[Path, set[str]]:
    """Create the output folder (or, with `resume`, read what it holds): (folder, paths done).
    Without `resume` a folder that already holds shards is refused, so nothing is overwritten
    or mixed. On resume, left-over temporary files of a killed run are deleted and a shard that
    cannot be read (a half-written file from a writer that does not rename, e.g. Ray's) is moved
    aside under a hidden name, so its rows are labeled again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file; --output names a folder of Parquet shards (it may end in .parquet).")
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if shards and not resume:
        raise DataError(f"{folder} already holds {len(shards)} shard(s); pass --resume to continue that run "
                        "or choose another --output.")
    folder.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for s in shards:
        try:
            done.update(pq.read_table(s, columns=["path"]).column("path").to_pylist())
        except (pa.ArrowInvalid, OSError, KeyError):
            s.rename(s.with_name(f".broken-{s.name}"))
            print(f"note: {s.name} could not be read (cut off by a kill?); its images are labeled again.",
                  file=sys.stderr)
    return folder, done


def next_shard_index(folder: Path) -> int:
    nums = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet") if p.stem.split("-")[1].isdigit()]
    return max(nums, default=-1) + 1


def write_shard(folder: Path, index: int, table) -> Path:
    """Write `table` as part-<index>.parquet atomically: a hidden temporary file, fsync, rename."""
    import pyarrow.parquet as pq

    final = folder / f"part-{index:05d}.parquet"
    tmp = folder / f".part-{index:05d}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# ------------------------------------------------------------------ progress


@dataclass
class Rate:
    """images/s and ETA of a run, printed on one stderr line at most every `every` seconds."""

    total: int
    every: float = 0.5
    stream: object = field(default=sys.stderr)
    start: float = field(default_factory=time.monotonic)
    done: int = 0
    _last: float = 0.0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        print(f"\r{self.line()}".ljust(78), end="", file=self.stream, flush=True)

    @property
    def per_second(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.start)

    def line(self) -> str:
        rate = self.per_second
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "--:--:--"
        return f"labeled {self.done:,}/{self.total:,} images  {rate:,.1f} images/s  ETA {eta}"


# ------------------------------------------------------------------ the local runner


@dataclass
class Summary:
    labeled: int
    errors: int
    skipped: int
    seconds: float
    folder: Path

    @property
    def images_per_second(self) -> float:
        return (self.labeled + self.errors) / max(1e-9, self.seconds)


def _read_refs(paths: Sequence[str]):
    """ImageRefs of the paths that can be read (bytes hashed) and a header check of each; the
    others get their one-sentence reason."""
    from . import imageio
    from .data import ImageRef

    refs, errors = [], []
    for p in paths:
        try:
            data, _ = imageio.read_bytes(p)
            imageio.probe_image(data, p)  # header only: most bad files stop here, cheaply
            refs.append(ImageRef(imageio.content_hash(data), Path(p), None, p))
            errors.append(None)
        except imageio.ImageError as e:
            refs.append(None)
            errors.append(str(e))
    return refs, errors


def _features(extractor, refs: list, errors: list, progress: Callable[[int], None]) -> torch.Tensor:
    """(M,d) plain-view features of the readable refs (the FeatureExtractor: decode helpers,
    cache). A file whose header passed but whose pixels do not decode fails the whole call;
    then each image is tried alone, so only that file becomes an error row (rare: a truncated
    file)."""
    from .imageio import ImageError

    good = [r for r in refs if r is not None]
    if not good:
        return torch.empty(0, extractor.backbone.embed_dim)
    try:
        return extractor.image_features(good, progress=lambda p: progress(p.step))[:, 0]
    except ImageError:
        pass
    feats = []
    for i, r in enumerate(refs):
        if r is None:
            continue
        try:
            feats.append(extractor.image_features([r])[:, 0])
        except ImageError as e:
            refs[i], errors[i] = None, str(e)
    return torch.cat(feats) if feats else torch.empty(0, extractor.backbone.embed_dim)


def label_local(method, extractor, paths: Sequence[str], folder: Path, *, done: set[str] = frozenset(),
                top_k: int = DEFAULT_TOP_K, embeddings: bool = False, shard_rows: int = SHARD_ROWS,
                meta: dict | None = None, rate: Rate | None = None) -> Summary:
    """Label `paths` not in `done` into shards of `shard_rows` rows under `folder` (see the
    module docstring). Returns counts and the elapsed time."""
    todo = [p for p in paths if p not in done]
    start = time.monotonic()
    rate = rate or Rate(len(todo))
    index = next_shard_index(folder)
    labeled = errors = 0
    for a in range(0, len(todo), shard_rows):
        chunk = todo[a:a + shard_rows]
        refs, errs = _read_refs(chunk)
        feats = _features(extractor, refs, errs, lambda step, a=a: rate.update(a + step))
        table = label_table(method, chunk, [r.hash if r is not None else None for r in refs], errs, feats,
                            top_k, embeddings, meta or {})
        write_shard(folder, index, table)
        index += 1
        bad = sum(e is not None for e in errs)
        errors += bad
        labeled += len(chunk) - bad
        rate.update(a + len(chunk), force=True)
    if todo:
        print(file=rate.stream)
    return Summary(labeled, errors, len(paths) - len(todo), time.monotonic() - start, folder)
