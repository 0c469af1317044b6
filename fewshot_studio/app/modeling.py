"""Backbones, training jobs, the project's models, the knowledge graph, cross-validation,
prediction and pool labeling. (What a method is and its settings: methods/catalog.py.)"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ..backbone import BackboneSpec, device_name, release_memory, resolve_device
from ..data import ImageRef
from ..errors import Cancelled, DataError, FewShotError
from ..jobs import EVALUATE, FINISHED, LABEL, QUEUED, TRAIN
from ..methods import KnowledgeGraph, Method, catalog, get_method_class
from ..methods.base import cosine_matrix
from ..progress import Progress, ProgressFn
from ..store import INTERRUPTED, INTERRUPTED_QUEUED, ImageInfo, JobInfo, ModelInfo, NotFoundError
from .context import ProjectScope, Workspace
from .library import class_by_name, image


# ---- backbones -----------------------------------------------------------------------------------
def backbone_spec(ws: Workspace, name: str | None = None, pretrained: str | None = None,
                  checkpoint: str | None = None) -> BackboneSpec:
    """The backbone a form asks for. A blank checkpoint means the configured one
    (FEWSHOT_STUDIO_CHECKPOINT) when the form names the default backbone, so the documented
    setting is honoured without typing the path again."""
    d = ws.default_spec
    name = (name or "").strip() or d.name
    if name == "tiny":
        pretrained = None
    elif "/" in name and not name.startswith(("hf-hub:", "local-dir:")) and not pretrained:
        name, pretrained = name.split("/", 1)
    pretrained = (pretrained or "").strip() or (None if name == "tiny" else d.pretrained or None)
    checkpoint = (checkpoint or "").strip() or None
    if checkpoint is None and d.checkpoint and (name, pretrained) == (d.name, d.pretrained or None):
        checkpoint = d.checkpoint
    return BackboneSpec(name, pretrained, checkpoint, d.device)


@dataclass(frozen=True)
class BackboneStatus:
    """Whether a backbone loads: its label and device, or the one sentence why not."""

    ok: bool
    label: str  # the backbone's label ("" when it does not load)
    device: str  # the device, in words
    error: str = ""


def backbone_status(ws: Workspace, spec: BackboneSpec | None = None) -> BackboneStatus:
    """Load the backbone (the default one, or `spec`) and say whether it worked."""
    try:
        b = ws.backbone(spec)
        return BackboneStatus(True, b.spec.label, b.device_label)
    except FewShotError as e:
        return BackboneStatus(False, "", device_name(resolve_device(ws.default_spec.device)), str(e))


# ---- training ------------------------------------------------------------------------------------
def start_training(scope: ProjectScope, method: str, spec: BackboneSpec | None = None,
                   settings: dict | None = None, *, refresh: bool = False) -> str:
    """Start a training job in the background; its id (poll it with `job`). `method` may be
    "auto" (cross-validate the candidates, train the best; `settings` are then Auto's).
    `refresh`: the new model predicts the pool in the same job before it becomes current, so
    the pool on screen always has the current model's predictions (the station's retrain)."""
    ws = scope.ws
    cls = None if method == catalog.AUTO else get_method_class(method)
    # strict (unknown, ill-typed or out-of-bounds settings are refused), before any backbone loads
    settings = catalog.coerce_settings(method, settings)
    backbone = ws.backbone(spec)
    support = scope.store.support_set(scope.id)
    if cls is not None and not support.images and cls.needs_images:
        support.require_images(cls.label)
    check_job_limit(scope)
    if refresh:
        return ws.runner.submit_training(scope.id, method, backbone, ws.extractor(backbone), support=support,
                                         owner=scope.owner, current=False, then=_predict_then_use(scope),
                                         **settings)
    return ws.runner.submit_training(scope.id, method, backbone, ws.extractor(backbone), support=support,
                                     owner=scope.owner, **settings)


def _predict_then_use(scope: ProjectScope):
    """A training's `then`: predict the pool with the new model, then make it current."""
    def then(job, info: ModelInfo) -> ModelInfo:
        label_pool(scope, job.report, info.id, cancel=job.cancel_event)
        return scope.store.set_current_model(scope.id, info.id)
    return then


