"""`python -m fewshot_studio bench`: the speed targets, each measured as a ratio of two timings
taken side by side in one run.

    python -m fewshot_studio bench [--backbone NAME] [--random-weights] [--device cpu|cuda]
                                   [--classes C] [--shots K] [--json FILE]
    python -m fewshot_studio bench --load [--backbone NAME] [--device cpu|cuda] [--clients N]
                                   [--requests M] [--json FILE]

prints a markdown table (key | value | target | met | absolute figures), writes the same results as
JSON with --json, and exits 1 naming every missed target (2 for a usage error, 0 when all are met).

Workload. Synthetic coloured-shape images (`shapes.render`) at realistic upload sizes: 224-256 px
squares, alternately JPEG (quality 90) and PNG, written to files in a temporary folder and used
as `ImageRef.from_path` refs, as the app and the CLI do (a ref hashes its file when it is added,
so hashing is outside every timing). A pool of `--images` such images feeds the pipeline,
cache and labeling measurements; `--classes` × `--shots` more form the support set of the training
measurements. Each measurement works on an empty feature cache of its own unless it says
otherwise: a cache folder whose entries from earlier rounds are deleted before each round, its
backbone folder kept, as in any cache after its first use.

Statistics. Every ratio has two sides measured alternately within each of R rounds (their
order flips every round), so slow drifts and bursts of load hit both. Each side's figure is its
fastest round: other processes on a shared machine can only add time, so the fastest of R
repeats is the best estimate of the uncontended figure (timeit's rule); the key is the ratio of
the two sides' fastest times. The median over rounds of the per-round ratio is reported next to
it as `<key>_median`, and the CPU time other processes used meanwhile as `background_cpu_cores`.
`closed_form_refit_ms`, a latency rather than a ratio, is the median of its R rounds (a target a
user should meet on a typical click, not on the luckiest one).

Threads. On a CPU the run uses `--threads` torch intra-op threads (default: cores - 1) and
`--workers` helper processes (default: the remaining cores; they decode and write the cache, see
workers.py), so the encoder and the decoding each have a core; every measurement, both sides
of every ratio, runs with that same setting. On CUDA, torch's own thread setting and the
extractor's default workers are kept.

Definitions (one line each, as the README quotes them):

* `pipeline_vs_raw_encode` = images/s of the full feature pipeline ÷ images/s of the bare encoder.
  Pipeline: `FeatureExtractor.image_features` on the pool's file refs with an empty cache -
  read, decode, preprocess, batch, encode, cache write. Bare encoder: the same images already
  decoded and preprocessed to one tensor, `backbone.encode_images` looped over it in the
  pipeline's batch size, with the same torch threads. It measures how well the pipeline keeps
  its encoder busy (decode overlapped with encoding). `raw_encode_all_cores_images_per_s` is the
  bare encoder on every core and `pipeline_vs_raw_encode_all_cores` the pipeline against that.
* `cache_hit_speedup` = pipeline time ÷ cache-hit time for the same images: a fresh FeatureCache
  object (empty memory, reading the entries the pipeline just wrote from disk; the OS file cache
  is warm, as right after an extraction), checked to encode nothing and return the same features.
* `graph_retrain_ratio` = GraphAdapter refit time after adding one image ÷ first training time.
  First: `fit` on the C×K support set with an empty cache and a new extractor, as a user's first
  training (feature extraction of 1 + augment_views views per image, class text features, the
  300 steps). Refit: `fit` again with one more image through the same extractor (warm cache:
  only the new image's views are encoded; the 300 steps run in full).
* `mma_cached_speedup` = MMA epoch time without ÷ with the lower-block cache (default MMA
  settings, ceil(C·K / batch) steps of the method's own training step). With the cache
  (`cache_lower=True`, `MMA.time_epoch`): steps run only the adapted blocks on cached outputs of
  the frozen lower blocks per (image, view) and prompt; building the cache is a one-time cost,
  reported as `mma_prepare_seconds_cached`. Without it, as the official pipeline trains: every
  step reads, decodes and augments its batch's images (same images and views) and runs both
  towers in full, forward and backward. mma.py's own uncached path keeps pre-decoded pixels and
  so times the blocks alone; that figure is reported as `mma_blocks_only_speedup`.
* `graph_batched_speedup` = time of one GraphAdapter training step (forward + backward) written
  as the per-class loop (`graph_adapter_loop_reference`) ÷ the batched step, at C = 100 classes,
  d = the backbone's embedding width, K shots of features per class. The batched step uses the
  aggregated graph neighbourhoods that `fit` computes once per training
  (`graph_messages`); `graph_step_ms_batched_with_messages` adds computing them.
* `first_model_seconds` = seconds from the last upload to a usable model, through the app's use
  cases (app.library, app.modeling) on a fresh workspace: 5 classes × 16 photos (1024×768 JPEG
  q90) are uploaded class by class (`library.add_uploads`, which starts the background encoding
  of the plain views), then, clock started, `modeling.start_training` with GDA; the clock stops
  when the job's first model (fitted on plain views) is registered, loaded (`ws.load_method`)
  and has predicted one support image. The refinement with augmented views that follows is
  reported as `first_model_refined_seconds` (same clock). `first_model_vs_encode` = that time ÷
  one plain encoding pass of the same 80 photos (`FeatureExtractor.image_features`, empty
  cache, the workspace's extractor settings). Rounds: at most 3.
* `labeling_vs_extraction` = pool-labeling images/s ÷ feature-extraction images/s over the same
  pool, each with an empty cache: labeling is what `app.modeling.label_pool` runs (one
  `predict_proba` call of the trained GraphAdapter over the whole pool: decode, features, logits, probabilities,
  then the best class and its confidence); extraction is `FeatureExtractor.image_features`.

* `closed_form_refit_ms` = milliseconds of a GDA refit after one accepted label, features cached:
  what `app.modeling.instant_refit` runs when a label is accepted with a closed-form model in use.
  A GDA model is fitted on the C×K support set (its α search on, the default); then one more
  image, whose plain and augmented views are already cached, joins class 0, and a new GDA with
  the first one's searched α and the search off (`fixed_settings`) is built and fitted on it.
  An absolute latency, not a ratio: the key is the median of R such refits (the fastest beside
  it as `closed_form_refit_ms_fastest`); `closed_form_refit_ms_with_search` is the same refit
  with the search on (the background re-search that follows), and the model's registration and
  the pool's new predictions are not in it (`labeling_vs_extraction` covers labeling).

* `pool_first_page_s`, `pool_label_images_per_s`, `pool_action_p95_ms`,
  `pool_upload_thumbs_ms_per_image`: the long-pool scenario (`_section_pool`, one round): a
  zip of `--pool-images` (10,000) small generated PNGs in the pool of a 5-class project with a
  zero-shot model. Seconds from submitting the labeling job to the first page of scored rows;
  pool images per second of the whole labeling job (reported, no target: the encoder sets it);
  the p95 of one labeling action (accept one image, then fetch the next 200-row page and its
  48 thumbnails) with the whole pool scored; ms per image of making the JPEG thumbnails of
  freshly uploaded 224-256 px images. Targets: the first page within 5 s (the first chunk is 32
  images: under 2 s of ViT-B-32 on this CPU, so 5 s leaves room for loading and a busy
  machine); an action within 300 ms (a key press that answers slower than that reads as lag,
  and 10,000 pool images must cost no more than 15); 5 ms a thumbnail (JPEG measured 1.7 ms at
  ViT-B-32 upload sizes, PNG 15 ms).

Absolute figures behind each ratio (images/s, seconds, ms per step), the peak resident memory of
the process and, on CUDA, the peak GPU memory of each section go under `absolute`; the device,
the torch and open_clip versions, the backbone, the targets and the missed keys sit beside them.

`bench --load` runs instead of the speed suite (`cmd_bench_load`): it launches the real app on
loopback (`bench.load.run_load`) and has `--clients` sessions make `--requests` predictions each
while a training job runs, then reports `load_p50_ms` and `load_p95_ms` (latency, reported only)
and `load_errors` (target: 0; exit 1 otherwise). Nothing in the speed suite depends on it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import GRAPH_CLASSES, POOL_IMAGES, BenchConfig, BenchError
from ..workers import helper_cpu_seconds

# key -> (comparison, target); ">=" means higher is better
TARGETS: dict[str, tuple[str, float]] = {
    "pipeline_vs_raw_encode": (">=", 0.9),
    "cache_hit_speedup": (">=", 20.0),
    "graph_retrain_ratio": ("<=", 0.1),
    "mma_cached_speedup": (">=", 1.5),
    "graph_batched_speedup": (">=", 10.0),
    "labeling_vs_extraction": (">=", 0.9),
    "closed_form_refit_ms": ("<=", 50.0),
    "first_model_seconds": ("<=", 10.0),
    "first_model_vs_encode": ("<=", 1.5),
    "pool_first_page_s": ("<=", 5.0),
    "pool_action_p95_ms": ("<=", 300.0),
    "pool_upload_thumbs_ms_per_image": ("<=", 5.0),
}
#: Keys measured and reported without a target (a speed set by the backbone, not by the app).
REPORTED = ("pool_label_images_per_s",)
#: Keys measured in one round (the long-pool scenario builds a 10,000-image pool once): no
#: `<key>_median` beside them.
ONE_ROUND = ("pool_first_page_s", "pool_action_p95_ms", "pool_upload_thumbs_ms_per_image")
KEYS = tuple(TARGETS) + REPORTED

IMAGE_SIZES = (224, 256)  # inclusive range of the square test images' sides, in pixels
# the first-model scenario (issue #14, item 6): 5 classes × 16 photos of 1024×768 JPEG, trained
# with a closed-form method through the app's use cases
FIRST_MODEL_CLASSES, FIRST_MODEL_SHOTS, PHOTO_SIZE, FIRST_MODEL_METHOD = 5, 16, (1024, 768), "gda"
# the long-pool scenario (issue #15, item 6): a 10,000-image pool of small generated images
POOL_IMAGE_PX, POOL_CLASSES, POOL_ACTIONS, POOL_THUMB_IMAGES = 64, 5, 40, 200


# ---- small helpers ------------------------------------------------------------------------------

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class _LoadMeter:
    """CPU time used by other processes (Linux /proc/stat minus this process and its helper
    processes), in cores."""

    def __init__(self):
        self.ok = os.path.exists("/proc/stat")

    def snap(self):
        if not self.ok:
            return None
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + helper_cpu_seconds()

    @staticmethod
    def others(a, b) -> float | None:
        if a is None or b is None or b[0] <= a[0]:
            return None
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


@dataclass
class _Sides:
    """Timings of the two (or more) sides of some ratios, one list entry per round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, s: float) -> None:
        self.seconds.setdefault(name, []).append(float(s))

    def best(self, name: str) -> float:
        return min(self.seconds[name])

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, num: str, den: str) -> tuple[float, float]:
        """(ratio of the fastest rounds, median of the per-round ratios) of num/den seconds."""
        per_round = [a / b for a, b in zip(self.seconds[num], self.seconds[den]) if b > 0]
        return self.best(num) / self.best(den), statistics.median(per_round)


