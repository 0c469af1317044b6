"""Speed and load harnesses (`python -m fewshot_studio bench`), imported only by the CLI and tests.

`speed`: the speed targets, each a ratio of two timings on this machine (see its docstring);
`load`: the real app on loopback under concurrent sessions while a training job runs.
"""
from .speed import TARGETS, BenchConfig, BenchError, markdown_table, missed_targets, random_weights_backbone, report, run_bench

__all__ = ["TARGETS", "BenchConfig", "BenchError", "markdown_table", "missed_targets", "random_weights_backbone",
           "report", "run_bench"]