def retrain(scope: ProjectScope, *, refresh: bool = False) -> str:
    """Train again with the current model's method, backbone and settings (cached features): a
    model Auto chose is chosen again (with Auto's settings), since the examples changed; an
    instant refit's model retrains with the settings its lineage began with (its search on).
    `refresh`: see `start_training` (the station's background retrain after N labels)."""
    info, method = current_model(scope)
    auto = (info.metrics or {}).get("auto")
    if isinstance(auto, dict):
        keep = {k: auto.get(k) for k in catalog.settings(catalog.AUTO) if auto.get(k) is not None}
        return start_training(scope, catalog.AUTO, method.backbone.spec, keep, refresh=refresh)
    settings = refit_lineage(info).get("settings") or asdict(method.config)
    return start_training(scope, info.method, method.backbone.spec, settings, refresh=refresh)


def interrupted_training(scope: ProjectScope) -> JobInfo | None:
    """The project's last training job when the app stopped while it ran or waited in the
    queue and nothing was trained since, so the page can say so; else None."""
    jobs = [j for j in scope.store.list_jobs(scope.id) if j.kind == "train"]
    if not jobs or jobs[0].status != "failed" or not jobs[0].message.casefold().startswith(
            (INTERRUPTED, INTERRUPTED_QUEUED)):
        return None
    return jobs[0]


def never_started(job: JobInfo) -> bool:
    """Whether an interrupted job was still waiting in the queue when the app stopped."""
    return job.message.casefold().startswith(INTERRUPTED_QUEUED)


def job(ws: Workspace, job_id: str):
    """A job's live state (a JobState); KeyError for an unknown id."""
    return ws.runner.get(job_id)


def cancel(ws: Workspace, job_id: str) -> bool:
    return ws.runner.cancel(job_id)


#: Jobs (training, cross-validation, pool labeling) one visitor may have queued or running at
#: once in hosted mode: one CPU slot serves everybody, so a visitor's queue must stay short.
MAX_JOBS_PER_VISITOR = 2


def _unfinished(jobs, kind: str | None = None) -> list:
    """The jobs not yet finished (of one kind, or all), oldest first."""
    return sorted((j for j in jobs if j.status not in FINISHED and (kind is None or j.kind == kind)),
                  key=lambda j: j.created)


def owner_jobs(ws: Workspace, owner: str | None, kind: str | None = None) -> list:
    """The unfinished jobs a browser session started (of one kind, or all), oldest first."""
    return _unfinished((j for j in ws.runner.jobs() if j.owner == owner), kind)


def check_job_limit(scope: ProjectScope) -> None:
    """Hosted mode: one sentence instead of a new job when this visitor already has
    MAX_JOBS_PER_VISITOR queued or running."""
    ws = scope.ws
    if not ws.hosted or scope.owner is None:
        return
    n = len(owner_jobs(ws, scope.owner))
    if n >= MAX_JOBS_PER_VISITOR:
        raise DataError(f"You already have {n} jobs queued or running, the most one visitor may have at a time; "
                        "wait for one to finish or cancel it.")


def cancel_owner_jobs(ws: Workspace, owner: str | None, kind: str | None = None, also: str | None = None) -> int:
    """Cancel every unfinished job (of this kind) the session started, not only its latest, and
    the job `also` (the one the page shows); how many, each counted once."""
    ids = {j.id for j in owner_jobs(ws, owner, kind)} | ({also} if also else set())
    return sum(ws.runner.cancel(i) for i in ids)


def active_job(ws: Workspace, project_id: int | None, kind: str = TRAIN) -> Any:
    """The newest unfinished job of this kind (training by default) of this project (to resume
    showing its progress)."""
    if project_id in (None, ""):
        return None
    jobs = _unfinished(ws.runner.jobs(int(project_id)), kind)
    return jobs[-1] if jobs else None


# ---- models --------------------------------------------------------------------------------------
def models(scope: ProjectScope) -> list[ModelInfo]:
    """Every model of the project, newest first."""
    return scope.store.list_models(scope.id)


