"""The `label` job on Ray Data: the documented batch-inference pattern for vision models.

    from_items(paths) -> map_batches(decode_images)          Ray tasks, CPU: read + decode + crop
                      -> map_batches(Labeler, concurrency=n)  Ray actors: encoder + method head
                      -> write_parquet(folder)

(Ray Data, "End-to-end: Offline Batch Inference" and Dataset.map_batches: a callable class runs
in an actor pool, its constructor loads the model once per actor; `num_gpus=1` gives each actor
a GPU.) Reading and decoding run as tasks anywhere in the cluster; each actor encodes a batch of
crops with the frozen backbone and turns the features into rows with `labeling.label_table`, the
same function as the local runner, so the two agree (labels equal, probabilities within 1e-5).

What is shipped where:
  * the image paths go to the tasks, which read the files themselves (imageio.read_bytes: size
    limits, one-sentence errors), so every node must see the inputs at the same paths (a shared
    or network file system); an unreadable file becomes an error row, never a failed job;
  * the model directory (config.json + model.safetensors: the method's head, kilobytes to a few
    MB) is put in Ray's object store once (ray.put of its files' bytes) and written to a
    temporary folder by each actor, so nodes need no copy of it;
  * the backbone's weights are not shipped: each actor loads them as `load_model` does on one
    machine (the packaged tiny weights, open_clip's local cache, or the model's checkpoint path,
    which must then exist on every node).
Crops travel as uint8 (s*s*3 bytes, 150 KB at 224 px) and are normalised in the actor with
preprocess.normalize, 4× less object-store traffic than float32 pixels.

Ray is an optional extra: `pip install "fewshot-studio[scale]"`; it is imported only here, and
only when a Ray run is asked for.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError

INSTALL_HINT = 'pip install "fewshot-studio[scale]"'
#: Images per decode task: big enough that a task's scheduling (~ms) is small next to its work
#: (0.5 ms per tiny-size image, several ms at 224 px), small enough to spread over the cluster.
DECODE_BATCH = 256
#: Images per encoder call in an actor (the FeatureExtractor's default batch).
ENCODE_BATCH = 64
#: Memory reserved per encoder actor (Ray's `memory` resource): a ViT-B-32 actor on a CPU peaks
#: near 1 GiB. Reserving it also keeps Ray Data from fusing the decode tasks into the actors
#: (operators fuse only when their resource requests match), so decoding runs beside encoding
#: instead of in the actor between its batches.
ACTOR_MEMORY = 1 << 30


def require_ray():
    """Import ray (with Ray Data), or a DataError of one sentence saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra is ray[data]
    except ImportError:
        raise DataError(f"--ray needs Ray Data, which is not installed; install it with {INSTALL_HINT}.") from None
    return ray


def decode_images(batch: dict, image_size: int) -> dict:
    """A Ray task: read, hash, decode and crop (plain view) a batch of paths. Returns the paths,
    their SHA-256 and error ("" for none: a column of nothing but None would reach the actor as
    NaN floats) and (N,s,s,3) uint8 crops (zeros for error rows)."""
    from . import imageio
    from .preprocess import decode_views

    paths = [str(p) for p in batch["path"]]
    crops = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    hashes, errors = [], []
    for i, p in enumerate(paths):
        try:
            data, _ = imageio.read_bytes(p)
            digest = imageio.content_hash(data)
            crops[i] = decode_views(image_size, [(i, [0], data, p, digest, [0])])[0][2][0]
            hashes.append(digest)
            errors.append("")
        except imageio.ImageError as e:
            hashes.append("")
            errors.append(str(e) or "unreadable")
    return {"path": np.array(paths, dtype=object), "sha256": np.array(hashes, dtype=object),
            "error": np.array(errors, dtype=object), "crop": crops}


class Labeler:
    """The callable class of the actor pool: loads the model once (from the object store),
    then encodes each batch's crops and builds its rows with labeling.label_table."""

    def __init__(self, model_files: list, top_k: int, embeddings: bool, meta: dict, device: str | None):
        import ray

        from .methods import load_model

        files = ray.get(model_files[0])  # wrapped in a list: Ray passes the reference, not its value
        folder = Path(tempfile.mkdtemp(prefix="fewshot-model-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            self.method = load_model(folder, device=device)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.top_k, self.embeddings, self.meta = top_k, embeddings, meta

    def __call__(self, batch: dict):
        import torch

        from .labeling import label_table
        from .preprocess import normalize

        bb = self.method.backbone
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        crops = np.asarray(batch["crop"])[ok]
        feats = bb.encode_images(torch.from_numpy(normalize(crops, bb.mean, bb.std)), batch_size=ENCODE_BATCH) \
            if ok.any() else torch.empty(0, bb.embed_dim)
        return label_table(self.method, [str(p) for p in batch["path"]], [str(h) or None for h in batch["sha256"]],
                           errors, feats,
                           self.top_k, self.embeddings, self.meta)


def model_files(model_dir: str | os.PathLike) -> dict[str, bytes]:
    """The files of a saved model directory (config.json, model.safetensors), by name."""
    from .methods.base import CONFIG_FILE, WEIGHTS_FILE

    d = Path(model_dir)
    return {name: (d / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address` ("auto" for the one `ray start` runs here), or start a
    local Ray when None; a Ray already initialised in this process (tests) is used as it is."""
    ray = require_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def label_ray(model_dir: str | os.PathLike, image_size: int, paths: Sequence[str], folder: Path, *,
              meta: dict, top_k: int, embeddings: bool, batch_size: int = ENCODE_BATCH,
              concurrency: int | None = None, decode_batch: int = DECODE_BATCH) -> dict:
    """Label `paths` into Parquet files under `folder` on the Ray cluster this process is
    connected to (`connect`). One actor per GPU when the cluster has GPUs (num_gpus=1 each),
    else CPU actors, by default half the cluster's CPUs (the other half decodes). Returns
    {"rows", "errors", "seconds", "actors", "gpus"}."""
    import pyarrow.parquet as pq

    ray = require_ray()
    if not paths:
        return {"rows": 0, "errors": 0, "seconds": 0.0, "actors": 0, "gpus": 0}
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    actors = concurrency or (gpus if gpus else max(1, cpus // 2))
    start = time.monotonic()
    ref = ray.put(model_files(model_dir))
    blocks = max(1, min(len(paths) // max(1, decode_batch) + 1, 4 * cpus))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    ds = ds.map_batches(decode_images, fn_kwargs={"image_size": image_size}, batch_size=decode_batch,
                        batch_format="numpy")
    ds = ds.map_batches(Labeler, fn_constructor_kwargs={"model_files": [ref], "top_k": top_k,
                                                        "embeddings": embeddings, "meta": meta,
                                                        "device": "cuda" if gpus else "cpu"},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0, num_cpus=1, memory=ACTOR_MEMORY)
    tag = f"ray-{int(time.time())}"
    ds.write_parquet(str(folder), filename_provider=_names(tag))
    seconds = time.monotonic() - start
    written = [p for p in folder.glob(f"{tag}*.parquet")]
    readable = sum(pq.read_table(p, columns=["error"]).column("error").null_count for p in written)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in written)
    return {"rows": rows, "errors": rows - readable, "seconds": seconds, "actors": actors, "gpus": gpus}


def _names(tag: str):
    """File names `<tag>-<block>.parquet`: one run's files are told apart from earlier runs'."""
    from ray.data.datasource import FilenameProvider

    class _Provider(FilenameProvider):
        def get_filename_for_task(self, write_uuid, task_index):
            return f"{tag}-{write_uuid}-{task_index:06d}.parquet"

    return _Provider()