def _interleave(rounds: int, sides: list[tuple[str, Callable[[int], float]]], result: _Sides,
                meter: _LoadMeter, load: list[float]) -> None:
    """Run each side once per round, the order reversed every other round; each side returns its
    own measured seconds (set-up outside its clock)."""
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        a = meter.snap()
        for name, fn in order:
            result.add(name, fn(r))
        o = _LoadMeter.others(a, meter.snap())
        if o is not None:
            load.append(o)


# ---- the workload ------------------------------------------------------------------------------

def class_names(n: int) -> list[tuple[str, str]]:
    """(class name, colour-shape label it depicts) for n classes; beyond the 48 shape classes the
    names repeat with a number (timing only: such classes look alike)."""
    from ..shapes import CLASSES

    out = []
    for c in range(n):
        label = CLASSES[c % len(CLASSES)]
        out.append((label if c < len(CLASSES) else f"{label} {c // len(CLASSES) + 1}", label))
    return out


def write_images(folder: Path, labels: list[str], seed: int) -> list:
    """One image file per label: 224-256 px, JPEG (even positions) or PNG (odd). Returns refs."""
    from ..data import ImageRef
    from ..shapes import ShapeSpec, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for n, label in enumerate(labels):
        size = int(rng.integers(IMAGE_SIZES[0], IMAGE_SIZES[1] + 1))
        img = render(ShapeSpec(*label.split(" ", 1)), rng, size=size, supersample=2)
        if n % 2 == 0:
            path = folder / f"{n:05d}.jpg"
            img.save(path, "JPEG", quality=90)
        else:
            path = folder / f"{n:05d}.png"
            img.save(path, "PNG")
        refs.append(ImageRef.from_path(path))
    return refs


