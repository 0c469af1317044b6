"""The ONNX classifier against torch on the CPU (issue #17): file size, export time, and the
latency of one image and of a batch of 32, for each backbone (random weights: the sizes and
speeds of the real architecture without a download).

    python -m fewshot_studio bench --onnx [--onnx-backbones tiny ViT-B-32] [--repeats 5] [--threads N] [--json FILE]

Both sides run the same graph (`onnx_export.ProbabilityGraph`: the encoder plus a zero-shot
head over 10 classes; the head is a C×d product, noise beside the encoder) on the same
preprocessed pixels, one after the other per round (interleaved, so a busy machine slows both
alike), with the same number of intra-op threads (onnxruntime's spinning off, so neither side's idle
threads take the cores from the other); the median of `repeats` rounds after one
warm-up is reported. Torch runs eagerly in float32 under inference_mode, as the project's
CPU prediction does; onnxruntime with its default graph optimisations.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..methods import make_method
from ..onnx_export import ProbabilityGraph, export_onnx
from .speed import random_weights_backbone

CLASSES = [f"class {i}" for i in range(10)]


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def bench_backbone(name: str, repeats: int = 5, threads: int | None = None,
                   batches: Sequence[int] = (1, 32)) -> dict:
    import onnxruntime as ort

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    bb = random_weights_backbone(name, "cpu")
    method = make_method("zeroshot", bb, CLASSES)
    method.text_weights = F.normalize(torch.randn(len(CLASSES), bb.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    graph = ProbabilityGraph(method).eval()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        result = export_onnx(method, Path(d) / "model.onnx")
        export_s = time.perf_counter() - t0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # onnxruntime's threads spin for a while after each run by default: interleaved with torch
        # they took the cores from it (measured: torch on tiny 709 ms an image with spinning,
        # against tens of ms without)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
        out = {"backbone": name, "onnx_mb": round(result.bytes / 1e6, 2), "export_s": round(export_s, 1),
               "opset": result.opset, "threads": threads}
        rng = np.random.default_rng(0)
        for n in batches:
            x = rng.standard_normal((n, 3, bb.image_size, bb.image_size)).astype(np.float32)
            xt = torch.from_numpy(x)

            def run_torch():
                with torch.inference_mode():
                    return graph(xt)

            def run_ort():
                return session.run(["probs"], {"pixels": x})[0]

            # the warm-up (first-run allocations, onnxruntime's kernel choices) and the check
            diff = float(np.abs(run_ort() - run_torch().numpy()).max())
            torch_ms, ort_ms = [], []
            for _ in range(repeats):  # interleaved rounds
                torch_ms.append(_ms(run_torch))
                ort_ms.append(_ms(run_ort))
            out[f"batch{n}"] = {"torch_ms": round(statistics.median(torch_ms), 2),
                                "onnxruntime_ms": round(statistics.median(ort_ms), 2),
                                "speedup": round(statistics.median(torch_ms) / statistics.median(ort_ms), 2),
                                "max_abs_diff": diff}
    return out


def run_onnx_bench(backbones: Sequence[str], repeats: int = 5, threads: int | None = None,
                   json_path: str | None = None, log: Callable[[str], None] = print) -> int:
    rows = []
    for name in backbones:
        r = bench_backbone(name, repeats, threads)
        rows.append(r)
        log(json.dumps(r))
    print("| backbone | ONNX file | export | torch 1 image | onnxruntime 1 image | torch batch 32 | onnxruntime batch 32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b1, b32 = r["batch1"], r["batch32"]
        print(f"| {r['backbone']} | {r['onnx_mb']} MB | {r['export_s']} s | {b1['torch_ms']} ms | "
              f"{b1['onnxruntime_ms']} ms | {b32['torch_ms']} ms | {b32['onnxruntime_ms']} ms |")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0
