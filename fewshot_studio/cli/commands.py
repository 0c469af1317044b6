"""The model commands: train, predict, graph, pretrain-tiny, doctor."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import (UserError, add_backbone_args, add_store_args, backbone_from, config_from, extractor_from,
                     stderr_progress)


def _auto_settings(args) -> tuple[dict, dict[str, dict]]:
    """Auto's own settings (--budget, --with-mma, --seed) and, per candidate, the training flags
    that candidate has (--steps reaches GraphAdapter and MMA, as in `eval`)."""
    from ..methods.catalog import AUTO, auto_candidates, coerce_settings, settings

    auto = coerce_settings(AUTO, {"budget_s": args.budget, "with_mma": args.with_mma or None, "seed": args.seed})
    given = {k: getattr(args, k) for k in ("epochs", "steps", "lr", "batch_size") if getattr(args, k) is not None}
    per_method = {}
    for m in auto_candidates(gpu=True):
        mine = {k: v for k, v in given.items() if k in settings(m)}
        if mine:
            per_method[m] = coerce_settings(m, mine)
    return auto, per_method


def cmd_train(args) -> int:
    from ..data import SupportSet
    from ..methods import make_method
    from ..methods.catalog import AUTO, AUTO_BUDGET_S, coerce_settings, settings

    if args.method == AUTO:
        auto, overrides = _auto_settings(args)
    else:
        if args.budget is not None or args.with_mma:
            raise UserError("--budget and --with-mma are settings of --method auto.")
        # the catalog's one rule: a setting this method lacks (e.g. --steps for tip) is an error
        given = {k: getattr(args, k) for k in ("epochs", "steps", "lr", "batch_size", "recipe") if getattr(args, k, None) is not None}
        if "seed" in settings(args.method):
            given["seed"] = args.seed
        overrides = coerce_settings(args.method, given)
    support, errors = SupportSet.from_folder(args.data, shots=args.shots, seed=args.seed)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    backbone = backbone_from(args)
    extractor = extractor_from(backbone, args)
    progress = None if args.quiet else stderr_progress
    t0 = time.time()
    if args.method == AUTO:
        from ..evaluation import choose_and_fit

        method = choose_and_fit(support, backbone, extractor, budget_s=auto.get("budget_s", AUTO_BUDGET_S),
                                with_mma=auto.get("with_mma", False), seed=auto.get("seed", 0),
                                overrides=overrides, progress=progress)
    else:
        method = make_method(args.method, backbone, support.classnames, **overrides)
        method.fit(support, extractor, progress=progress)
    method.metrics["train_seconds"] = round(time.time() - t0, 3)
    out = method.save(args.out)
    if not args.quiet:
        print(file=sys.stderr)
    chosen = method.metrics.get("auto")
    if chosen:
        scores = ", ".join(f"{m} {100 * a:.1f}%" for m, a in chosen["cv_accuracy"].items())
        print(f"auto: cross-validated on {chosen['folds']}: {scores or 'nothing to compare'}; "
              f"chose {method.name} ({chosen['why']})")
        for m, why in chosen["skipped"].items():
            print(f"auto: not compared {m}: {why}")
    print(f"saved {method.label} ({len(support)} images, {support.num_classes} classes) to {out} "
          f"in {time.time() - t0:.1f}s")
    return 0


def cmd_predict(args) -> int:
    from ..data import ImageRef, list_image_files
    from ..imageio import ImageError

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{missing[0]} does not exist.")
    if args.onnx:
        return _predict_onnx(args, [str(f) for f in list_image_files(args.paths)])
    from ..methods import load_model  # torch: not needed by --onnx

    method = load_model(args.model, device=args.device)
    from ..cache import FeatureCache
    from ..features import FeatureExtractor

    extractor = FeatureExtractor(method.backbone, FeatureCache(config_from(args).cache_dir))
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
    _print_predictions([results[p] for p in order], args.json)
    return 0


def _predict_onnx(args, files: list[str]) -> int:
    """`predict --onnx`: the exported graph through onnx_predict (numpy, Pillow, onnxruntime)."""
    import numpy as np

    from ..onnx_predict import OnnxClassifier

    if not Path(args.onnx).is_file():
        raise UserError(f"{args.onnx} does not exist.")
    try:
        clf = OnnxClassifier(args.onnx)
    except ImportError:
        raise UserError("predict --onnx needs onnxruntime; install it with pip install 'fewshot-studio[onnx]'.") from None
    except Exception as e:  # onnxruntime's own errors for a file that is not a model, or ours
        raise UserError(f"{args.onnx} could not be loaded as an exported classifier ({str(e).splitlines()[0][:200]}).") from None
    results, ok, pixels = {}, [], []
    for f in files:
        try:
            pixels.append(clf.pixels([f]))
            ok.append(f)
        except Exception as e:  # an unreadable image is reported, not fatal (as without --onnx)
            results[f] = {"path": f, "error": f"the image could not be read ({type(e).__name__})."}
    if ok:
        probs = np.concatenate([clf.probs_of_pixels(np.concatenate(pixels[i:i + 32]))
                                for i in range(0, len(ok), 32)])
        for f, p in zip(ok, probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            results[f] = {"path": f, "label": clf.classes[best],
                          "probs": dict(zip(clf.classes, [round(x, 6) for x in p]))}
    _print_predictions([results[f] for f in files], args.json)
    return 0


def _print_predictions(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['path']}\tERROR\t{r['error']}")
            else:
                print(f"{r['path']}\t{r['label']}\t{r['probs'][r['label']]:.4f}")


def cmd_export_onnx(args) -> int:
    from ..onnx_export import export_model_dir

    if not Path(args.model).is_dir():
        raise UserError(f"{args.model} is not a model directory.")
    result = export_model_dir(args.model, args.out)
    print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, opset {result.opset}, "
          f"{len(result.classes)} classes): input 'pixels' float32 (N,3,H,W), output 'probs' (N,C)")
    return 0


def cmd_graph(args) -> int:
    from ..methods import load_model

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
    from .. import tiny

    tiny.pretrain(out=Path(args.out) if args.out else tiny.WEIGHTS_PATH, seed=args.seed, steps=args.steps,
                  n_images=args.images)
    return 0


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def cmd_doctor(args) -> int:
    """Check the data folder (database, image files, model directories); print one problem
    per line or "No problems found."; exit 1 when there are problems. With --collect-garbage,
    a healthy folder is also cleared of what crashes leave behind."""
    from ..store import _DB_NAME, ProjectStore, StoreError

    root = config_from(args).data_dir
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


def add_parsers(sub) -> None:
    """The model commands' sub-parsers (their choices read now: a method registered later is listed)."""
    try:
        from ..methods.catalog import AUTO_BUDGET_S, choices
        methods = choices()
    except ImportError:  # no torch on this machine: only `predict --onnx` can run, and needs no method list
        AUTO_BUDGET_S, methods = 60.0, None

    p = sub.add_parser("train", help="train a method on an ImageFolder tree and save the model")
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--method", default="graph", choices=methods,
                   help="the method (default graph); auto cross-validates the cheap methods on the data "
                        "and trains the best")
    add_backbone_args(p)
    p.add_argument("--shots", type=int, default=None, help="sample K images per class (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--recipe", default=None,
                   help="MMA's training recipe: default (few-shot) or official (the MMA code's; README)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"auto: time budget of the cross-validation (default {AUTO_BUDGET_S:g})")
    p.add_argument("--with-mma", action="store_true", help="auto: also compare MMA (always on a GPU)")
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--quiet", action="store_true")
    add_store_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify images or folders with a saved model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model directory written by train or exported by the app")
    which.add_argument("--onnx", help="an exported model.onnx (export-onnx), run with onnxruntime, without torch")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of tab-separated lines")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("paths", nargs="+", help="image files or folders (recursed)")
    add_store_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-onnx", help="export a saved model as one ONNX graph, pixels -> class probabilities")
    p.add_argument("--model", required=True, help="model directory written by train or exported by the app")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export_onnx)

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
