"""See the data (issue #16): the embedding map, near-duplicate groups, examples that may be in the
wrong class and pool images unlike every class, for one project, from the feature cache.

`start(scope)` runs it as a job (progress, cancel); `latest(scope)` is the last result. The map
is kept per (project, backbone): when the images only grew by a few (MAX_ADDED), the new points
are placed with the fitted reducer's `transform` instead of a new fit (`insight.extend_map`).
Actions: `keep_one` (a duplicate group), and the station's `assign` / `remove` for the rest."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .. import insight
from ..errors import Cancelled, DataError
from ..progress import Progress
from ..store import ActionInfo
from . import modeling
from .context import ProjectScope, Workspace

INSPECT = "inspect"
#: At most this many new images (and at most a tenth of the map) are added to a map by
#: `transform`; more, or any removed image's neighbourhood mattering, and the map is redrawn.
MAX_ADDED = 50
#: A class is "spread wider than the others" when its dispersion is above this multiple of the
#: median class's (1 − cos to its mean): the other classes set the scale, so a backbone that
#: spreads everything wider does not flag everything.
WIDE_FACTOR = 1.5


@dataclass(frozen=True)
class Point:
    image_id: int
    name: str
    example: bool
    group: str | None   # the example's class, or the pool image's predicted class (None: none yet)
    confidence: float | None
    x: float
    y: float
    outlier: bool = False


@dataclass(frozen=True)
class LabelIssueRow:
    image_id: int
    name: str
    given: str
    suggested: str
    confidence: float
    score: float


@dataclass
class Insight:
    backbone_id: str
    points: list[Point]
    map_method: str
    map_extended: int                       # points placed by transform (0: a full fit)
    duplicates: list[list[tuple[int, str]]]  # groups of (image id, name), most similar pair's group first
    duplicate_pairs: list[tuple[int, int, float]]
    leaks: int                              # groups holding both an example and a pool image
    label_issues: list[LabelIssueRow]
    wide_classes: list[tuple[str, float]]   # (class, dispersion) spread wider than the others
    outliers: list[tuple[int, float]]       # (pool image id, 1 − best similarity), most unlike first
    outlier_threshold: float
    threshold: float = insight.DUPLICATE_THRESHOLD
    seconds: dict = field(default_factory=dict)

    def outlier_ids(self) -> set[int]:
        return {i for i, _ in self.outliers}


@dataclass
class _MapMemo:
    hashes: list[str]
    coords: dict[str, tuple[float, float]]
    fitted: insight.EmbeddingMap


_LOCK = threading.Lock()
_MAPS: "weakref.WeakKeyDictionary[Workspace, dict[tuple[int, str], _MapMemo]]" = weakref.WeakKeyDictionary()
_LATEST: "weakref.WeakKeyDictionary[Workspace, dict[int, Insight]]" = weakref.WeakKeyDictionary()


def latest(scope: ProjectScope) -> Insight | None:
    """The project's last finished inspection (this process), or None."""
    with _LOCK:
        return _LATEST.get(scope.ws, {}).get(scope.id)


def outlier_ids(scope: ProjectScope) -> set[int]:
    found = latest(scope)
    return set() if found is None else found.outlier_ids()


