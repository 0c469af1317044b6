"""`label`: label every image under the inputs with a saved model, into Parquet shards, on this
machine (resumable) or on a Ray cluster (--ray). The engine is fewshot_studio.labeling (local)
and fewshot_studio.scale (Ray); this module parses flags and prints."""
from __future__ import annotations

import sys

from .common import UserError, add_store_args, config_from


def cmd_label(args) -> int:
    from .. import labeling

    if args.top_k < 1:
        raise UserError("--top-k must be at least 1.")
    for flag, value in (("--batch-size", args.batch_size), ("--shard-rows", args.shard_rows),
                        ("--concurrency", args.concurrency or 1)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1.")
    if args.ray is not None:
        from ..scale import require_ray

        require_ray()  # before any work: the install hint is the first thing said
    paths = labeling.expand_inputs(args.input)
    if not paths:
        raise UserError("The inputs hold no files to label.")
    folder, done = labeling.prepare_output(args.output, args.resume)
    from ..methods import load_model

    method = load_model(args.model, device=args.device)
    meta = labeling.model_meta(method, args.model)
    todo = [p for p in paths if p not in done]
    if done:
        print(f"resuming: {len(paths) - len(todo):,} of {len(paths):,} images already labeled in {folder}",
              file=sys.stderr)
    if args.ray is not None:
        from ..scale import connect, label_ray

        connect(args.ray or None)
        r = label_ray(args.model, method.backbone.image_size, todo, folder, meta=meta, top_k=args.top_k,
                      embeddings=args.embeddings, batch_size=args.batch_size, concurrency=args.concurrency)
        rate = (r["rows"]) / max(1e-9, r["seconds"])
        print(f"labeled {r['rows'] - r['errors']:,} images ({r['errors']:,} unreadable) on Ray with "
              f"{r['actors']} {'GPU' if r['gpus'] else 'CPU'} actor(s) in {r['seconds']:.1f}s "
              f"({rate:,.1f} images/s) into {folder}")
        return 0
    from ..cache import FeatureCache
    from ..features import FeatureExtractor

    extractor = FeatureExtractor(method.backbone, FeatureCache(config_from(args).cache_dir),
                                 batch_size=args.batch_size)
    rate = labeling.Rate(len(todo), stream=sys.stderr if not args.quiet else _Null())
    s = labeling.label_local(method, extractor, paths, folder, done=done, top_k=args.top_k,
                             embeddings=args.embeddings, meta=meta, rate=rate,
                             shard_rows=args.shard_rows)
    print(f"labeled {s.labeled:,} images ({s.errors:,} unreadable, {s.skipped:,} done before) in "
          f"{s.seconds:.1f}s ({s.images_per_second:,.1f} images/s) into {folder}")
    return 0


class _Null:
    def write(self, _):
        return 0

    def flush(self):
        pass


def add_parser(sub) -> None:
    try:
        from ..labeling import DEFAULT_TOP_K, SHARD_ROWS
        from ..scale import ENCODE_BATCH
    except ImportError:  # no torch on this machine: only `predict --onnx` can run (cli.commands.add_parsers)
        DEFAULT_TOP_K = SHARD_ROWS = ENCODE_BATCH = None

    p = sub.add_parser("label", help="label many images with a saved model into Parquet (local or on Ray)",
                       description="Label every image under the inputs with a saved model. The output is a "
                                   "folder of Parquet shards, read as one table by pyarrow.parquet.read_table.")
    p.add_argument("--model", required=True, help="model directory written by train or exported by the app")
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="an image, a folder (recursed), a glob (quote it; ** recurses), or a .txt/.lst "
                        "list of paths or a .parquet file with a 'path' column; repeatable")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="folder of Parquet shards to write (created; a name like out.parquet is fine)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"classes per row in topk (default {DEFAULT_TOP_K})")
    p.add_argument("--embeddings", action="store_true", help="also write each image's feature vector")
    p.add_argument("--batch-size", type=int, default=ENCODE_BATCH, help=f"images per encoder batch (default {ENCODE_BATCH})")
    p.add_argument("--resume", action="store_true", help="skip the images the output's shards already hold")
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help=f"rows per local shard (default {SHARD_ROWS})")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray without ADDRESS, else join the cluster at ADDRESS "
                        "('auto' for the one `ray start` runs here); needs the [scale] extra")
    p.add_argument("--concurrency", type=int, default=None,
                   help="Ray: encoder actors (default one per GPU, else half the cluster's CPUs)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_store_args(p)
    p.set_defaults(func=cmd_label)