def model(scope: ProjectScope, model_id: int | None = None) -> tuple[ModelInfo, Method]:
    """A model of the project (the current one when model_id is None), loaded."""
    if model_id in (None, ""):
        return current_model(scope)
    info = scope.store.get_model(int(model_id))
    if info.project_id != scope.id:
        raise NotFoundError(f"There is no model with id {model_id} in this project.")
    return info, scope.ws.load_method(info)


def current_model_info(scope: ProjectScope) -> ModelInfo | None:
    """The model the project uses (chosen in the Model menu, else the last trained or
    imported one), or None."""
    return scope.store.current_model(scope.id)


def current_model(scope: ProjectScope) -> tuple[ModelInfo, Method]:
    info = current_model_info(scope)
    if info is None:
        raise DataError("Train a model first (Train tab).")
    return info, scope.ws.load_method(info)


def set_current_model(scope: ProjectScope, model_id: int) -> ModelInfo:
    """Use this model for the graph, predictions, labeling, retraining and export."""
    try:
        return scope.store.set_current_model(scope.id, int(model_id))
    except (TypeError, ValueError):
        raise DataError("Pick a model from the list.") from None


def model_history(scope: ProjectScope) -> list[dict]:
    """The current model's training curve (step, loss, accuracy), or []."""
    m = current_model_info(scope)
    return [] if m is None else list((m.config or {}).get("history") or [])


# ---- knowledge graph and evaluation -------------------------------------------------------------
def knowledge_graph(scope: ProjectScope, model_id: int | None = None) -> KnowledgeGraph:
    """The model's class graph, with current example counts; when the method has no visual
    sub-graph, visual edges come from the class prototypes of the current support set."""
    info, method = model(scope, model_id)
    g = method.knowledge_graph()
    support = scope.store.support_set(scope.id)
    counts = {n: c for n, c in zip(support.classnames, support.counts())}
    g.counts = [counts.get(c, 0) for c in g.classes]
    if g.visual_edges is None and support.images:
        feats = scope.ws.extractor(method.backbone).image_features(support.images)[:, 0]
        labels = support.labels_tensor()
        proto = torch.zeros(len(support.classnames), feats.shape[1]).index_add_(0, labels, feats)
        order = [support.classnames.index(c) if c in support.classnames else -1 for c in g.classes]
        if all(i >= 0 for i in order):
            g.visual_edges = cosine_matrix(proto[order])
    return g


def evaluate(scope: ProjectScope, methods: Sequence[str], spec: BackboneSpec | None = None,
             progress: ProgressFn | None = None, cancel=None, settings: dict[str, dict] | None = None):
    """Cross-validate `methods` on the project's examples (the same folds for each): a Comparison.
    The work itself; the app runs it as a job (`start_evaluation`)."""
    return _evaluation(scope, methods, spec, settings)(progress, cancel)


def start_evaluation(scope: ProjectScope, methods: Sequence[str], spec: BackboneSpec | None = None,
                     settings: dict[str, dict] | None = None) -> str:
    """Cross-validation as a job of the one runner (its result: the Comparison): it waits for the
    GPU like a training, reports progress, stops within one training step on `cancel`, and ends
    in one sentence. Bad input fails here, in the request."""
    run = _evaluation(scope, methods, spec, settings)
    check_job_limit(scope)
    return scope.ws.runner.submit(EVALUATE, lambda job: run(job.report, job.cancel_event), scope.id,
                                  device=str(run.device), owner=scope.owner)


def _evaluation(scope: ProjectScope, methods: Sequence[str], spec: BackboneSpec | None,
                settings: dict[str, dict] | None):
    """Check the request and snapshot the examples now; the returned run(progress, cancel) does the work."""
    from ..evaluation import cross_validate

    scope.ws.check_backbone(spec or scope.ws.default_spec)  # hosted mode: an allowed backbone, first
    support = scope.store.support_set(scope.id)
    if not methods:
        raise DataError("Pick at least one method to compare.")
    for m in methods:
        get_method_class(m)  # an unknown method: one sentence naming the choices
    support.require_images("Cross-validation")  # classes with one image stay in training
    ws = scope.ws
    backbone = ws.backbone(spec)
    extractor = ws.extractor(backbone)

    def run(progress, cancel):
        return cross_validate(support, list(methods), backbone, extractor, seed=0, overrides=settings,
                              progress=progress, cancel=cancel)

    run.device = backbone.device
    return run