class _DecodeOnAccess:
    """Stands in for `MMATrainData.images` without the lower-block cache: indexing it with
    [image indices, view indices] reads, decodes and augments those images then and there, as a
    data loader does for every batch of the official training."""

    device = torch.device("cpu")
    ndim = 5

    def __init__(self, refs, views: int, backbone):
        self.refs = list(refs)
        self.backbone = backbone
        s = backbone.image_size
        self.shape = (len(self.refs), views, 3, s, s)

    def __getitem__(self, key) -> torch.Tensor:
        idx, views = key
        bb = self.backbone
        out = []
        for i, v in zip(idx.tolist(), views.tolist()):
            ref = self.refs[i]
            out.append(bb.augment(ref.open(draft_size=bb.image_size), ref.hash, int(v)))
        return torch.stack(out)


def write_photos(folder: Path, labels: list[str], seed: int, size: tuple[int, int] = PHOTO_SIZE) -> list[Path]:
    """One photo-sized JPEG (q90) per label: a shape rendered on a `size[0]`-px square, cropped to
    `size`, with mild pixel noise so that the file and its decoding cost are a photo's."""
    from ..shapes import ShapeSpec, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for n, label in enumerate(labels):
        img = np.asarray(render(ShapeSpec(*label.split(" ", 1)), rng, size=w, supersample=1), dtype=np.int16)
        top = (w - h) // 2
        img = img[top:top + h] + rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
        path = folder / f"{n:03d}.jpg"
        from PIL import Image

        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def random_weights_backbone(name: str, device: str | None):
    """The open_clip architecture `name` (or 'tiny') with random weights: speed figures of a big
    backbone without downloading it."""
    import open_clip

    from .. import tiny
    from ..backbone import TINY, Backbone, BackboneSpec, resolve_device
    from ..prompts import templates_for

    tiny.register()
    arch = tiny.MODEL_NAME if name == TINY else name
    if arch not in open_clip.list_models():
        raise BenchError(f"'{name}' is not an open_clip model name; pick one of open_clip.list_models() "
                         f"(e.g. ViT-B-32) or 'tiny'.")
    dev = resolve_device(device)
    torch.manual_seed(0)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: that is the point
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.disable(previous)
    templates = templates_for(tiny=name == TINY)
    spec = BackboneSpec(name, None, None, device)
    return Backbone(model, open_clip.get_tokenizer(arch), spec, f"{arch}@random-weights", dev, templates)


# ---- the speed suite -----------------------------------------------------------------------------

