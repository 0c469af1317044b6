"""`python -m fewshot_studio eval`: the few-shot protocol on an ImageFolder tree (K shots per class
sampled by seed; tested on the rest or on --test-data), as a markdown table, JSON and a chart."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEEDS, DEFAULT_SHOTS
from ..data import SupportSet
from ..progress import Progress
from .common import UserError, add_backbone_args, add_store_args, backbone_from, extractor_from


def _int_list(text: str, what: str, minimum: int) -> list[int]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise UserError(f"--{what} takes comma-separated whole numbers like 1,2,4; {part!r} is not one.") from None
        if v < minimum:
            raise UserError(f"--{what} values must be at least {minimum}; got {v}.")
        out.append(v)
    return out


class _Bars:
    """tqdm bars on stderr for the evaluation's Progress reports: one for feature extraction,
    one for the seeds × shots × methods runs (with the current training step as postfix)."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bars: dict[str, Any] = {}
        self._last = 0.0
        self._where = ""

    def _bar(self, key: str, total: int, desc: str):
        from tqdm import tqdm

        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, desc=desc, file=sys.stderr, disable=self.disable,
                                        leave=False, dynamic_ncols=True, unit="run" if key == "runs" else "img")
        return bar

    def __call__(self, p: Progress) -> None:
        if p.stage.startswith("Extracting"):
            bar = self._bar("features", p.total, "features")
            bar.update(max(0, p.step - bar.n))
            return
        if "features" in self.bars:
            self.bars.pop("features").close()
        bar = self._bar("runs", p.total, "evaluating")
        where, _, what = p.stage.partition(": ")  # "Seed 1, 2 shots" / "GraphAdapter: Training 5/300"
        now = time.monotonic()
        if p.step != bar.n or where != self._where:
            self._where = where
            bar.set_description_str(where, refresh=False)
            bar.set_postfix_str(what.partition(": ")[0], refresh=False)
            bar.update(p.step - bar.n)
        elif now - self._last > 0.5:
            self._last = now
            bar.set_postfix_str(what, refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _write_plot(fig, path: Path) -> list[Path]:
    """HTML always (the chart is interactive); PNG when kaleido is importable."""
    import importlib.util

    path.parent.mkdir(parents=True, exist_ok=True)
    has_kaleido = importlib.util.find_spec("kaleido") is not None
    written: list[Path] = []
    png = path if path.suffix.lower() == ".png" else path.with_suffix(".png")
    html = path.with_suffix(".html") if path.suffix.lower() == ".png" else path
    if path.suffix.lower() != ".png" or not has_kaleido:
        fig.write_html(str(html))
        written.append(html)
    if has_kaleido:
        try:
            fig.write_image(str(png))
            written.append(png)
        except Exception as e:  # kaleido present but unusable (e.g. no browser for kaleido 1.x)
            if not written:
                fig.write_html(str(html))
                written.append(html)
            print(f"note: could not write {png} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  f"the chart is in {html}.", file=sys.stderr)
    elif path.suffix.lower() == ".png":
        print(f"note: kaleido is not installed, so the chart went to {html} instead of a PNG "
              "(pip install kaleido for PNG).", file=sys.stderr)
    else:
        print("note: kaleido is not installed; wrote only the HTML chart (pip install kaleido for a PNG).",
              file=sys.stderr)
    return written


def cmd_eval(args) -> int:
    from ..evaluation import run_protocol, usable_shots  # torch: not needed to build the parser
    from ..methods import catalog

    shots = _int_list(args.shots, "shots", 1)
    seeds = _int_list(args.seeds, "seeds", 0)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods:
        raise UserError("--methods needs at least one method.")
    for m in methods:
        if m not in catalog.choices():
            raise UserError(f"Unknown method {m!r} in --methods; choose from {','.join(catalog.choices())}.")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1; got {args.steps}.")

    train, errors = SupportSet.from_folder(args.data)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    test = None
    if args.test_data:
        tset, errors = SupportSet.from_folder(args.test_data)
        for e in errors:
            print(f"skipped {e}", file=sys.stderr)
        index = {c: i for i, c in enumerate(train.classnames)}
        extra = [c for c in tset.classnames if c not in index]
        if extra:
            raise UserError(f"The test folder has class {extra[0]!r}, which {args.data} does not have; "
                            "use the same class folder names in both.")
        test = (tset.images, [index[tset.classnames[y]] for y in tset.labels])
        if not tset.images:
            raise UserError(f"The test folder {args.test_data} has no readable images.")
    ok, skipped = usable_shots(train.counts(), train.classnames, sorted(set(shots)), holdout=test is None)
    for s in skipped:
        print(s, file=sys.stderr)
    if not ok:
        raise UserError(f"No requested shot count fits {args.data}: the smallest class has "
                        f"{min(train.counts())} images{'' if test is not None else ' and one must stay for testing'}.")

    overrides: dict[str, dict] = {}
    if args.steps is not None:
        for m in methods:
            if m != catalog.AUTO and "steps" in catalog.settings(m):
                overrides[m] = {"steps": args.steps}
        if catalog.AUTO in methods:  # Auto's candidates train with the same steps
            for m in catalog.auto_candidates(gpu=True):
                if "steps" in catalog.settings(m):
                    overrides[m] = {"steps": args.steps}
    backbone = backbone_from(args)
    extractor = extractor_from(backbone, args)
    bars = _Bars(disable=args.quiet)
    try:
        report = run_protocol(train, test, ok, seeds, methods, backbone, extractor, overrides, progress=bars)
    finally:
        bars.close()
    print(report.to_markdown())
    print()
    print(report.caption())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
        print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        from ..viz import accuracy_plot

        for p in _write_plot(accuracy_plot(report), Path(args.plot)):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    try:
        from ..methods import catalog
        every = ",".join(catalog.by_cost(catalog.method_ids()))  # now: a method registered later is listed
    except ImportError:  # no torch on this machine: only `predict --onnx` can run
        every = ""

    p = sub.add_parser(
        "eval", help="the standard K-shot protocol: mean ± std accuracy over seeds per method and shot count",
        description="Sample K images per class from DIR by seed, train each method, test on --test-data "
                    "(or on the images not sampled); print a markdown table of mean ± std accuracy.")
    p.add_argument("--data", required=True, help="ImageFolder tree to sample the K-shot training sets from")
    p.add_argument("--test-data", default=None,
                   help="ImageFolder tree to test on (default: the images of --data not sampled)")
    p.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)),
                   help="comma-separated shots per class (default 1,2,4,8,16); counts a class cannot supply are skipped")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--methods", default=every,
                   help=f"comma-separated methods (default {every}); also auto: cross-validates the "
                        "cheap methods on each K-shot training set (no time budget) and trains the best")
    add_backbone_args(p)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for the methods that have a steps setting (graph, mma), for quick runs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the runs and the summary as JSON")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="accuracy-vs-shots chart: HTML (plus a PNG beside it when kaleido is installed), "
                        "or a .png path (needs kaleido)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_store_args(p)
    p.set_defaults(func=cmd_eval)
