"""`python -m fewshot_studio`: the same pipeline as the app, headless.

Exit codes: 0 success (unreadable inputs are reported, not fatal), 2 a user error
(one line on stderr, no traceback), 1 a benchmark target missed or, for `doctor`, a problem
found in the data folder.

The top layer: each command builds its AppConfig from its flags and the environment and passes
it down (nothing writes os.environ). Commands live in `commands` (train, predict, graph,
pretrain-tiny, doctor), `eval`, `inspect`, `bench` and `label`; `common` holds what they share.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import FewShotError
from . import bench, commands, label
from . import eval as eval_command
from . import inspect as inspect_command
from .common import UserError

__all__ = ["UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fewshot_studio",
                                     description="Few-Shot Studio: few-shot image classifiers on frozen CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_parsers(sub)
    bench.add_parser(sub)
    eval_command.add_parser(sub)
    inspect_command.add_parser(sub)
    label.add_parser(sub)
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
