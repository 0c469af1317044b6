"""`python -m fewshot_studio`: the same pipeline as the app, headless.

Exit codes: 0 success (unreadable inputs are reported, not fatal), 2 a user error
(one line on stderr, no traceback), 1 a benchmark target missed or, for `doctor`, a problem
found in the data folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import FewShotError


class UserError(FewShotError):
    pass


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None,
                   help="open_clip model name (default ViT-B-32, or $FEWSHOT_STUDIO_BACKBONE) or 'tiny'")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default openai)")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file or directory instead of a download")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default $FEWSHOT_STUDIO_CACHE or <data dir>/features)")
    p.add_argument("--data-dir", default=None, help="data directory (default $FEWSHOT_STUDIO_DATA)")


def _config(args):
    """The one AppConfig of a command: its flags over the environment."""
    from .config import AppConfig

    return AppConfig.from_env(data_dir=getattr(args, "data_dir", None), cache_dir=getattr(args, "cache_dir", None))


def _backbone(args):
    from .backbone import BackboneSpec, load_backbone

    name = args.backbone
    pretrained = args.pretrained
    if name == "tiny" and pretrained is None:
        pretrained = None
    spec = BackboneSpec.from_env(name=name, pretrained=pretrained, checkpoint=args.checkpoint, device=args.device)
    if spec.name == "tiny" and not args.pretrained:
        spec = BackboneSpec("tiny", None, spec.checkpoint, spec.device)
    return load_backbone(spec)


def _extractor(backbone, args):
    from .cache import FeatureCache
    from .features import FeatureExtractor

    return FeatureExtractor(backbone, FeatureCache(_config(args).cache_dir))


def _stderr_progress(p) -> None:
    print(f"\r{p}".ljust(70), end="", file=sys.stderr, flush=True)


def cmd_train(args) -> int:
    from .data import SupportSet
    from .methods import make_method
    from .methods.catalog import coerce_settings, settings

    # the catalog's one rule: a setting this method lacks (e.g. --steps for tip) is an error
    given = {k: getattr(args, k) for k in ("epochs", "steps", "lr", "batch_size") if getattr(args, k) is not None}
    if "seed" in settings(args.method):
        given["seed"] = args.seed
    overrides = coerce_settings(args.method, given)
    support, errors = SupportSet.from_folder(args.data, shots=args.shots, seed=args.seed)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    backbone = _backbone(args)
    method = make_method(args.method, backbone, support.classnames, **overrides)
    t0 = time.time()
    method.fit(support, _extractor(backbone, args), progress=None if args.quiet else _stderr_progress)
    method.metrics["train_seconds"] = round(time.time() - t0, 3)
    out = method.save(args.out)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"saved {method.label} ({len(support)} images, {support.num_classes} classes) to {out} "
          f"in {time.time() - t0:.1f}s")
    return 0


def cmd_predict(args) -> int:
    from .data import ImageRef, list_image_files
    from .imageio import ImageError
    from .methods import load_model

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{missing[0]} does not exist.")
    method = load_model(args.model, device=args.device)
    from .cache import FeatureCache
    from .features import FeatureExtractor

    extractor = FeatureExtractor(method.backbone, FeatureCache(_config(args).cache_dir))
    files = list_image_files(args.paths)
    refs, results, order = [], {}, []
    for f in files:
        order.append(str(f))
        try:
            ref = ImageRef.from_path(f)
            ref.open(draft_size=method.backbone.image_size)  # validate before batching
            refs.append(ref)
        except ImageError as e:
            results[str(f)] = {"path": str(f), "error": e.reason}
    if refs:
        probs = method.predict_proba(refs, extractor)
        for ref, p in zip(refs, probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            results[str(ref.path)] = {"path": str(ref.path), "label": method.classnames[best],
                                      "probs": dict(zip(method.classnames, [round(x, 6) for x in p]))}
    rows = [results[p] for p in order]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['path']}\tERROR\t{r['error']}")
            else:
                print(f"{r['path']}\t{r['label']}\t{r['probs'][r['label']]:.4f}")
    return 0


def cmd_graph(args) -> int:
    from .methods import load_model

    method = load_model(args.model, device=args.device)
    g = method.knowledge_graph().to_dict()
    if args.json:
        print(json.dumps({"classes": g["classes"], "text_edges": g["text_edges"],
                          "visual_edges": g["visual_edges"], "fused_edges": g["fused_edges"]}))
    else:
        for pair in method.knowledge_graph().confusable_pairs():
            print(f"{pair['a']} ~ {pair['b']}: visual {pair['visual']:.3f}, text {pair['text']:.3f}")
        print(f"{len(g['classes'])} classes; use --json for the edge matrices")
    return 0


def cmd_pretrain_tiny(args) -> int:
    from . import tiny

    tiny.pretrain(out=Path(args.out) if args.out else tiny.WEIGHTS_PATH, seed=args.seed, steps=args.steps,
                  n_images=args.images)
    return 0


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def cmd_doctor(args) -> int:
    """Check the data folder (database, image files, model directories); print one problem
    per line or "No problems found."; exit 1 when there are problems. With --collect-garbage,
    a healthy folder is also cleared of what crashes leave behind."""
    from .store import _DB_NAME, ProjectStore, StoreError

    root = _config(args).data_dir
    if not (root / _DB_NAME).is_file():
        print(f"No project database in {root}; nothing to check.")
        return 0
    try:
        store = ProjectStore(root)
    except StoreError as e:  # e.g. a damaged database file: that is the problem found
        print(e)
        return 1
    with store:
        problems = store.check_integrity()
        for problem in problems:
            print(problem)
        if not problems:
            print("No problems found.")
        if args.collect_garbage:
            if problems:
                print("Nothing was removed: --collect-garbage runs only on a data folder without problems.")
            else:
                removed = store.collect_garbage()
                print(f"Removed {_plural(removed['images'], 'unreferenced image file', 'unreferenced image files')}, "
                      f"{_plural(removed['temporary'], 'temporary file or folder', 'temporary files or folders')} "
                      f"and {_plural(removed['models'], 'orphaned model directory', 'orphaned model directories')}.")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    from .methods.catalog import method_ids  # built now: a method registered later is listed

    parser = argparse.ArgumentParser(prog="python -m fewshot_studio",
                                     description="Few-Shot Studio: few-shot image classifiers on frozen CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on an ImageFolder tree and save the model")
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--method", default="graph", choices=method_ids(), help="the method (default graph)")
    _add_backbone_args(p)
    p.add_argument("--shots", type=int, default=None, help="sample K images per class (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--quiet", action="store_true")
    _add_store_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify images or folders with a saved model")
    p.add_argument("--model", required=True, help="model directory written by train or exported by the app")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of tab-separated lines")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("paths", nargs="+", help="image files or folders (recursed)")
    _add_store_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("graph", help="print a saved model's class knowledge graph")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("pretrain-tiny", help="regenerate the tiny offline backbone's weights (deterministic)")
    p.add_argument("--out", default=None, help="output .safetensors (default: the packaged weights file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--images", type=int, default=20_000)
    p.set_defaults(func=cmd_pretrain_tiny)

    p = sub.add_parser("doctor", help="check the data folder's database, image files and model directories",
                       description="Check the data folder; exit 1 if a problem is found.")
    p.add_argument("--data-dir", default=None,
                   help="data directory (default $FEWSHOT_STUDIO_DATA, else the user's data folder)")
    p.add_argument("--collect-garbage", action="store_true",
                   help="also delete unreferenced image files, temporary files and orphaned model "
                        "directories (only while the app is not running)")
    p.set_defaults(func=cmd_doctor)

    try:
        from .bench.speed import add_bench_parser  # noqa: F401
        add_bench_parser(sub)
    except ImportError:
        pass
    try:
        from .evaluation import add_eval_parser  # noqa: F401
        add_eval_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FewShotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
