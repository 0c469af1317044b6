"""A trained model as one ONNX graph, `pixels` -> `probs`, that runs where only onnxruntime is.

The graph is the model's own prediction path, traced: the image encoder (frozen, or with MMA's
adapters inside its tower: `Method.pixel_features`) then the method's head
(`Method.logits_from_features`: Tip-Adapter's cache, GDA's linear term, ProKeR's kernel
coefficients, GraphAdapter's adapted class weights and MMA's adapted class text features all
become constants), then a softmax - the formula `Method.predict_proba` applies, so there is one
definition of each model.

Contract (what `onnx_predict.py` relies on):
    input  `pixels` float32 (N, 3, S, S): the image's plain view, preprocessed as the backbone
           does it (shortest side resized to S bicubic, centre crop, (x/255 - mean) / std);
    output `probs`  float32 (N, C), rows summing to 1; N is dynamic;
    metadata_props: `classes` (JSON list), `image_size`, `mean`, `std` (JSON lists), `backbone`
           (the backbone id), `method`, `format`, `preprocess` (the recipe in words).

Exporter: torch.onnx.export with dynamo=True (the torch.export-based exporter, torch's default
since 2.9; the TorchScript one is deprecated), opset OPSET. Both exporters were tried on the
open_clip ViTs here (tiny and ViT-B-32): both give onnxruntime outputs within 1e-7 of torch; the
dynamo one is kept as the supported path. onnx, onnxruntime and onnxscript are the [onnx] extra.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import DataError
from .methods import Method, load_model

OPSET = 18  # the dynamo exporter's own default opset in torch 2.14; onnxruntime >= 1.14 runs it
FORMAT = "fewshot-studio-onnx-classifier"
PREPROCESS = ("RGB (EXIF orientation applied, alpha on white); shortest side resized to image_size "
              "(bicubic, Pillow reducing_gap=2); centre crop image_size x image_size; "
              "(x/255 - mean) / std per channel; NCHW float32")
INSTALL_HINT = "pip install 'fewshot-studio[onnx]'"


def require_onnx():
    """The onnx package, or one sentence saying how to install the optional extra."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise DataError(f"Exporting to ONNX needs the optional onnx packages; install them with {INSTALL_HINT}.") from None
    return onnx


class ProbabilityGraph(nn.Module):
    """pixels (N,3,S,S) -> probs (N,C): softmax(method.logits_from_features(method.pixel_features(x))).

    The backbone's model is registered here (a Method only references it) so the exporter sees
    its weights as the graph's parameters."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method
        self.encoder = method.backbone.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.method.logits_from_features(self.method.pixel_features(pixels)).float().softmax(-1)


def metadata(method: Method) -> dict[str, str]:
    bb = method.backbone
    return {"format": FORMAT, "classes": json.dumps(method.classnames, ensure_ascii=False),
            "image_size": str(bb.image_size), "mean": json.dumps(list(bb.mean)), "std": json.dumps(list(bb.std)),
            "backbone": bb.id, "method": method.name, "preprocess": PREPROCESS, "opset": str(OPSET)}


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    bytes: int
    opset: int
    classes: list[str]


def export_onnx(method: Method, out: str | os.PathLike) -> OnnxExport:
    """Write `method` as an ONNX classifier (module docstring) to `out`, atomically (a partial
    file is removed on failure). Traced in float32 without autocast: the graph holds exactly the
    computation of CPU inference in this project."""
    onnx = require_onnx()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = ProbabilityGraph(method).eval()
    dev = next(iter(method.backbone.model.parameters())).device
    s = method.backbone.image_size
    example = torch.zeros(2, 3, s, s, device=dev)
    tmp = out.with_name(out.name + ".partial")
    try:
        with torch.no_grad():
            graph(example)  # once eagerly: fills what a method computes once (MMA's class text features)
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=["pixels"], output_names=["probs"],
                                        dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
                                        verbose=False)
        model = program.model_proto
        onnx.helper.set_model_props(model, metadata(method))
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return OnnxExport(out, out.stat().st_size, OPSET, list(method.classnames))


def export_model_dir(model_dir: str | os.PathLike, out: str | os.PathLike) -> OnnxExport:
    """Load a saved model folder on the CPU (its backbone too) and export it (`export_onnx`)."""
    require_onnx()
    return export_onnx(load_model(model_dir, device="cpu"), out)
