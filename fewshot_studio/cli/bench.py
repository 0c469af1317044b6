"""`python -m fewshot_studio bench`: the speed targets (bench/speed.py), or with --load the app's
latency under concurrent sessions (bench/load.py); exit 1 when a target is missed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..bench.config import BenchConfig, BenchError
from .common import add_backbone_args, backbone_from, config_from


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure the speed targets (pipeline, cache, retrain, MMA, graph, labeling)",
                       description="Measure the speed targets side by side in one run; exit 1 if one is missed.")
    add_backbone_args(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the architecture with random weights instead of loading them (speed only)")
    p.add_argument("--classes", type=int, default=BenchConfig.classes, help="C of the training measurements")
    p.add_argument("--shots", type=int, default=BenchConfig.shots, help="K images per class")
    p.add_argument("--images", type=int, default=BenchConfig.images, help="pool size of the pipeline measurements")
    p.add_argument("--pool-images", type=int, default=BenchConfig.pool_images,
                   help="pool size of the long-pool scenario (pool_* keys)")
    p.add_argument("--repeats", type=int, default=BenchConfig.repeats, help="interleaved rounds per ratio")
    p.add_argument("--batch-size", type=int, default=BenchConfig.batch_size, help="encoder batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - 1 on CPU)")
    p.add_argument("--workers", type=int, default=None, help="helper processes that decode and write the cache (default: the remaining cores)")
    p.add_argument("--work-dir", default=None, help="folder for the temporary images and caches")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--load", action="store_true",
                   help="instead: launch the app on loopback and measure prediction latency under load "
                        "(--clients sessions x --requests predictions while a training job runs)")
    p.add_argument("--onnx", action="store_true",
                   help="ONNX classifier vs torch on the CPU: file size, latency of 1 image and a batch of 32 "
                        "(random weights)")
    p.add_argument("--onnx-backbones", nargs="+", default=["tiny", "ViT-B-32"], help="with --onnx")
    p.add_argument("--views", action="store_true",
                   help="instead: held-out accuracy against augmented views per image on the synthetic "
                        "uninformative-names task (tiny backbone), the measurement behind the defaults")
    p.add_argument("--methods", nargs="+", default=["tip", "gda", "proker", "graph"], help="with --views")
    p.add_argument("--view-counts", nargs="+", type=int, default=[0, 1, 2, 4, 10], help="with --views")
    p.add_argument("--view-shots", nargs="+", type=int, default=[1, 2, 4], help="with --views: shots per class")
    p.add_argument("--seeds", type=int, default=5, help="with --views: tasks drawn per shot count")
    p.add_argument("--insight", action="store_true",
                   help="instead: time the data inspection (map, near-duplicates, label issues) on random "
                        "features (bench/insight.py)")
    p.add_argument("--insight-sizes", default="1000,10000", help="with --insight: comma-separated image counts")
    p.add_argument("--insight-dim", type=int, default=512, help="with --insight: feature dimension (512: ViT-B-32)")
    p.add_argument("--clients", type=int, default=8, help="with --load: concurrent sessions")
    p.add_argument("--requests", type=int, default=25, help="with --load: predictions per session")
    p.set_defaults(func=cmd_bench)


def cmd_bench_load(args) -> int:
    """`bench --load`: p50/p95 latency and errors of the real app under a bounded loopback load."""
    import torch

    from ..bench.load import run_load

    if args.clients < 1 or args.requests < 1:
        raise BenchError("--clients and --requests must be at least 1.")
    r = run_load(clients=args.clients, requests=args.requests, backbone=args.backbone or "tiny",
                 device=args.device or "cpu")
    r.update({"device": _device_label(args.device), "torch": torch.__version__})
    print("| key | value | target | met |\n|---|---|---|---|")
    print(f"| load_p50_ms | {r['load_p50_ms']:.1f} | (reported) | - |")
    print(f"| load_p95_ms | {r['load_p95_ms']:.1f} | (reported) | - |")
    ok = r["load_errors"] == 0
    print(f"| load_errors | {r['load_errors']} | == 0 | {'yes' if ok else 'no'} |")
    print(f"\n{r['load_clients']} sessions x {r['load_requests'] // r['load_clients']} predictions while a training "
          f"job was {r['load_training_status_during']}; {r['load_throughput_rps']:.1f} predictions/s; {r['device']}.")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    if not ok:
        print(f"bench: target missed: load_errors = {r['load_errors']} ({'; '.join(r['load_error_samples'])})",
              file=sys.stderr)
    return 0 if ok else 1


def _device_label(device: str | None) -> str:
    from ..backbone import device_name, resolve_device

    return device_name(resolve_device(device or "cpu"))


def cmd_bench(args) -> int:
    if args.load:
        return cmd_bench_load(args)
    if args.onnx:
        from ..bench.onnx import run_onnx_bench

        return run_onnx_bench(args.onnx_backbones, repeats=args.repeats, threads=args.threads, json_path=args.json,
                              log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.insight:
        from ..bench.insight import measure, table

        try:
            sizes = tuple(int(s) for s in str(args.insight_sizes).split(",") if s.strip())
        except ValueError:
            raise BenchError("--insight-sizes takes comma-separated whole numbers like 1000,10000.") from None
        if not sizes or min(sizes) < 2 or args.insight_dim < 2:
            raise BenchError("--insight-sizes and --insight-dim must be at least 2.")
        print(table(measure(sizes, args.insight_dim, min(10, args.classes))), flush=True)
        return 0
    if args.views:
        from ..bench.views import run_views

        return run_views(args.methods, args.view_counts, args.view_shots, args.seeds, json_path=args.json)
    cfg = BenchConfig(classes=args.classes, shots=args.shots, images=args.images, repeats=args.repeats,
                      pool_images=args.pool_images,
                      batch_size=args.batch_size, threads=args.threads, workers=args.workers,
                      work_dir=args.work_dir)
    cfg.validate()
    import torch  # here, not at the top: the parser is built for every command, `predict --onnx` too

    from ..bench.speed import random_weights_backbone, report, run_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu.")
    if args.work_dir and not Path(args.work_dir).is_dir():
        raise BenchError(f"--work-dir {args.work_dir} is not a folder.")
    if args.random_weights:
        if args.pretrained or args.checkpoint:
            raise BenchError("--random-weights builds the model without weights; drop --pretrained/--checkpoint.")
        backbone = random_weights_backbone(args.backbone or config_from(args).backbone, args.device)
    else:
        backbone = backbone_from(args)
    results = run_bench(backbone, cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    return report(results, args.json)