def _map(ws: Workspace, project_id: int, backbone_id: str, hashes: list[str], feats: np.ndarray, seed: int,
         progress) -> tuple[np.ndarray, str, int]:
    """(N, 2) coordinates, the method, how many points were added by transform."""
    key = (project_id, backbone_id)
    with _LOCK:
        memo = _MAPS.setdefault(ws, {}).get(key)
    if memo is not None and memo.fitted.reducer is not None:
        known = [h in memo.coords for h in hashes]
        new = [i for i, k in enumerate(known) if not k]
        if len(new) <= min(MAX_ADDED, max(1, len(memo.hashes) // 10)):
            out = np.array([memo.coords.get(h, (0.0, 0.0)) for h in hashes], dtype=np.float32)
            if new:
                out[new] = insight.extend_map(memo.fitted, feats[new])
                memo.coords.update({hashes[i]: tuple(map(float, out[i])) for i in new})
            return out, memo.fitted.method, len(new)
    m = insight.embedding_map(feats, seed=seed, progress=progress)
    with _LOCK:
        _MAPS.setdefault(ws, {})[key] = _MapMemo(list(hashes), {h: tuple(map(float, c)) for h, c in
                                                                zip(hashes, m.coords)}, m)
    return m.coords, m.method, 0


def compute(scope: ProjectScope, progress=None, cancel=None, seed: int = 0,
            threshold: float = insight.DUPLICATE_THRESHOLD) -> Insight:
    """Everything the Inspect tab shows, for the project's current images (module docstring)."""
    import time

    ws, store = scope.ws, scope.store
    current = store.current_model(scope.id)
    spec = ws.saved_spec(current.config) if current is not None else ws.default_spec
    backbone = ws.backbone(spec)
    extractor = ws.extractor(backbone)
    classes = store.list_classes(scope.id)
    names = {c.id: c.name for c in classes}
    index = {c.id: k for k, c in enumerate(classes)}
    imgs = sorted(store.list_images(scope.id), key=lambda i: (i.class_id is None, i.id))  # examples first
    if not imgs:
        raise DataError("The project has no images yet; add examples or pool images first.")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    feats = extractor.image_features([i.ref() for i in imgs], (0,), progress=progress, cancel=cancel)[:, 0].numpy()
    seconds["features"] = time.perf_counter() - t

    def step(stage: str, k: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Cancelled.")
        if progress is not None:
            progress(Progress(stage, k, 4))

    is_example = np.array([i.class_id is not None for i in imgs])
    ex, pool = np.flatnonzero(is_example), np.flatnonzero(~is_example)
    labels = np.array([index[imgs[k].class_id] for k in ex], dtype=np.int64)
    C = len(classes)

    step("Finding near-duplicates", 0)
    t = time.perf_counter()
    pairs = insight.near_duplicates(feats, threshold)
    groups = insight.duplicate_groups(pairs, len(imgs))
    seconds["duplicates"] = time.perf_counter() - t

    step("Looking for label errors", 1)
    t = time.perf_counter()
    issues: list[LabelIssueRow] = []
    wide: list[tuple[str, float]] = []
    if len(ex) and C >= 2:
        probs, tested = insight.out_of_sample_probs(feats[ex], labels, C, seed=seed)
        for e in insight.label_issues(labels, probs, tested):
            img = imgs[ex[e.index]]
            issues.append(LabelIssueRow(img.id, img.original_name, classes[e.given].name,
                                        classes[e.suggested].name, e.confidence, e.score))
        spread = insight.class_dispersion(feats[ex], labels, C)
        if np.isfinite(spread).sum() >= 3:
            median = float(np.nanmedian(spread))
            wide = [(classes[k].name, float(spread[k])) for k in np.argsort(-np.nan_to_num(spread, nan=-1.0))
                    if np.isfinite(spread[k]) and spread[k] > WIDE_FACTOR * median]
    seconds["label_issues"] = time.perf_counter() - t

    step("Looking for outliers", 2)
    found, limit = ([], 0.0)
    if len(pool) and len(ex):
        found, limit = insight.outliers(feats[pool], feats[ex], labels, C)
    outliers = [(imgs[pool[i]].id, s) for i, s in found]
    outlying = {i for i, _ in outliers}

    step("Drawing the map", 3)
    t = time.perf_counter()
    coords, method, extended = _map(ws, scope.id, backbone.id, [i.hash for i in imgs], feats, seed, None)
    seconds["map"] = time.perf_counter() - t
    predicted = {r.image_id: r for r in modeling.pool_predictions(scope)}
    points = []
    for k, img in enumerate(imgs):
        if img.class_id is not None:
            group, conf = names.get(img.class_id, "?"), None
        else:
            row = predicted.get(img.id)
            group, conf = (None, None) if row is None else (row.label, row.confidence)
        points.append(Point(img.id, img.original_name, img.class_id is not None, group, conf,
                            float(coords[k, 0]), float(coords[k, 1]), img.id in outlying))
    dup_groups = [[(imgs[k].id, imgs[k].original_name) for k in g] for g in groups]
    leaks = sum(1 for g in groups if is_example[g].any() and (~is_example[g]).any())
    result = Insight(backbone.id, points, method, extended, dup_groups,
                     [(imgs[i].id, imgs[j].id, s) for i, j, s in pairs], leaks, issues, wide, outliers, limit,
                     threshold, seconds)
    with _LOCK:
        _LATEST.setdefault(ws, {})[scope.id] = result
    if progress is not None:
        progress(Progress("Inspection done", 4, 4))
    return result


def start(scope: ProjectScope, seed: int = 0) -> str:
    """Run `compute` as a job (progress, cancel); its result is also `latest(scope)`."""
    modeling.check_job_limit(scope)

    def work(job):
        return compute(scope, progress=job.report, cancel=job.cancel_event, seed=seed)

    return scope.ws.runner.submit(INSPECT, work, scope.id, owner=scope.owner)


def keep_one(scope: ProjectScope, group: Sequence[int], keep: int) -> ActionInfo:
    """Remove every image of a duplicate group but `keep`, as one undoable action."""
    ids = [int(i) for i in group]
    if int(keep) not in ids:
        raise DataError("Pick the image to keep from this group.")
    drop = [i for i in ids if i != int(keep)]
    if not drop:
        raise DataError("This group has only the image to keep.")
    n = len(drop)
    return scope.store.remove_undoably(scope.id, drop, owner=scope.owner,
                                       summary=f"Kept one of {n + 1} near-duplicates; removed {n}.")


def look_alikes(scope: ProjectScope, image_ids: Sequence[int], threshold: float = insight.DUPLICATE_THRESHOLD
                ) -> int:
    """How many of these images look like another image of the project (cosine >= threshold),
    from cached features only (an image not encoded yet is not counted): the upload note."""
    ws, store = scope.ws, scope.store
    current = store.current_model(scope.id)
    spec = ws.saved_spec(current.config) if current is not None else ws.default_spec
    backbone_id = ws.backbone(spec).id
    wanted = {int(i) for i in image_ids}
    imgs = store.list_images(scope.id)
    rows = ws.cache.get_many(backbone_id, [(i.hash, 0) for i in imgs])
    have = [(img, r) for img, r in zip(imgs, rows) if r is not None]
    if not have or not wanted:
        return 0
    feats = np.stack([r for _, r in have])
    group = [1 if img.id in wanted else 0 for img, _ in have]
    pairs = insight.near_duplicates(feats, threshold, group, across_only=True)
    return len({have[i][0].id if group[i] else have[j][0].id for i, j, _ in pairs})


#: How long the upload's look-alike check waits for the background encoding of the new images:
#: 300 images of ViT-B-32 on this 2-core CPU (about 18 images/s); past it the note is left out.
LOOK_ALIKE_WAIT_S = 20.0


def upload_look_alikes(scope: ProjectScope, image_ids: Sequence[int], encode_job: str | None,
                       wait_s: float = LOOK_ALIKE_WAIT_S) -> int:
    """How many images of an upload look like images the project already had (`look_alikes`),
    once the upload's background encoding (`library.prepare_features`, its `encode_job`) has
    finished; waits at most `wait_s` for it (an image not encoded by then is not counted). The
    upload's own note says "3 of these look like images you already have"."""
    if encode_job is not None:
        try:
            scope.ws.runner.wait(encode_job, wait_s)
        except KeyError:  # the job is gone (a restart): count what is cached
            pass
    return look_alikes(scope, image_ids)
