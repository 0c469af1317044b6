"""Speed and load harnesses (`python -m fewshot_studio bench`), imported only by the CLI and tests.

`speed`: the speed targets, each a ratio of two timings on this machine (see its docstring);
`load`: the real app on loopback under concurrent sessions while a training job runs.
"""
import importlib

from .config import BenchConfig, BenchError

__all__ = ["TARGETS", "BenchConfig", "BenchError", "markdown_table", "missed_targets", "random_weights_backbone",
           "report", "run_bench"]


def __getattr__(name: str):
    """The harness (torch) loads on first use: `config` alone builds the CLI's parser."""
    if name in __all__:
        return getattr(importlib.import_module(".speed", __name__), name)
    raise AttributeError(name)
