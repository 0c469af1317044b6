"""Run an exported ONNX classifier with numpy, Pillow and onnxruntime only (no torch, nothing
else of this project): copy this one file next to `model.onnx` and

    python onnx_predict.py model.onnx photo.jpg other.png
    # or: from onnx_predict import OnnxClassifier; OnnxClassifier("model.onnx").predict(["photo.jpg"])

The preprocessing re-implements the backbone's plain view from the graph's metadata
(`image_size`, `mean`, `std`), step for step as fewshot_studio.imageio.decode_image +
preprocess.Cropper.plain + preprocess.normalize do it: JPEGs decoded at the largest 1/2, 1/4 or
1/8 scale that keeps both sides >= image_size (Pillow's draft), EXIF orientation applied,
transparency composited on white, RGB; shortest side resized to image_size (bicubic, Pillow's
reducing_gap=2); centre crop; (x/255 - mean) / std. tests/test_onnx.py checks the pixels equal
the project's within 1e-4 and the probabilities too.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

FORMAT = "fewshot-studio-onnx-classifier"


def load_rgb(path: str, draft_size: int) -> Image.Image:
    """The image as 8-bit RGB, oriented, transparency on white."""
    with Image.open(path) as im:
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        oriented = ImageOps.exif_transpose(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info or (
            im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA")
        if has_alpha:
            rgba = oriented.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return oriented.convert("RGB")


def plain_view(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shortest side resized to `size` (bicubic), centre crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N,s,s,3) uint8 -> (N,3,s,s) float32 (x/255 - mean) / std."""
    std32 = np.asarray(std, dtype=np.float32)
    scale = (1 / (255 * std32)).astype(np.float32)[:, None, None]
    offset = (-np.asarray(mean, dtype=np.float32) / std32)[:, None, None]
    return (crops.transpose(0, 3, 1, 2).astype(np.float32) * scale + offset).astype(np.float32)


class OnnxClassifier:
    """An exported Few-Shot Studio classifier: `probs(paths)` (N, C) and `predict(paths)`."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a Few-Shot Studio ONNX classifier (its metadata has no format "
                             f"{FORMAT!r}).")
        self.classes: list[str] = json.loads(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.mean = json.loads(meta["mean"])
        self.std = json.loads(meta["std"])
        self.metadata = dict(meta)

    def pixels(self, paths: Sequence[str]) -> np.ndarray:
        """(N,3,s,s) float32 network input of the images at `paths`."""
        s = self.image_size
        crops = np.stack([plain_view(load_rgb(p, s), s) for p in paths]) if len(paths) else \
            np.zeros((0, s, s, 3), np.uint8)
        return normalize(crops, self.mean, self.std)

    def probs_of_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["probs"], {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def probs(self, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, C) class probabilities, `batch_size` images per run."""
        out = [self.probs_of_pixels(self.pixels(paths[i:i + batch_size])) for i in range(0, len(paths), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, paths: Sequence[str]) -> list[dict]:
        """[{"file", "label", "confidence"}] per image."""
        p = self.probs(paths)
        best = p.argmax(1) if len(p) else np.zeros(0, int)
        return [{"file": str(f), "label": self.classes[int(k)], "confidence": float(p[i, k])}
                for i, (f, k) in enumerate(zip(paths, best))]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python onnx_predict.py model.onnx IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    for row in OnnxClassifier(args[0]).predict(args[1:]):
        print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