# ---- prediction and labeling -----------------------------------------------------------------------
@dataclass
class PoolRow:
    """A stored prediction of an image in the pool."""

    image_id: int
    name: str
    label: str
    confidence: float
    top: tuple[tuple[str, float], ...]  # the most probable classes, most probable first


def top_classes(classnames: Sequence[str], probs: Sequence[float], k: int = 3) -> tuple[tuple[str, float], ...]:
    """(class, probability) of the k most probable classes."""
    order = sorted(range(len(probs)), key=lambda j: -probs[j])[:k]
    return tuple((classnames[j], float(probs[j])) for j in order)


def predict(scope: ProjectScope, image, k: int = 5, model_id: int | None = None) -> dict[str, float]:
    """Top-k class probabilities for one image (a path, bytes or a PIL image) with the current
    (or given) model."""
    info, method = model(scope, model_id)
    if image is None:
        raise DataError("Upload an image to classify.")
    if isinstance(image, Image.Image):
        ref = ImageRef.from_pil(image)
    elif isinstance(image, (bytes, bytearray)):
        ref = ImageRef.from_bytes(bytes(image))
    else:
        ref = ImageRef.from_path(image)
    ref.open(draft_size=method.backbone.image_size)  # one clear sentence for a bad file
    probs = method.predict_proba([ref], scope.ws.extractor(method.backbone))[0]
    top = torch.topk(probs, min(k, len(probs)))
    return {method.classnames[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}


def start_labeling(scope: ProjectScope, model_id: int | None = None) -> str:
    """Pool labeling as a job of the one runner (its result: the rows of `label_pool`); no
    model, or a model that lost a class, fails here in one sentence. The job stores each chunk's
    predictions as soon as it is scored (`pool_page` shows them while it runs); when it ends,
    the memory its decoding and encoding used is handed back (`release_memory`)."""
    info, method = model(scope, model_id)
    _check_classes(scope, method)
    check_job_limit(scope)

    def run(job):
        try:
            return label_pool(scope, job.report, info.id, cancel=job.cancel_event)
        finally:
            release_memory()

    return scope.ws.runner.submit(LABEL, run, scope.id, device=str(method.backbone.device), owner=scope.owner)


def _check_classes(scope: ProjectScope, method: Method) -> dict[str, int]:
    classes = {c.name: c.id for c in scope.store.list_classes(scope.id)}
    missing = [c for c in method.classnames if c not in classes]
    if missing:
        raise DataError(f"The model's class {missing[0]!r} is no longer in the project; retrain first.")
    return classes


#: Pool labeling scores and stores the pool in chunks of growing size: the first chunk is small
#: so that its rows come back soon (at ViT-B-32 size on a 2-core CPU, about 18 images/s, 32
#: images take under 2 s), each later one doubles up to LABEL_CHUNK_MAX. Every chunk is one
#: `predict_proba` call, whose feature pipeline ramps up again (its first sub-batch is decoded
#: by the encoding thread); at 1,024 images that restart is under 1% of the chunk's time, and
#: each chunk's store write (one transaction) is about 20 ms per 1,000 rows.
LABEL_CHUNK_FIRST = 32
LABEL_CHUNK_MAX = 1024


def label_chunks(n: int, first: int = LABEL_CHUNK_FIRST, largest: int = LABEL_CHUNK_MAX) -> list[tuple[int, int]]:
    """(start, stop) of the chunks a pool of n images is labeled in: `first`, then each twice
    the last, at most `largest`."""
    out, start, size = [], 0, max(1, first)
    while start < n:
        out.append((start, min(n, start + size)))
        start, size = start + size, min(max(1, largest), 2 * size)
    return out


def label_pool(scope: ProjectScope, progress: ProgressFn | None = None, model_id: int | None = None,
               cancel=None) -> list[PoolRow]:
    """Predict every unlabeled image with the model (the current one by default), storing the
    predictions chunk by chunk (`label_chunks`) as they are scored, so that `pool_page` returns
    the rows scored so far while this runs; return all rows sorted least confident first
    (active learning). `progress` hears, after each chunk is stored, how many are stored of how
    many. `cancel` stops it between batches; the chunks stored before stay (and so do older
    predictions of the images not reached)."""
    info, method = model(scope, model_id)
    store = scope.store
    pool = store.list_images(scope.id, pool=True)
    if not pool:
        return []
    classes = _check_classes(scope, method)
    extractor = scope.ws.extractor(method.backbone)
    ids = [classes[c] for c in method.classnames]
    total, rows = len(pool), []

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Labeling the pool was cancelled; the predictions made before are kept.")

    for start, stop in label_chunks(total):
        # images removed or labeled since the job began are not scored (the review runs beside it)
        still = store.in_pool(scope.id, [img.id for img in pool[start:stop]])
        chunk = [img for img in pool[start:stop] if img.id in still]
        if not chunk:
            continue

        def report(p: Progress, start=start) -> None:  # called between batches: the place to stop
            check()
            if progress is not None:
                progress(Progress("Labeling the pool", start + p.step, total))
        P = method.predict_proba([img.ref() for img in chunk], extractor, report)
        conf, idx = P.max(1)
        conf, idx, probs = conf.tolist(), idx.tolist(), P.tolist()
        # skip_missing: an image removed while this chunk was scored is left out
        store.save_predictions(info.id, [(img.id, ids[j], c, pr) for img, c, j, pr in zip(chunk, conf, idx, probs)],
                               skip_missing=True)
        rows += [PoolRow(img.id, img.original_name, method.classnames[j], c, top_classes(method.classnames, pr))
                 for img, c, j, pr in zip(chunk, conf, idx, probs)]
        if progress is not None:
            progress(Progress("Labeling the pool", stop, total))
        if stop < total:
            check()
    rows.sort(key=lambda r: r.confidence)
    return rows


def _pool_row(classnames: Sequence[str], names: dict[int, str], p, img) -> PoolRow | None:
    """The PoolRow of a stored prediction (None when its class was deleted since)."""
    if p.label not in names:
        return None
    top = ()
    if isinstance(p.probs, list) and len(p.probs) == len(classnames):
        top = top_classes(classnames, p.probs)
    return PoolRow(img.id, img.original_name, names[p.label], p.confidence, top)


def pool_predictions(scope: ProjectScope) -> list[PoolRow]:
    """The current model's stored predictions for the images still in the pool, least
    confident first (no recomputation); empty when there is no model or no prediction."""
    current = current_model_info(scope)
    if current is None:
        return []
    store = scope.store
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    pool = {i.id: i for i in store.list_images(scope.id, pool=True)}
    classnames = current.config.get("classes", [])
    rows = []
    for p in store.list_predictions(current.id, pool_only=True):
        img = pool.get(p.image_id)
        row = None if img is None else _pool_row(classnames, names, p, img)
        if row is not None:
            rows.append(row)
    return rows


@dataclass(frozen=True)
class PoolPage:
    """One page of the pool's review queue."""

    rows: list[PoolRow]  # the current model's predictions, least confident first, offset..offset+limit
    offset: int
    scored: int  # pool images the current model has predicted (what pages run through)
    pool: int  # images in the pool, scored or not
    model_id: int | None  # the model whose predictions these are (None: no model yet)
    images: dict[int, ImageInfo] = field(default_factory=dict)  # the rows' images (for thumbnails)
    unscored: list[ImageInfo] = field(default_factory=list)  # a page not filled by scored rows: pool
    # images without a prediction, in upload order, up to the page's size


#: Rows a page of the pool shows: a screenful of the table or gallery, and cheap to make
#: (a 200-row page of a 10,000-image pool is a few ms of SQL and a few ms of rows).
POOL_PAGE_ROWS = 200


def pool_page(scope: ProjectScope, offset: int = 0, limit: int = POOL_PAGE_ROWS) -> PoolPage:
    """One page of the current model's stored predictions of the images still in the pool,
    least confident first, with how many are scored and how many are in the pool; a page the
    scored rows do not fill is completed with unscored pool images (`PoolPage.unscored`). While
    a labeling job runs, the page orders what is scored so far (the queue reorders as chunks
    arrive). The database orders and cuts the page (`ProjectStore.pool_prediction_page`), so the
    cost is the page's, not the pool's."""
    store = scope.store
    offset, limit = max(0, int(offset)), max(0, int(limit))
    in_pool = store.class_counts(scope.id).get(None, 0)
    current = current_model_info(scope)
    if current is None:
        return PoolPage([], offset, 0, in_pool, None, unscored=store.unscored_pool_images(scope.id, None, limit))
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    classnames = current.config.get("classes", [])
    page, scored = store.pool_prediction_page(current.id, offset, limit)
    rows, images = [], {}
    for p, img in page:
        row = _pool_row(classnames, names, p, img)
        if row is not None:
            rows.append(row)
            images[img.id] = img
    room = limit - len(page)
    unscored = store.unscored_pool_images(scope.id, current.id, room) if room > 0 and scored < in_pool else []
    return PoolPage(rows, offset, scored, in_pool, current.id, images, unscored)


@dataclass(frozen=True)
class Labeled:
    """What accepting or correcting pool labels did."""

    count: int  # images that joined a class
    refit_job: str | None = None  # the instant refit it started (a closed-form current model), else None
    note: str = ""  # one sentence when the model is closed-form but no refit could start


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def accept_moves(scope: ProjectScope, image_ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """(image id, predicted class id, "accepted") of the pool images among `image_ids` (labeled
    ones are left out): what accepting their current-model predictions does."""
    info = current_model_info(scope)  # its predictions only: the model itself need not load
    if info is None:
        raise DataError("Train a model first (Train tab).")
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    preds = scope.store.predictions_of(info.id, ids)
    moves = []
    for i in ids:
        img = image(scope, i)
        if img.class_id is not None:
            continue
        if i not in preds or preds[i].label is None:
            raise DataError(f"Image #{i} has no prediction yet; run 'Label the pool' first.")
        moves.append((i, preds[i].label, "accepted"))
    return moves


def log_labels(scope: ProjectScope, moves: Sequence[tuple[int, int, str]], kind: str):
    """Label images ((image id, class id, labeled_by) each) as ONE undoable action of this
    visitor (store.label_images: the moves and the log entry in one transaction); the ActionInfo."""
    names = {c.id: c.name for c in scope.store.list_classes(scope.id)}
    targets = {c for _, c, _ in moves}
    n = len(moves)
    if kind == "accept":
        summary = f"Accepted the predictions of {_plural(n, 'image')}."
    else:
        summary = f"Labeled {_plural(n, 'image')} as {names.get(next(iter(targets)), '?')}."
    if len(targets) > 1 and kind != "accept":
        summary = f"Labeled {_plural(n, 'image')} in {len(targets)} classes."
    return scope.store.label_images(scope.id, moves, kind=kind, owner=scope.owner, summary=summary)


def accept(scope: ProjectScope, image_ids: Sequence[int]) -> Labeled:
    """Accept the stored predictions of these pool images: they join the predicted class (and a
    closed-form current model refits at once: `instant_refit`). One undoable action
    (`app.station.undo`)."""
    moves = accept_moves(scope, image_ids)
    if not moves:
        return Labeled(0)
    log_labels(scope, moves, "accept")
    return Labeled(len(moves), *instant_refit(scope))


def correct(scope: ProjectScope, image_ids: Sequence[int], class_name: str) -> Labeled:
    """Label these images with `class_name` (a correction of the prediction); a closed-form
    current model refits at once (`instant_refit`). One undoable action (`app.station.undo`)."""
    c = class_by_name(scope, class_name)
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    for i in ids:
        image(scope, i)
    if not ids:
        return Labeled(0)
    log_labels(scope, [(i, c.id, "corrected") for i in ids], "correct")
    return Labeled(len(ids), *instant_refit(scope))


def accept_confident(scope: ProjectScope, threshold: float) -> Labeled:
    """Accept every stored pool prediction of the current model with confidence ≥ threshold."""
    rows = pool_predictions(scope)
    if not rows:
        raise DataError("Label the pool first; there are no predictions to accept.")
    ids = [r.image_id for r in rows if r.confidence >= float(threshold)]
    if not ids:
        return Labeled(0)
    return accept(scope, ids)


# ---- instant refit ---------------------------------------------------------------------------------
#: The key of a model config that records an instant refit's lineage:
#: {"of": the model id the lineage began with, "count": refits since, "settings": the settings
#: the lineage began with (its search on), "searched": whether this model's search ran}.
REFIT = "refit"


def refit_lineage(info: ModelInfo | None) -> dict:
    """The instant-refit record of a model's config ({} for a model trained or imported)."""
    cfg = info.config if info is not None and isinstance(info.config, dict) else {}
    lineage = cfg.get(REFIT)
    return lineage if isinstance(lineage, dict) else {}


def instant_refit(scope: ProjectScope) -> tuple[str | None, str]:
    """After labels were accepted or corrected: when the current model's method is closed-form
    (`catalog.closed_form`: GDA, ProKeR, Tip-Adapter), refit it now on the support set, from
    cached features, as a training job; (its id, "") then, (None, "") for any other method, and
    (None, one sentence) when none could start (the labels stay; Retrain remains).

    A job, not the request thread: the fit itself is milliseconds once every feature is cached,
    but the accepted images' plain views are cached (they were predicted) while their augmented
    views are encoded in the job (on a ViT-B-32-size CPU about 0.1 s per view, so ~1 s per
    accepted image at 10 views; tiny: milliseconds), and ProKeR's solve grows as N³.

    The refit reuses the hyper-parameters the model's search chose (`Method.fixed_settings`):
    the search is most of a fit's cost (GDA at 20 classes × 16 shots on the tiny backbone,
    features cached, on this 2-core machine: median 18–31 ms a refit without it, 40–100 ms with
    it; `bench`, closed_form_refit_ms, target 50 ms). The job predicts the pool with the new
    model, then makes it current, so the pool's stored predictions are always the current
    model's. When the lineage's own settings search, a background job then re-runs the search
    with them on the same labels and does the same with its model (a later refit cancels a
    re-search that has not finished: `refit_research`). A refit still queued when the next one
    is asked for is cancelled: the newer one fits the same labels and more, and each refit
    predicts the whole pool again (10,000 images from cached features: about 1 s on the tiny
    backbone, more on a busy machine), so twenty quick labels would otherwise queue twenty pool
    predictions behind a running labeling; at most one refit runs and one waits.

    Versions: the model the lineage began with (trained or imported by the user) is kept; each
    refit (and re-search) replaces the lineage's previous refit, so the model list grows by at
    most one per trained model; its config records the lineage (`REFIT`), and the model line
    says "refit N of #M"."""
    info = current_model_info(scope)
    if info is None or info.method not in catalog.REGISTRY or not catalog.closed_form(info.method):
        return None, ""
    ws = scope.ws
    stale = ws.researches.pop(scope.id, None)
    if stale is not None:  # this refit's own re-search supersedes it
        ws.runner.cancel(stale)
    waiting = ws.refits.pop(scope.id, None)
    if waiting is not None and _status(ws, waiting) == QUEUED:  # superseded before it started
        ws.runner.cancel(waiting)
    try:
        _, method = model(scope, info.id)
        lineage = refit_lineage(info)
        settings = lineage.get("settings") or asdict(method.config)
        fixed = catalog.coerce_settings(info.method, {**settings, **method.fixed_settings()})
        record = {"of": int(lineage.get("of", info.id)), "count": int(lineage.get("count", 0)) + 1,
                  "settings": settings, "searched": False}
        job_id = _submit_refit(scope, info.method, method.backbone, fixed, record)
    except FewShotError as e:
        return None, f"The {catalog.label(info.method)} model was not refitted: {_lower_first(str(e))}"
    ws.refits[scope.id] = job_id
    return job_id, ""


def newer_refit(scope: ProjectScope, job_id: str) -> str | None:
    """The refit that took the place of `job_id` (cancelled while queued by the next label's
    `instant_refit`), or None: it fits the same labels and more, so it is the one to wait for."""
    newer = scope.ws.refits.get(scope.id)
    return newer if newer not in (None, job_id) else None


def _status(ws: Workspace, job_id: str) -> str | None:
    try:
        return ws.runner.get(job_id).status
    except KeyError:
        return None


def refit_research(scope: ProjectScope) -> str | None:
    """The job re-running the search after the project's last instant refit (None when none
    was queued): the page follows it after the refit."""
    return scope.ws.researches.get(scope.id)


def _lower_first(sentence: str) -> str:
    return sentence[:1].lower() + sentence[1:] if sentence[1:2].islower() else sentence


def _submit_refit(scope: ProjectScope, method_name: str, backbone, settings: dict, record: dict) -> str:
    ws = scope.ws
    support = scope.store.support_set(scope.id)
    if record["searched"]:
        return ws.runner.submit_training(scope.id, method_name, backbone, ws.extractor(backbone), support=support,
                                         owner=scope.owner, config_extra={REFIT: record}, current=False,
                                         then=lambda job, info: _after_refit(scope, job, info, None), **settings)
    check_job_limit(scope)
    search = catalog.coerce_settings(method_name, record["settings"])
    return ws.runner.submit_training(scope.id, method_name, backbone, ws.extractor(backbone), support=support,
                                     owner=scope.owner, config_extra={REFIT: record}, current=False,
                                     then=lambda job, info: _after_refit(scope, job, info, search), **settings)


def _after_refit(scope: ProjectScope, job, info: ModelInfo, search: dict | None) -> ModelInfo:
    """In the refit's job, once its model is registered (not yet current): predict the pool with
    it, then make it current (so the pool on screen never lacks predictions), drop the
    lineage's previous refit, and (after an instant refit whose lineage searches) queue the
    re-search."""
    store, record = scope.store, refit_lineage(info)
    _drop_if_moved_on(store, scope.id, info, record)
    label_pool(scope, job.report, info.id, cancel=job.cancel_event)
    _drop_if_moved_on(store, scope.id, info, record)
    info = store.set_current_model(scope.id, info.id)
    for m in store.list_models(scope.id):
        if m.id != info.id and refit_lineage(m).get("of") == record.get("of"):
            with contextlib.suppress(NotFoundError):
                store.delete_model(m.id)
    if search is not None and search.get("search", True) and not job.cancel_event.is_set():
        backbone = scope.ws.load_method(info).backbone
        scope.ws.researches[scope.id] = _submit_refit(scope, info.method, backbone, search,
                                                      {**record, "searched": True})
    return record_cv(scope, job, info)


def _drop_if_moved_on(store, project_id: int, info: ModelInfo, record: dict) -> None:
    """When another model became current while a refit (or its re-search) ran — a training, an
    import, a choice in Model in use — the refit of the model before it must not take its
    place: delete it and stop the job in one sentence."""
    current = store.current_model(project_id)
    if current is None or current.id == record.get("of") or refit_lineage(current).get("of") == record.get("of"):
        return
    with contextlib.suppress(NotFoundError):
        store.delete_model(info.id)
    raise DataError("A newer model became current while this refit ran; the refit was dropped.")


#: The key of a model's metrics that holds its cross-validated accuracy measured after it was
#: registered: {"accuracy": float, "folds": "stratified 5-fold over N images"}.
CV = "cv"
#: Folds of the cross-validation an instant refit records: 5 stratified folds, never
#: leave-one-out, so its cost is 5 fixed-setting fits (tiny backbone, GDA, features cached:
#: about 5 × 20-30 ms) however many examples the project has.
REFIT_CV_FOLDS = 5


def record_cv(scope: ProjectScope, job, info: ModelInfo) -> ModelInfo:
    """In an instant refit's job, after its model is current: cross-validate the model's method
    with the model's own (fixed) settings on the support set, from cached features
    (`evaluation.cross_validate`, REFIT_CV_FOLDS stratified folds), and record the pooled
    accuracy in the model's metrics (`CV`), where the station's counters read it. Best effort:
    too few examples, a failure or a cancel leave the model as it is."""
    from ..evaluation import cross_validate

    if job.cancel_event.is_set():
        return info
    try:
        method = scope.ws.load_method(info)
        support = scope.store.support_set(scope.id)
        result = cross_validate(support, [info.method], method.backbone, scope.ws.extractor(method.backbone),
                                overrides={info.method: asdict(method.config)}, cancel=job.cancel_event,
                                max_folds=REFIT_CV_FOLDS, loo_max=0)
        r = result.results[info.method]
        return scope.store.set_model_metrics(info.id, {CV: {"accuracy": float(r.accuracy),
                                                            "folds": result.folds}})
    except (FewShotError, KeyError):
        return info