@dataclass
class _Ctx:
    backbone: object
    cfg: BenchConfig
    work: Path
    workers: int
    log: Callable[[str], None]
    meter: _LoadMeter = field(default_factory=_LoadMeter)
    results: dict = field(default_factory=dict)
    absolute: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def extractor(self, cache_dir: Path | None):
        from ..cache import FeatureCache
        from ..features import FeatureExtractor

        cache = FeatureCache(cache_dir) if cache_dir is not None else None
        return FeatureExtractor(self.backbone, cache, batch_size=self.cfg.batch_size, workers=self.workers)

    def emptied_cache(self, name: str) -> Path:
        """The cache folder `name` with every pack deleted but its backbone folder kept: an
        empty cache as after its first use (creating a brand-new cache's folders is a one-time
        cost that this file system charges unevenly)."""
        d = self.work / name
        for folder, _, files in os.walk(d):
            for f in files:
                os.unlink(os.path.join(folder, f))
        return d

    def fresh_dir(self, name: str) -> Path:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        return d

    def timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(self.device)
        return time.perf_counter() - t0, out

    @contextlib.contextmanager
    def section(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log(f"bench: {name}...")
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            self.absolute[f"peak_gpu_mb_{name.split(' ')[0]}"] = round(
                torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.absolute.setdefault("section_seconds", {})[name.split(" ")[0]] = round(time.perf_counter() - t0, 2)

    def put(self, key: str, best: float, median: float) -> None:
        self.results[key] = best
        self.absolute[f"{key}_median"] = median


def _section_pipeline(ctx: _Ctx, pool: list) -> None:
    """pipeline_vs_raw_encode and cache_hit_speedup."""
    bb, cfg = ctx.backbone, ctx.cfg
    n, bs = len(pool), cfg.batch_size
    pixels = torch.stack([bb.preprocess(r.open(draft_size=bb.image_size)) for r in pool])
    reference = torch.cat([bb.encode_images(pixels[s:s + bs], batch_size=bs) for s in range(0, n, bs)])
    # warm-up, as the bare encoder's was the reference pass above: one untimed pass over the whole
    # pool, so the helper process and this one have touched the memory the measured passes use
    # (fresh memory is slow to touch the first time on virtual machines)
    ctx.extractor(ctx.emptied_cache("cache-pipeline")).image_features(pool)

    def raw(_r: int) -> float:
        return ctx.timed(lambda: [bb.encode_images(pixels[s:s + bs], batch_size=bs) for s in range(0, n, bs)])[0]

    hit_seconds: list[float] = []

    def pipeline(r: int) -> float:
        d = ctx.emptied_cache("cache-pipeline")
        ex = ctx.extractor(d)
        seconds, feats = ctx.timed(lambda: ex.image_features(pool))
        if ex.encoded_images != n or not torch.allclose(feats[:, 0], reference, atol=1e-5):
            raise RuntimeError("the pipeline's features differ from the bare encoder's")
        cold = ctx.extractor(d)  # a fresh FeatureCache object: empty memory, entries on disk
        hit, again = ctx.timed(lambda: cold.image_features(pool))
        if cold.encoded_images != 0 or not torch.equal(again, feats):
            raise RuntimeError("the cache hit re-encoded images or returned different features")
        hit_seconds.append(hit)
        return seconds

    sides, load = _Sides(), []
    _interleave(cfg.repeats, [("raw", raw), ("pipeline", pipeline)], sides, ctx.meter, load)
    sides.seconds["hit"] = hit_seconds
    ctx.put("pipeline_vs_raw_encode", *sides.ratio("raw", "pipeline"))
    ctx.put("cache_hit_speedup", *sides.ratio("pipeline", "hit"))
    a = ctx.absolute
    a["raw_encode_images_per_s"] = round(n / sides.best("raw"), 1)
    a["pipeline_images_per_s"] = round(n / sides.best("pipeline"), 1)
    a["cache_hit_images_per_s"] = round(n / sides.best("hit"), 1)
    a["raw_encode_seconds"] = round(sides.best("raw"), 4)
    a["pipeline_seconds"] = round(sides.best("pipeline"), 4)
    a["cache_hit_seconds"] = round(sides.best("hit"), 5)
    ctx.load["pipeline"] = load

    # the bare encoder on every core (informative: the pipeline's encoder leaves cores to decoding)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and threads < _cores():
        m = min(n, 4 * bs)
        times = []
        torch.set_num_threads(_cores())
        try:
            for _ in range(min(cfg.repeats, 3)):
                times.append(ctx.timed(lambda: [bb.encode_images(pixels[s:s + bs], batch_size=bs)
                                                for s in range(0, m, bs)])[0])
        finally:
            torch.set_num_threads(threads)
        a["raw_encode_all_cores_images_per_s"] = round(m / min(times), 1)
        a["pipeline_vs_raw_encode_all_cores"] = round(
            a["pipeline_images_per_s"] / a["raw_encode_all_cores_images_per_s"], 3)


def _section_graph_retrain(ctx: _Ctx, support, extra: list):
    """graph_retrain_ratio; returns the last trained GraphAdapter (for labeling)."""
    from ..methods import make_method

    bb = ctx.backbone
    rounds = max(1, min(ctx.cfg.repeats, 3))
    first, refit = [], []
    method = None
    load: list[float] = []
    for r in range(rounds):
        a = ctx.meter.snap()
        d = ctx.fresh_dir(f"cache-graph-{r}")
        ex = ctx.extractor(d)
        method = make_method("graph", bb, support.classnames)
        t_first, _ = ctx.timed(lambda: method.fit(support, ex))
        before = ex.encoded_images
        bigger = support.add(extra[r], 0)
        t_refit, _ = ctx.timed(lambda: method.fit(bigger, ex))
        if ex.encoded_images - before != method.feature_views:
            raise RuntimeError("the refit encoded more than the new image's views")
        first.append(t_first)
        refit.append(t_refit)
        shutil.rmtree(d, ignore_errors=True)
        o = _LoadMeter.others(a, ctx.meter.snap())
        if o is not None:
            load.append(o)
    sides = _Sides({"refit": refit, "first": first})
    ctx.put("graph_retrain_ratio", *sides.ratio("refit", "first"))
    ctx.absolute.update({
        "graph_first_fit_seconds": round(min(first), 3),
        "graph_refit_seconds": round(min(refit), 3),
        "graph_support_images": len(support),
        "graph_views_per_image": method.feature_views,
        "graph_steps": method.config.steps,
    })
    ctx.load["graph_retrain"] = load
    return method


def _mma_epoch_decoding(method, support) -> float:
    """Seconds of one epoch the official way: each step decodes and augments its batch's images
    and runs both towers in full (the method's own training step on undecoded images)."""
    from ..methods.mma import MMATrainData
    from ..training import seed_everything

    bb = method.backbone
    dev = bb.device
    snapshot = {k: v.detach().clone() for k, v in method.state_dict().items()}
    try:
        gen = seed_everything(method.config.seed)
        views = 1 + max(0, int(method.config.augment_views))
        tokens = method._token_ids()
        data = MMATrainData(False, _DecodeOnAccess(support.images, views, bb),  # type: ignore[arg-type]
                            support.labels_tensor().to(dev), tokens, None, tokens)
        steps = max(1, math.ceil(len(support) / method.config.batch_size))
        step = method._make_step(data, steps, gen)
        method.train()
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(dev)
        return time.perf_counter() - t0
    finally:
        method.load_tensors(snapshot)
        method.eval()


def _section_mma(ctx: _Ctx, support) -> None:
    from ..errors import BackboneError
    from ..methods import make_method

    try:
        method = make_method("mma", ctx.backbone, support.classnames)
    except BackboneError as e:
        ctx.skipped["mma_cached_speedup"] = str(e)
        return
    prepare: list[float] = []
    steps: list[int] = []

    def cached(_r: int) -> float:
        res = method.time_epoch(support, cached=True, epochs=1)
        prepare.append(res["prepare_seconds"])
        steps.append(res["steps_per_epoch"])
        return res["epoch_seconds"]

    def uncached(_r: int) -> float:
        return _mma_epoch_decoding(method, support)

    def blocks_only(_r: int) -> float:
        return method.time_epoch(support, cached=False, epochs=1)["epoch_seconds"]

    sides, load = _Sides(), []
    rounds = max(1, min(ctx.cfg.repeats, 3))
    _interleave(rounds, [("cached", cached), ("uncached", uncached), ("blocks_only", blocks_only)],
                sides, ctx.meter, load)
    ctx.put("mma_cached_speedup", *sides.ratio("uncached", "cached"))
    ctx.absolute.update({
        "mma_epoch_seconds_cached": round(sides.best("cached"), 4),
        "mma_epoch_seconds_uncached": round(sides.best("uncached"), 4),
        "mma_prepare_seconds_cached": round(min(prepare), 3),
        "mma_epoch_seconds_blocks_only": round(sides.best("blocks_only"), 4),
        "mma_blocks_only_speedup": round(sides.ratio("blocks_only", "cached")[0], 3),
        "mma_steps_per_epoch": steps[0],
        "mma_adapted_blocks": list(method.block_range),
    })
    ctx.load["mma"] = load


def _section_graph_step(ctx: _Ctx) -> None:
    import torch.nn.functional as F

    from ..methods.graph_adapter import (GraphAdapterConfig, graph_adapter_classifier,
                                        graph_adapter_loop_reference, graph_messages)
    from ..precision import autocast_for

    bb, dev = ctx.backbone, ctx.device
    C, d, k = ctx.cfg.graph_classes, bb.embed_dim, ctx.cfg.shots
    cfg = GraphAdapterConfig()
    g = torch.Generator().manual_seed(0)
    T = F.normalize(torch.randn(C, d, generator=g), dim=-1).to(dev)
    V = F.normalize(torch.randn(C, d, generator=g), dim=-1).to(dev)
    bound = 1 / math.sqrt(d)
    W_t = ((torch.rand(d, d, generator=g) * 2 - 1) * bound).to(dev).requires_grad_()
    W_v = ((torch.rand(d, d, generator=g) * 2 - 1) * bound).to(dev).requires_grad_()
    b_t = torch.zeros(C, d, device=dev, requires_grad=True)
    b_v = torch.zeros(C, d, device=dev, requires_grad=True)
    x = F.normalize(torch.randn(C * k, d, generator=g), dim=-1).to(dev)
    y = torch.arange(C).repeat_interleave(k).to(dev)
    params = (W_t, b_t, W_v, b_v)
    messages = graph_messages(T, V, cfg.groups)

    def batched(with_messages: bool = False):
        m = graph_messages(T, V, cfg.groups) if with_messages else messages
        return graph_adapter_classifier(T, V, W_t, b_t, W_v, b_v, cfg.alpha, cfg.beta, cfg.groups, m)

    def loop():
        return graph_adapter_loop_reference(T, V, W_t, b_t, W_v, b_v, cfg.alpha, cfg.beta, cfg.groups)

    with torch.no_grad():
        if not torch.allclose(batched(), loop(), atol=1e-5):
            raise RuntimeError("the batched GraphAdapter differs from the per-class loop")

    def step(classifier) -> None:
        for p in params:
            p.grad = None
        with autocast_for(dev):
            loss = F.cross_entropy((bb.logit_scale * x @ classifier().T).float(), y)
        loss.backward()

    def per_step(classifier, min_seconds: float = 0.05, max_steps: int = 200) -> Callable[[int], float]:
        def run(_r: int) -> float:
            s1, _ = ctx.timed(lambda: step(classifier))
            reps = max(1, min(max_steps, int(min_seconds / max(s1, 1e-6))))
            total, _ = ctx.timed(lambda: [step(classifier) for _ in range(reps)])
            return total / reps
        return run

    step(batched)  # warm-up
    sides, load = _Sides(), []
    _interleave(ctx.cfg.repeats, [("loop", per_step(loop, 0.0, 1)), ("batched", per_step(batched)),
                                  ("batched_messages", per_step(lambda: batched(True)))], sides, ctx.meter, load)
    ctx.put("graph_batched_speedup", *sides.ratio("loop", "batched"))
    ctx.absolute.update({
        "graph_step_ms_loop": round(1000 * sides.best("loop"), 3),
        "graph_step_ms_batched": round(1000 * sides.best("batched"), 4),
        "graph_step_ms_batched_with_messages": round(1000 * sides.best("batched_messages"), 4),
        "graph_step_classes": C,
        "graph_step_features": C * k,
    })
    ctx.load["graph_step"] = load


def _section_labeling(ctx: _Ctx, method, pool: list) -> None:
    n = len(pool)

    def labeling(r: int) -> float:
        ex = ctx.extractor(ctx.emptied_cache("cache-label"))

        def run():
            return method.predict_proba(pool, ex).max(1)

        return ctx.timed(run)[0]

    def extraction(r: int) -> float:
        ex = ctx.extractor(ctx.emptied_cache("cache-extract"))
        return ctx.timed(lambda: ex.image_features(pool))[0]

    sides, load = _Sides(), []
    _interleave(ctx.cfg.repeats, [("extraction", extraction), ("labeling", labeling)], sides, ctx.meter, load)
    ctx.put("labeling_vs_extraction", *sides.ratio("extraction", "labeling"))
    ctx.absolute["labeling_images_per_s"] = round(n / sides.best("labeling"), 1)
    ctx.absolute["extraction_images_per_s"] = round(n / sides.best("extraction"), 1)
    ctx.load["labeling"] = load


def _section_closed_form(ctx: _Ctx, support, extra: list) -> None:
    """closed_form_refit_ms: the instant refit of a GDA model after one accepted label."""
    from ..methods import make_method

    bb = ctx.backbone
    ex = ctx.extractor(ctx.fresh_dir("cache-closed-form"))
    first = make_method("gda", bb, support.classnames)
    first.fit(support, ex)
    bigger = support.add(extra[0], 0)
    ex.image_features([extra[0]], views=range(first.feature_views))  # the accepted image: cached
    fixed = first.fixed_settings()
    encoded = ex.encoded_images

    def refit(settings: dict) -> float:
        def run():
            return make_method("gda", bb, support.classnames, **settings).fit(bigger, ex)
        return ctx.timed(run)[0]

    refit(fixed)  # warm-up: the first call pays one-time allocations
    sides, load = _Sides(), []
    _interleave(ctx.cfg.repeats, [("fixed", lambda _r: refit(fixed)), ("search", lambda _r: refit({}))],
                sides, ctx.meter, load)
    if ex.encoded_images != encoded:
        raise RuntimeError("the closed-form refit encoded images: its features were not cached")
    median = 1000 * sides.median("fixed")
    ctx.results["closed_form_refit_ms"] = median
    ctx.absolute.update({
        "closed_form_refit_ms_median": round(median, 3),
        "closed_form_refit_ms_fastest": round(1000 * sides.best("fixed"), 3),
        "closed_form_refit_ms_with_search": round(1000 * sides.median("search"), 3),
        "closed_form_refit_alpha": round(float(fixed["alpha"]), 6),
        "closed_form_refit_images": len(bigger),
        "closed_form_refit_views_per_image": first.feature_views,
    })
    ctx.load["closed_form_refit"] = load


def _section_first_model(ctx: _Ctx) -> None:
    """first_model_seconds and first_model_vs_encode (module docstring)."""
    from dataclasses import replace

    from ..app import Workspace, library, modeling, projects
    from ..cache import FeatureCache
    from ..config import AppConfig
    from ..data import ImageRef
    from ..features import FeatureExtractor
    from ..jobs import DONE, FINISHED

    bb = ctx.backbone
    names = class_names(FIRST_MODEL_CLASSES)
    files = {c: write_photos(ctx.work / "photos" / f"{k}", [label] * FIRST_MODEL_SHOTS, seed=10 + k)
             for k, (c, label) in enumerate(names)}
    refs = [ImageRef.from_path(f) for c, _ in names for f in files[c]]  # hashed outside the clock
    refined: list[float] = []

    def first_model(r: int) -> float:
        root = ctx.fresh_dir(f"app-{r}")
        config = replace(AppConfig.from_env().with_data_dir(root), hosted=False)
        ws = Workspace(replace(config, cache_dir=root / "features"), bb.spec, loader=lambda spec: bb)
        try:
            scope = ws.scope(projects.create_project(ws, "bench").id)
            for c, _ in names:
                library.add_class(scope, c)
            for c, _ in names:
                library.add_uploads(scope, files[c], c)  # each starts (or extends) the background encoding
            _sync(ctx.device)
            t0, wall0 = time.perf_counter(), time.time()
            job_id = modeling.start_training(scope, FIRST_MODEL_METHOD)
            while True:
                st = ws.runner.get(job_id)
                if st.model_id is not None or st.status in FINISHED:
                    break
                time.sleep(0.005)
            if st.model_id is None and st.status != DONE:
                raise RuntimeError(f"the first-model training ended {st.status}: {st.message}")
            info = ws.store.get_model(st.model_id if st.model_id is not None else st.result.id)
            method = ws.load_method(info)
            method.predict_proba([ws.store.support_set(scope.id).images[0]], ws.extractor(bb))
            _sync(ctx.device)
            seconds = time.perf_counter() - t0
            final = ws.runner.wait(job_id)
            if final.status != DONE:
                raise RuntimeError(f"the refinement ended {final.status}: {final.message}")
            refined.append(final.finished - wall0)
            for j in ws.runner.jobs(background=True):  # the background encoding, before the folder goes
                ws.runner.wait(j.id)
            return seconds
        finally:
            ws.close()

    def encode(r: int) -> float:
        ex = FeatureExtractor(bb, FeatureCache(ctx.emptied_cache("cache-first-encode")))  # the workspace's settings
        return ctx.timed(lambda: ex.image_features(refs))[0]

    sides, load = _Sides(), []
    _interleave(max(1, min(ctx.cfg.repeats, 3)), [("encode", encode), ("first", first_model)], sides,
                ctx.meter, load)
    ctx.put("first_model_vs_encode", *sides.ratio("first", "encode"))
    ctx.results["first_model_seconds"] = sides.best("first")
    ctx.absolute.update({
        "first_model_seconds_median": sides.median("first"),
        "first_model_encode_seconds": round(sides.best("encode"), 6),  # the key is the ratio of these: keep digits
        "first_model_refined_seconds": round(min(refined), 6),
        "first_model_images": len(refs),
        "first_model_method": FIRST_MODEL_METHOD,
        "first_model_photo_px": list(PHOTO_SIZE),
    })
    ctx.load["first_model"] = load


def _vm_rss_mb() -> float | None:
    """The process's resident memory now (Linux /proc/self/status VmRSS), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def write_pool_zip(path: Path, n: int, labels: list[str], seed: int, px: int = POOL_IMAGE_PX) -> Path:
    """A zip of n small PNG shapes (px square), as a user's pool upload."""
    import io
    import zipfile

    from ..shapes import ShapeSpec, render

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k in range(n):
            buf = io.BytesIO()
            render(ShapeSpec(*labels[k % len(labels)].split(" ", 1)), rng, size=px, supersample=1).save(buf, "PNG")
            z.writestr(f"pool/{k:05d}.png", buf.getvalue())
    return path


def _section_pool(ctx: _Ctx) -> None:
    """The long-pool scenario (issue #15, item 6), through the app's use cases on a fresh workspace:
    5 classes × 2 examples and a zero-shot model (not closed-form: an accepted label starts no
    refit, so the action is measured alone); a zip of `pool_images` small PNG shapes uploaded to
    the pool (the upload's background encoding is cancelled, so labeling starts on an empty cache).

    * `pool_first_page_s`: from `modeling.start_labeling` to the first `modeling.pool_page` with
      rows (polled every 20 ms): the first stored chunk.
    * `pool_label_images_per_s`: pool images ÷ seconds from the submission to the job's end.
    * `pool_action_p95_ms`: p95 over POOL_ACTIONS actions of one labeling action, with the whole
      pool scored: `modeling.accept` of the least confident image, then the next `pool_page`
      (200 rows) and the thumbnails of its first 48 rows (as the Predict & label tab shows).
    * `pool_upload_thumbs_ms_per_image`: ms per image of `library.thumbnail` (JPEG) for
      POOL_THUMB_IMAGES freshly uploaded 224-256 px images (half JPEG, half PNG);
      `pool_thumb_png_ms_per_image` is the same images as PNG thumbnails (the old format).
    Resident memory (VmRSS) before labeling, right after the job (which hands its memory back,
    `backbone.release_memory`) and the peak go under `absolute`."""
    from dataclasses import replace

    from ..app import Workspace, library, modeling, projects
    from ..app.library import POOL, THUMB_SIZE
    from ..config import AppConfig
    from ..imageio import decode_image
    from ..jobs import DONE

    bb, n = ctx.backbone, ctx.cfg.pool_images
    names = class_names(POOL_CLASSES)
    root = ctx.fresh_dir("pool-app")
    config = replace(AppConfig.from_env().with_data_dir(root), hosted=False)
    ws = Workspace(replace(config, cache_dir=root / "features"), bb.spec, loader=lambda spec: bb)

    def quiet() -> None:  # the uploads' background encoding: cancelled, and finished
        for j in ws.runner.jobs(background=True):
            ws.runner.cancel(j.id)
            ws.runner.wait(j.id)

    try:
        scope = ws.scope(projects.create_project(ws, "bench pool").id)
        for k, (c, label) in enumerate(names):
            library.add_class(scope, c)
            library.add_uploads(scope, [r.path for r in write_images(ctx.work / "pool-examples" / f"{k}", [label] * 2,
                                                                     seed=20 + k)], c)
        quiet()
        job = ws.runner.wait(modeling.start_training(scope, "zeroshot"))
        if job.status != DONE:
            raise RuntimeError(f"the pool scenario's model ended {job.status}: {job.message}")
        pool_zip = write_pool_zip(ctx.work / "pool.zip", n, [label for _, label in names], seed=21)
        t0 = time.perf_counter()
        up = library.add_uploads(scope, [pool_zip], POOL)
        upload_s = time.perf_counter() - t0
        quiet()
        if up.added != n:
            raise RuntimeError(f"the pool upload added {up.added} of {n} images: {up.errors[:1]}")

        # thumbnails of freshly uploaded images (JPEG now; PNG as before, for comparison)
        thumb_refs = write_images(ctx.work / "pool-thumbs", [label for _, label in names] * (POOL_THUMB_IMAGES // 5),
                                  seed=22)
        fresh = library.add_uploads(scope, [r.path for r in thumb_refs], POOL).added
        quiet()
        imgs = [i for i in library.pool_images(scope)][-fresh:]
        t0 = time.perf_counter()
        for img in imgs:
            library.thumbnail(ws, img)
        jpeg_ms = 1000 * (time.perf_counter() - t0) / len(imgs)
        t0 = time.perf_counter()
        for k, img in enumerate(imgs):
            im = decode_image(img.path.read_bytes(), img.original_name, draft_size=THUMB_SIZE)
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            im.save(ctx.work / "png-thumb.png", "PNG")
        png_ms = 1000 * (time.perf_counter() - t0) / len(imgs)
        jpeg_kb = statistics.mean(Path(library.thumbnail(ws, i)).stat().st_size for i in imgs) / 1024
        library.remove_images(scope, [i.id for i in imgs])  # the pool is `pool_images` again

        # labeling: the first page, then the whole pool
        rss_before = _vm_rss_mb()
        t0 = time.perf_counter()
        job_id = modeling.start_labeling(scope)
        first = None
        while True:
            st = ws.runner.get(job_id)
            if first is None and modeling.pool_page(scope, 0, 1).rows:
                first = time.perf_counter() - t0
            if st.status in ("done", "failed", "cancelled"):
                break
            time.sleep(0.02)
        st = ws.runner.wait(job_id)
        label_s = time.perf_counter() - t0
        if st.status != DONE:
            raise RuntimeError(f"the pool labeling ended {st.status}: {st.message}")
        if first is None:
            first = label_s
        rss_after = _vm_rss_mb()

        # labeling actions with the whole pool scored
        times = []
        page = modeling.pool_page(scope)
        for _ in range(min(POOL_ACTIONS, max(1, n - 1))):
            t0 = time.perf_counter()
            modeling.accept(scope, [page.rows[0].image_id])
            page = modeling.pool_page(scope)
            for r in page.rows[:48]:
                library.thumbnail(ws, page.images[r.image_id])
            times.append(1000 * (time.perf_counter() - t0))
            if not page.rows:
                break
        times.sort()
        p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
    finally:
        ws.close()
    ctx.results.update({"pool_first_page_s": first, "pool_label_images_per_s": n / label_s,
                        "pool_action_p95_ms": p95, "pool_upload_thumbs_ms_per_image": jpeg_ms})
    ctx.absolute.update({
        "pool_images": n, "pool_image_px": POOL_IMAGE_PX,
        "pool_upload_seconds": round(upload_s, 3),
        "pool_label_seconds": round(label_s, 3),
        "pool_action_median_ms": round(statistics.median(times), 3),
        "pool_actions": len(times),
        "pool_thumb_png_ms_per_image": round(png_ms, 3),
        "pool_thumb_jpeg_kb": round(jpeg_kb, 2),
        "pool_rss_mb_before_labeling": rss_before,
        "pool_rss_mb_after_labeling": rss_after,
    })


def _suite_speed(ctx: _Ctx) -> None:
    from ..data import SupportSet

    cfg = ctx.cfg
    names = class_names(cfg.classes)
    ctx.log(f"bench: writing {cfg.images + cfg.classes * cfg.shots + 3} test images...")
    pool = write_images(ctx.work / "pool", [names[i % len(names)][1] for i in range(cfg.images)], seed=1)
    support_refs = write_images(ctx.work / "support", [label for _, label in names for _ in range(cfg.shots)], seed=2)
    extra = write_images(ctx.work / "extra", [names[0][1]] * 3, seed=3)
    support = SupportSet([c for c, _ in names], support_refs, [c for c in range(cfg.classes) for _ in range(cfg.shots)])

    with ctx.section(f"pipeline ({len(pool)} images, {cfg.repeats} rounds)"):
        _section_pipeline(ctx, pool)
    with ctx.section(f"graph_retrain ({len(support)} support images)"):
        method = _section_graph_retrain(ctx, support, extra)
    with ctx.section(f"labeling ({len(pool)} pool images)"):
        _section_labeling(ctx, method, pool)
    with ctx.section(f"mma ({len(support)} support images)"):
        _section_mma(ctx, support)
    with ctx.section(f"graph_step (C={cfg.graph_classes})"):
        _section_graph_step(ctx)
    with ctx.section(f"closed_form_refit ({len(support) + 1} support images)"):
        _section_closed_form(ctx, support, extra)
    with ctx.section(f"first_model ({FIRST_MODEL_CLASSES}×{FIRST_MODEL_SHOTS} photos)"):
        _section_first_model(ctx)
    with ctx.section(f"pool ({cfg.pool_images} pool images)"):
        _section_pool(ctx)


def run_bench(backbone, cfg: BenchConfig | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the speed suite on `backbone` and return the results dict (the JSON the CLI writes)."""
    import open_clip

    cfg = cfg or BenchConfig()
    cfg.validate()
    log = log or (lambda s: None)
    cpu = backbone.device.type == "cpu"
    old_threads = torch.get_num_threads()
    threads = cfg.threads or (max(1, _cores() - 1) if cpu else old_threads)
    workers = cfg.workers or (max(1, _cores() - threads) if cpu else 2)
    root = Path(tempfile.mkdtemp(prefix="fewshot-bench-", dir=cfg.work_dir))
    torch.set_num_threads(threads)
    ctx = _Ctx(backbone, cfg, root, workers, log)
    t0 = time.perf_counter()
    try:
        _suite_speed(ctx)
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(root, ignore_errors=True)
    ctx.absolute["peak_rss_mb"] = _peak_rss_mb()
    loads = [x for v in ctx.load.values() for x in v]
    ctx.absolute["background_cpu_cores"] = round(statistics.mean(loads), 2) if loads else None
    ctx.absolute["background_cpu_cores_by_section"] = {k: round(max(v), 2) for k, v in ctx.load.items() if v}
    ctx.absolute["total_seconds"] = round(time.perf_counter() - t0, 1)
    results = {k: (round(ctx.results[k], 4) if k in ctx.results else None) for k in KEYS}
    results.update({
        "absolute": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ctx.absolute.items()},
        "device": backbone.device_label,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "backbone": backbone.id,
        "config": {"classes": cfg.classes, "shots": cfg.shots, "images": cfg.images, "repeats": cfg.repeats,
                   "pool_images": cfg.pool_images,
                   "batch_size": cfg.batch_size, "threads": threads, "workers": workers, "cores": _cores(),
                   "graph_classes": cfg.graph_classes, "image_px": list(IMAGE_SIZES),
                   "image_formats": "JPEG q90 and PNG, alternating"},
        "statistic": "fastest of R interleaved rounds per side; <key>_median = median per-round ratio",
        "targets": {k: {"min" if op == ">=" else "max": v} for k, (op, v) in TARGETS.items()},
        "skipped": dict(ctx.skipped),
    })
    missed = missed_targets(results)
    results["missed"], results["missed_reasons"] = sorted(missed), missed
    return results


# ---- judging and reporting ----------------------------------------------------------------------

def missed_targets(results: dict) -> dict[str, str]:
    """key -> one sentence, for each target not met (a missing or non-finite value is a miss,
    unless the key was skipped for a stated reason)."""
    missed = {}
    skipped = results.get("skipped") or {}
    for key, (op, target) in TARGETS.items():
        v = results.get(key)
        if key in skipped:
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            missed[key] = f"{key} was not measured"
            continue
        ok = v >= target if op == ">=" else v <= target
        if not ok:
            missed[key] = f"{key} = {v:.3g}, target {op} {target:g} ({_figures(key, results.get('absolute') or {})})"
    return missed


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v}{unit}"


def _figures(key: str, a: dict) -> str:
    """The absolute figures behind one key, as a short phrase."""
    g = a.get
    if key == "pipeline_vs_raw_encode":
        s = (f"pipeline {_fmt(g('pipeline_images_per_s'))} img/s vs bare encoder "
             f"{_fmt(g('raw_encode_images_per_s'))} img/s")
        if g("raw_encode_all_cores_images_per_s"):
            s += f"; bare encoder on all cores {_fmt(g('raw_encode_all_cores_images_per_s'))} img/s"
        return s
    if key == "cache_hit_speedup":
        return f"pipeline {_fmt(g('pipeline_seconds'), ' s')} vs cache hit {_fmt(g('cache_hit_seconds'), ' s')}"
    if key == "graph_retrain_ratio":
        return (f"refit {_fmt(g('graph_refit_seconds'), ' s')} vs first fit "
                f"{_fmt(g('graph_first_fit_seconds'), ' s')} ({_fmt(g('graph_support_images'))} images × "
                f"{_fmt(g('graph_views_per_image'))} views, {_fmt(g('graph_steps'))} steps)")
    if key == "mma_cached_speedup":
        return (f"epoch {_fmt(g('mma_epoch_seconds_uncached'), ' s')} decoding vs "
                f"{_fmt(g('mma_epoch_seconds_cached'), ' s')} cached ({_fmt(g('mma_steps_per_epoch'))} steps; "
                f"cache built once in {_fmt(g('mma_prepare_seconds_cached'), ' s')}; "
                f"blocks alone {_fmt(g('mma_blocks_only_speedup'), '×')})")
    if key == "graph_batched_speedup":
        return (f"step {_fmt(g('graph_step_ms_loop'), ' ms')} loop vs "
                f"{_fmt(g('graph_step_ms_batched'), ' ms')} batched (C={_fmt(g('graph_step_classes'))})")
    if key in ("first_model_seconds", "first_model_vs_encode"):
        return (f"first model {_fmt(g('first_model_seconds_median'), ' s')} median, one plain encoding pass "
                f"{_fmt(g('first_model_encode_seconds'), ' s')} ({_fmt(g('first_model_images'))} photos, "
                f"{_fmt(g('first_model_method'))}); refined with augmented views after "
                f"{_fmt(g('first_model_refined_seconds'), ' s')}")
    if key == "labeling_vs_extraction":
        return (f"labeling {_fmt(g('labeling_images_per_s'))} img/s vs extraction "
                f"{_fmt(g('extraction_images_per_s'))} img/s")
    if key == "pool_first_page_s":
        return (f"{_fmt(g('pool_images'))} pool images of {_fmt(g('pool_image_px'))} px, zero-shot model; "
                f"upload {_fmt(g('pool_upload_seconds'), ' s')}, whole pool labeled in "
                f"{_fmt(g('pool_label_seconds'), ' s')}")
    if key == "pool_label_images_per_s":
        return (f"{_fmt(g('pool_images'))} images in {_fmt(g('pool_label_seconds'), ' s')}, stored chunk by chunk; "
                f"RSS {_fmt(g('pool_rss_mb_before_labeling'), ' MB')} before, "
                f"{_fmt(g('pool_rss_mb_after_labeling'), ' MB')} after")
    if key == "pool_action_p95_ms":
        return (f"accept one image + the next 200-row page and its 48 thumbnails, {_fmt(g('pool_actions'))} actions; "
                f"median {_fmt(g('pool_action_median_ms'), ' ms')}")
    if key == "pool_upload_thumbs_ms_per_image":
        return (f"JPEG q85 thumbnails of 224-256 px uploads, {_fmt(g('pool_thumb_jpeg_kb'), ' KB')} each; "
                f"PNG as before {_fmt(g('pool_thumb_png_ms_per_image'), ' ms')} per image")
    if key == "closed_form_refit_ms":
        return (f"GDA refit, median of R; fastest {_fmt(g('closed_form_refit_ms_fastest'), ' ms')}, with its α "
                f"search {_fmt(g('closed_form_refit_ms_with_search'), ' ms')} "
                f"({_fmt(g('closed_form_refit_images'))} images × {_fmt(g('closed_form_refit_views_per_image'))} "
                f"views, cached)")
    return ""


def markdown_table(results: dict) -> str:
    a = results.get("absolute") or {}
    missed = missed_targets(results)
    skipped = results.get("skipped") or {}
    lines = [f"Backbone {results.get('backbone')} on {results.get('device')} "
             f"(torch {results.get('torch')}, open_clip {results.get('open_clip')})", "",
             "| key | value | target | met | absolute figures |", "|---|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        v = results.get(key)
        met = "n/a" if key in skipped else ("no" if key in missed else "yes")
        figures = skipped.get(key) or _figures(key, a)
        lines.append(f"| {key} | {_fmt(v)} | {op} {target:g} | {met} | {figures} |")
    for key in REPORTED:
        lines.append(f"| {key} | {_fmt(results.get(key))} | (reported) | - | {_figures(key, a)} |")
    extra = []
    if a.get("peak_rss_mb") is not None:
        extra.append(f"peak RSS {a['peak_rss_mb']:.0f} MB")
    gpu = {k: v for k, v in a.items() if k.startswith("peak_gpu_mb_")}
    if gpu:
        extra.append("peak GPU memory " + ", ".join(f"{k[12:]} {v:.0f} MB" for k, v in gpu.items()))
    if a.get("background_cpu_cores") is not None:
        extra.append(f"other processes used {a['background_cpu_cores']:.2f} CPU cores on average meanwhile")
    cfg = results.get("config") or {}
    if cfg:
        extra.append(f"torch threads {cfg.get('threads')}, helper processes {cfg.get('workers')}, "
                     f"cores {cfg.get('cores')}")
    if extra:
        lines += ["", "; ".join(extra) + "."]
    return "\n".join(lines)


def report(results: dict, json_path: str | os.PathLike | None = None, out=None, err=None) -> int:
    """Print the table, write the JSON, and return the exit code: 0 all met, 1 some missed."""
    out = out or sys.stdout
    err = err or sys.stderr
    missed = missed_targets(results)
    results = {**results, "missed": sorted(missed), "missed_reasons": missed}
    print(markdown_table(results), file=out)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    for reason in missed.values():
        print(f"bench: target missed: {reason}", file=err)
    return 1 if missed else 0
