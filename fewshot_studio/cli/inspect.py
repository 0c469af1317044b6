"""`python -m fewshot_studio inspect`: near-duplicates, likely label errors and pool outliers of an
ImageFolder tree of examples (and an optional folder of unlabeled pool images), from their
features (`fewshot_studio.insight`), as text, JSON and an embedding map page."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..data import ImageRef, SupportSet, list_image_files
from ..imageio import ImageError
from .common import UserError, add_backbone_args, add_store_args, backbone_from, extractor_from, stderr_progress


def _pool_refs(folder: str) -> list[ImageRef]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"The pool folder {folder} does not exist or is not a folder.")
    refs = []
    for p in list_image_files([root]):
        try:
            refs.append(ImageRef.from_path(p))
        except ImageError as e:
            print(f"skipped {e}", file=sys.stderr)
    return refs


def inspect_report(support: SupportSet, pool: list[ImageRef], examples_f: np.ndarray, pool_f: np.ndarray,
                   threshold: float, seed: int = 0) -> dict:
    """The JSON report (the issue's schema), every list most likely first; paths as the refs
    name them (as given on the command line)."""
    from .. import insight

    refs = list(support.images) + list(pool)
    feats = np.concatenate([examples_f, pool_f]) if len(pool_f) else examples_f
    pairs = insight.near_duplicates(feats, threshold)
    C = support.num_classes
    probs, tested = insight.out_of_sample_probs(examples_f, support.labels, C, seed=seed)
    issues = insight.label_issues(support.labels, probs, tested)
    found, _ = (insight.outliers(pool_f, examples_f, support.labels, C) if len(pool_f) and len(examples_f)
                else ([], 0.0))
    return {
        "duplicates": [{"a": refs[i].name, "b": refs[j].name, "similarity": round(s, 6)} for i, j, s in pairs],
        "label_issues": [{"path": refs[e.index].name, "given": support.classnames[e.given],
                          "suggested": support.classnames[e.suggested], "score": round(e.score, 6)} for e in issues],
        "outliers": [{"path": pool[i].name, "score": round(s, 6)} for i, s in found],
    }


def cmd_inspect(args) -> int:
    from .. import insight

    if not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold is a cosine similarity in (0, 1]; got {args.threshold}.")
    support, errors = SupportSet.from_folder(args.data)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    if not len(support):
        raise UserError(f"The data folder {args.data} has no readable images.")
    pool = _pool_refs(args.pool) if args.pool else []
    backbone = backbone_from(args)
    extractor = extractor_from(backbone, args)
    progress = None if args.quiet else stderr_progress
    feats = extractor.image_features(list(support.images) + pool, progress=progress)[:, 0].numpy()
    if progress is not None:
        print(file=sys.stderr)
    examples_f, pool_f = feats[:len(support)], feats[len(support):]
    report = inspect_report(support, pool, examples_f, pool_f, args.threshold, args.seed)
    print(f"{len(report['duplicates'])} near-duplicate pairs (cosine >= {args.threshold:g}), "
          f"{len(report['label_issues'])} examples that may be in the wrong class, "
          f"{len(report['outliers'])} pool images unlike every class.")
    for d in report["duplicates"][:10]:
        print(f"  duplicate  {d['similarity']:.3f}  {d['a']}  {d['b']}")
    for e in report["label_issues"][:10]:
        print(f"  label      {e['score']:.3f}  {e['path']}: {e['given']} -> {e['suggested']}?")
    for o in report["outliers"][:10]:
        print(f"  outlier    {o['score']:.3f}  {o['path']}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        print(f"wrote {path}", file=sys.stderr)
    if args.map:
        from ..viz import UNPREDICTED_NAME, embedding_map_figure

        m = insight.embedding_map(feats, seed=args.seed)
        n_ex = len(support)
        outlying = {o["path"] for o in report["outliers"]}
        # pool points coloured by their nearest class mean (no model is trained here)
        groups = [support.classnames[y] for y in support.labels]
        conf: list[float | None] = [None] * n_ex
        if len(pool_f):
            onehot = np.eye(support.num_classes, dtype=np.float32)[support.labels]
            means = onehot.T @ examples_f
            means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
            sims = pool_f @ means.T
            groups += [support.classnames[k] if support.counts()[k] else UNPREDICTED_NAME for k in sims.argmax(1)]
            conf += [float(s) for s in np.clip(sims.max(1), 0, 1)]
        refs = list(support.images) + pool
        fig = embedding_map_figure(m.coords, groups, list(range(len(refs))), [r.name for r in refs],
                                   [i < n_ex for i in range(len(refs))], conf,
                                   [r.name in outlying and i >= n_ex for i, r in enumerate(refs)],
                                   title=f"Embedding map ({m.method.upper()}, seed {args.seed})")
        path = Path(args.map)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(str(path), include_plotlyjs=True)  # standalone: works offline
        print(f"wrote {path}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    try:
        from ..insight import DUPLICATE_THRESHOLD
    except ImportError:  # no torch on this machine: only `predict --onnx` can run (cli.commands.add_parsers)
        DUPLICATE_THRESHOLD = None

    p = sub.add_parser(
        "inspect", help="find near-duplicates, likely label errors and pool outliers",
        description="Near-duplicate pairs (cosine similarity of features), examples that may be in the wrong "
                    "class (confident learning on cross-validated probabilities) and pool images unlike every "
                    "class, each list most likely first.")
    p.add_argument("--data", required=True, help="ImageFolder tree of examples (DIR/class_name/image.jpg)")
    p.add_argument("--pool", default=None, help="folder of unlabeled images")
    add_backbone_args(p)
    p.add_argument("--threshold", type=float, default=DUPLICATE_THRESHOLD,
                   help=f"cosine similarity at or above which two images are near-duplicates (default {DUPLICATE_THRESHOLD})")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds and of the map")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--map", default=None, metavar="FILE", help="write the embedding map as a standalone HTML page")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_store_args(p)
    p.set_defaults(func=cmd_inspect)
