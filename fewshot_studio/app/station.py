"""The labeling station's core (issue 15): the review queue, undoable labeling actions, the
session history, the counters, and the model following the labels. Plain functions over a
ProjectScope returning frozen dataclasses; the UI (ui/) only formats them.

- `queue`: the pool images with the current model's stored predictions, most informative
  first by an acquisition strategy (`acquisition.STRATEGIES`), filtered and paged.
- `assign` / `remove` / `undo` / `history`: every labeling action is one entry of the store's
  action log (written in the same transaction as the change), so undo restores it exactly.
- `counters`: labeled today, left in the pool, per class, the current model's cross-validated
  accuracy.
- The model follows the labels: a closed-form current model refits at once after each label
  (`modeling.instant_refit`); any other retrains in the background after every `every`
  labels since it was trained (at most one such retrain pending), never blocking the call.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .. import acquisition
from ..acquisition import STRATEGIES
from ..errors import DataError, FewShotError
from ..jobs import DONE, TRAIN
from ..methods import catalog
from ..store import ActionInfo, ModelInfo
from . import library, modeling
from .context import ProjectScope
from .library import class_by_name

__all__ = ["STRATEGIES", "QUEUE_ORDERS", "OUTLIERS_FIRST", "OUTLIERS_LAST", "DEFAULT_STRATEGY", "SORTS", "DEFAULT_RETRAIN_EVERY", "QueueItem", "QueuePage", "Action",
           "Counters", "queue", "assign", "remove", "undo", "history", "counters", "model_label"]

DEFAULT_STRATEGY = "least-confident"
#: Queue orders beyond acquisition.STRATEGIES: least confident first, with the pool images the
#: last inspection found unlike every class (app.insight: "none of these classes?") moved to the
#: front (to look at them first) or to the back (to label the ordinary ones first).
OUTLIERS_FIRST, OUTLIERS_LAST = "outliers-first", "outliers-last"
QUEUE_ORDERS = STRATEGIES + (OUTLIERS_FIRST, OUTLIERS_LAST)
#: Grid mode's explicit orders: ascending confidence, ascending margin, descending entropy.
SORTS = ("confidence", "margin", "entropy")
#: A non-closed-form model retrains in the background after this many new labels. Small, so the
#: model visibly follows a labeling session (a GraphAdapter retrain from cached features on the
#: tiny backbone takes seconds, so ten labels — well under a minute of keyboard review — per
#: retrain keeps at most one retrain in flight at keyboard pace); the UI may pass its own.
DEFAULT_RETRAIN_EVERY = 10
#: Classes shown per queue item (the station's big buttons).
TOP_K = 5


@dataclass(frozen=True)
class QueueItem:
    image_id: int
    name: str  # original file name
    label: str  # predicted class name
    confidence: float  # top-1 probability
    top: tuple[tuple[str, float], ...]  # top classes (name, probability), best first, up to TOP_K
    margin: float  # p1 - p2
    entropy: float  # nats


@dataclass(frozen=True)
class QueuePage:
    items: list[QueueItem]  # this page, in queue order
    total: int  # items matching the filter
    model_id: int | None  # the model whose predictions these are (None: no model/predictions)
    model_label: str  # e.g. "GDA #12 (refit 3 of #9)"
    strategy: str = DEFAULT_STRATEGY  # the order actually used (diverse falls back to entropy)
    note: str = ""  # one sentence when the order asked for could not be used
    found: int | None = None  # the position in this order of the image `queue(find=...)` asked for


@dataclass(frozen=True)
class Action:
    id: int
    kind: str  # "accept" | "correct" | "remove" | "undo"
    count: int  # images it touched
    summary: str  # one sentence
    created: float  # unix time
    refit_job: str | None = None  # a retrain the label started (model follows labels), else None
    note: str = ""
    image_ids: tuple[int, ...] = field(default=(), compare=False)  # the images it touched
    undone: bool = False  # reversed by a later undo


@dataclass(frozen=True)
class Counters:
    labeled_today: int  # images labeled in this project since local midnight (net of undo)
    pool_left: int  # images still in the pool
    per_class: dict[str, int]  # examples per class
    cv_accuracy: float | None  # the current model's cross-validated accuracy when known
    model_label: str


def _action(a: ActionInfo, refit_job: str | None = None, note: str = "") -> Action:
    return Action(a.id, a.kind, a.count, a.summary, a.created, refit_job, note, a.image_ids, a.undone)


# ---- which model predicted -------------------------------------------------------------------------
def model_label(info: ModelInfo | None) -> str:
    """"GDA #12", "GDA #12 (refit 3 of #9)", or "no model yet"."""
    if info is None:
        return "no model yet"
    name = catalog.label(info.method) if info.method in catalog.REGISTRY else info.method
    lineage = modeling.refit_lineage(info)
    if lineage.get("of") is not None:
        return f"{name} #{info.id} (refit {int(lineage.get('count', 0))} of #{int(lineage['of'])})"
    return f"{name} #{info.id}"


# ---- the queue -----------------------------------------------------------------------------------
def _probability_matrix(table: dict, n_classes: int, class_index: dict[int, int]) -> np.ndarray:
    """(N, C) stored probabilities, parsed in one json.loads; a prediction stored without its
    list (or with another length) gets its confidence on its label and the rest spread evenly,
    so it still sorts by confidence."""
    texts = table["probs"]
    rows = json.loads("[" + ",".join(texts) + "]") if texts else []
    if all(isinstance(r, list) and len(r) == n_classes for r in rows):
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), n_classes)
    conf = np.asarray(table["confidence"], dtype=np.float64)
    P = np.repeat(((1.0 - conf) / max(1, n_classes - 1))[:, None], n_classes, axis=1)
    for n, r in enumerate(rows):  # only for rows stored in an older form
        if isinstance(r, list) and len(r) == n_classes:
            P[n] = r
        elif table["label"][n] in class_index:
            P[n, class_index[table["label"][n]]] = conf[n]
    return P


@dataclass(frozen=True)
class _Columns:
    """A model's parsed predictions (every image it predicted), kept while its stamp holds."""

    stamp: tuple
    ids: np.ndarray
    P: np.ndarray
    conf: np.ndarray
    labels: np.ndarray  # predicted class names ("" for a class deleted since)
    names: list
    hashes: list


#: Parsed prediction columns per store, by model id: the queue is asked again after every action,
#: and re-reading a 10,000-image pool's probabilities (one query and one JSON parse, 10 classes)
#: took 250–450 ms on this shared 2-core machine, while the stamp and the pool's ids take a few
#: ms. The last few models per store are kept.
_COLUMNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COLUMNS_LOCK = threading.Lock()
_COLUMNS_KEEP = 4


def _prediction_columns(scope: ProjectScope, info: ModelInfo, classes: dict[int, str],
                        class_index: dict[int, int], n_classes: int) -> _Columns:
    store = scope.store
    stamp = (*store.prediction_stamp(info.id), tuple(sorted(classes.items())), n_classes)
    with _COLUMNS_LOCK:
        kept = _COLUMNS.setdefault(store, {})
        cols = kept.get(info.id)
    if cols is not None and cols.stamp == stamp:
        return cols
    table = store.prediction_table(info.id, pool_only=False)
    P = _probability_matrix(table, n_classes, class_index) if table["image_id"] else np.zeros((0, n_classes))
    cols = _Columns(stamp, np.asarray(table["image_id"], dtype=np.int64), P,
                    np.asarray(table["confidence"], dtype=np.float64),
                    np.asarray([classes.get(c, "") for c in table["label"]], dtype=object),
                    table["name"], table["hash"])
    with _COLUMNS_LOCK:
        kept[info.id] = cols
        for old in list(kept)[:-_COLUMNS_KEEP]:
            del kept[old]
    return cols


def _current_columns(scope: ProjectScope, info: ModelInfo) -> tuple[_Columns | None, list[str], dict[int, str]]:
    """The model's parsed predictions (None when it names no classes), its class names, and
    the project's classes by id."""
    classes = {c.id: c.name for c in scope.store.list_classes(scope.id)}
    classnames = list(info.config.get("classes") or [])
    if not classnames:
        return None, classnames, classes
    by_name = {n: i for i, n in enumerate(classnames)}
    class_index = {cid: by_name[name] for cid, name in classes.items() if name in by_name}
    return _prediction_columns(scope, info, classes, class_index, len(classnames)), classnames, classes


def _parse_when_done(scope: ProjectScope, job_id: str) -> None:
    """When a refit or retrain that labels started ends (and then its re-search), parse its
    model's stored predictions in the job's own thread, so the station's next queue finds
    them parsed: with 10,000 pool images and GDA refitting after every label, nearly every
    action met a new model and parsed its predictions itself (median 150 ms, up to 525 ms
    on this shared 2-core machine)."""
    def listen(state) -> None:
        if state.status != DONE:
            return
        info = modeling.current_model_info(scope)
        if info is not None:
            _current_columns(scope, info)
        again = modeling.refit_research(scope)
        if again and again != state.id:
            with contextlib.suppress(KeyError):
                scope.ws.runner.subscribe(again, listen)
    with contextlib.suppress(KeyError):
        scope.ws.runner.subscribe(job_id, listen)


def _cached_plain_features(scope: ProjectScope, backbone_id: str, hashes: Sequence[str]) -> np.ndarray | None:
    """The cached plain-view features of these images (N, D), or None if any is not cached
    (nothing is encoded here: the queue answers a request)."""
    if not hashes:
        return None
    rows = scope.ws.cache.get_many(backbone_id, [(h, 0) for h in hashes])
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows)


def queue(scope: ProjectScope, strategy: str = DEFAULT_STRATEGY, *, offset: int = 0, limit: int = 48,
          predicted: str | None = None, min_confidence: float = 0.0, max_confidence: float = 1.0,
          sort: str | None = None, skipped: Sequence[int] = (), find: int | None = None) -> QueuePage:
    """The pool images with stored predictions of the current model, most informative first by
    `strategy` (acquisition.order: least confidence 1 − p₁, margin p₁ − p₂, entropy −Σp ln p,
    diverse = k-center greedy on the cached plain-view features among the 4 × `limit` least
    confident, away from the labeled examples' features when those are cached too). `sort`
    ("confidence", "margin", "entropy") overrides the order for grid mode; `predicted` keeps one
    predicted class; the confidence range is inclusive; `skipped` ids go to the end, in the order
    they were skipped. A page of `limit` items from `offset`; `find`: an image id whose position
    in the whole order the page reports (`found`, None when it is not in it), so a caller keeps
    its place however far new predictions moved that image."""
    if strategy not in QUEUE_ORDERS:
        raise DataError(f"Choose a queue order among {', '.join(QUEUE_ORDERS)}.")
    outliers, strategy = (strategy, DEFAULT_STRATEGY) if strategy in (OUTLIERS_FIRST, OUTLIERS_LAST) else ("", strategy)
    if sort is not None and sort not in SORTS:
        raise DataError(f"Sort by one of {', '.join(SORTS)}.")
    offset, limit = max(0, int(offset)), max(0, int(limit))
    info = modeling.current_model_info(scope)
    label = model_label(info)
    if info is None:
        return QueuePage([], 0, None, label, strategy)
    store = scope.store
    t, classnames, classes = _current_columns(scope, info)
    if t is None:
        return QueuePage([], 0, None, label, strategy)
    in_pool = np.isin(t.ids, np.asarray(store.pool_ids(scope.id), dtype=np.int64))
    if not in_pool.any():
        return QueuePage([], 0, None, label, strategy)
    keep = in_pool & (t.conf >= float(min_confidence)) & (t.conf <= float(max_confidence)) & (t.labels != "")
    if predicted not in (None, ""):
        keep &= t.labels == predicted
    rows = np.flatnonzero(keep)
    P, ids, conf, labels = t.P[rows], t.ids[rows], t.conf[rows], t.labels
    note, used = "", strategy
    if sort is not None:
        key = {"confidence": conf, "margin": acquisition.margin(P), "entropy": -acquisition.entropy(P)}[sort]
        order = np.argsort(key, kind="stable")
    elif strategy == "diverse":
        # only the uncertain shortlist's features are read: the same order as acquisition.order on
        # the whole pool (the rest follows by least confidence either way)
        batch = max(1, limit)
        by_confidence = acquisition.order(P, "least-confident")
        shortlist = by_confidence[:acquisition.CANDIDATE_FACTOR * batch]
        feats = _cached_plain_features(scope, info.backbone_id, [t.hashes[r] for r in rows[shortlist]])
        if feats is None:
            used = "entropy"
            note = "Not every pool image's features are cached yet, so the queue is in entropy order for now."
            order = acquisition.order(P, "entropy")
        else:
            support = store.support_set(scope.id)
            labeled = _cached_plain_features(scope, info.backbone_id, [r.hash for r in support.images])
            first = shortlist[acquisition.order(P[shortlist], "diverse", features=feats, batch=batch,
                                                labeled=labeled)]
            order = np.concatenate([first, by_confidence[len(shortlist):]])
    else:
        order = acquisition.order(P, strategy)
    if outliers:
        from .insight import outlier_ids

        odd = np.isin(ids[order], np.fromiter(outlier_ids(scope), dtype=np.int64))
        order = np.concatenate([order[odd], order[~odd]] if outliers == OUTLIERS_FIRST else [order[~odd], order[odd]])
        used = outliers
    if skipped:
        skip = np.array(list(dict.fromkeys(int(i) for i in skipped)), dtype=np.int64)
        back = np.isin(ids[order], skip)
        tail = order[back]
        by_id = np.argsort(skip)  # rank of each skipped id in skip order, looked up by binary search
        rank = by_id[np.searchsorted(skip[by_id], ids[tail])]
        order = np.concatenate([order[~back], tail[np.argsort(rank, kind="stable")]])
    found = None
    if find is not None:
        at = np.flatnonzero(ids[order] == int(find))
        found = int(at[0]) if at.size else None
    page = order[offset:offset + limit]
    margins, entropies = acquisition.margin(P[page]), acquisition.entropy(P[page])
    k = min(TOP_K, len(classnames))
    top_idx = np.argsort(-P[page], axis=1, kind="stable")[:, :k]
    items = []
    for n, o in enumerate(page):  # one page (≤ limit items)
        r = rows[o]
        top = tuple((classnames[j], float(P[o, j])) for j in top_idx[n])
        items.append(QueueItem(int(ids[o]), t.names[r], labels[r], float(conf[o]), top,
                               float(margins[n]), float(entropies[n])))
    return QueuePage(items, len(rows), info.id, label, used, note, found)


# ---- actions -------------------------------------------------------------------------------------
def _shown_moves(scope: ProjectScope, ids: Sequence[int], shown: Mapping[int, str]) -> list[tuple[int, int, str]]:
    """(image id, class id, "accepted") for accepting the predictions the user SAW: a refit
    between drawing the screen and the key press may have changed the stored ones, and an
    accept must never give an image a class the user was not shown. Labeled images are left out."""
    by_name = {c.name: c.id for c in library.classes(scope)}
    moves = []
    for i in ids:
        if library.image(scope, i).class_id is not None:
            continue
        name = shown.get(i)
        if name is None:
            raise DataError(f"Image #{i} has no prediction on screen to accept.")
        if name not in by_name:
            raise DataError(f"The class {name!r} shown for image #{i} no longer exists; pick a class.")
        moves.append((i, by_name[name], "accepted"))
    return moves


def assign(scope: ProjectScope, image_ids: Sequence[int], class_name: str | None = None, *,
           shown: Mapping[int, str] | None = None, every: int | None = None) -> Action:
    """Label images as ONE undoable action. `class_name` None: each pool image gets the predicted
    class — the one in `shown` (image id -> class name, what the screen showed) when given, else
    the current model's stored prediction — labeled_by "accepted"; labeled ones are left as they
    are. Else every image gets `class_name` ("corrected" where the current model predicted
    another class, "accepted" where it predicted this one, "user" where there is no
    prediction). Then the model follows the labels (`follow_labels`): the Action's refit_job is
    the refit or retrain it started."""
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        raise DataError("Pick at least one image to label.")
    if class_name is None:
        moves = (_shown_moves(scope, ids, {int(k): v for k, v in shown.items()}) if shown is not None
                 else modeling.accept_moves(scope, ids))
        if not moves:
            raise DataError("These images are already labeled; undo or pick pool images.")
        kind = "accept"
    else:
        c = class_by_name(scope, class_name)
        info = modeling.current_model_info(scope)
        preds = {i: p.label for i, p in scope.store.predictions_of(info.id, ids).items()} if info else {}
        moves = [(i, c.id, "user" if i not in preds else "accepted" if preds[i] == c.id else "corrected")
                 for i in ids]
        kind = "correct"
    logged = modeling.log_labels(scope, moves, kind)
    job, note = follow_labels(scope, every)
    if job:
        _parse_when_done(scope, job)
    return _action(logged, job, note)


def follow_labels(scope: ProjectScope, every: int | None = None) -> tuple[str | None, str]:
    """The model follows the labels: a closed-form current model refits now
    (`modeling.instant_refit`); any other is retrained in the background (`modeling.retrain`,
    refreshing the pool's predictions before the new model becomes current) once `every`
    (default DEFAULT_RETRAIN_EVERY) images were labeled since it was registered, unless a
    training of this project is already queued or running (at most one pending: it will see
    these labels' successor count when it is done). Never waits for the job: (its id or None,
    one sentence when none could start)."""
    info = modeling.current_model_info(scope)
    if info is None:
        return None, ""
    if info.method in catalog.REGISTRY and catalog.closed_form(info.method):
        return modeling.instant_refit(scope)
    every = DEFAULT_RETRAIN_EVERY if every in (None, "") else max(1, int(every))
    if scope.store.labeled_since(scope.id, info.created) < every:
        return None, ""
    if modeling.active_job(scope.ws, scope.id, TRAIN) is not None:
        return None, ""
    try:
        return modeling.retrain(scope, refresh=True), ""
    except FewShotError as e:
        return None, f"The model was not retrained: {str(e)[:1].lower()}{str(e)[1:]}"


def remove(scope: ProjectScope, image_ids: Sequence[int]) -> Action:
    """Take images out of the project as ONE undoable action (`undo` brings back the rows, their
    labels and their predictions; the files are kept until then: store.remove_undoably)."""
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        raise DataError("Pick at least one image to remove.")
    n = len(ids)
    a = scope.store.remove_undoably(scope.id, ids, owner=scope.owner,
                                    summary=f"Removed {n} image{'' if n == 1 else 's'}.")
    return _action(a)


def undo(scope: ProjectScope) -> Action:
    """Reverse this visitor's last action in the project that is not undone yet, exactly
    (labels and labeled_by restored, removed images back with their predictions); the undo's
    Action (its count: the images restored). A closed-form model refits to the restored labels."""
    done = scope.store.undo_last(scope.id, owner=scope.owner)
    if done is None:
        raise DataError("Nothing to undo.")
    original, reversal = done
    job, note = (None, "")
    if original.kind in ("accept", "correct") and reversal.count:
        job, note = modeling.instant_refit(scope)
        if job:
            _parse_when_done(scope, job)
    skipped = original.count - reversal.count
    if skipped > 0:
        note = (f"{skipped} of the images had changed since, so they were left as they are. " + note).strip()
    return _action(reversal, job, note)


def history(scope: ProjectScope, limit: int = 20) -> list[Action]:
    """The project's last actions, newest first."""
    return [_action(a) for a in scope.store.list_actions(scope.id, limit)]


# ---- counters ------------------------------------------------------------------------------------
def _local_midnight(now: float | None = None) -> float:
    t = _dt.datetime.fromtimestamp(now) if now is not None else _dt.datetime.now()
    return t.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def cv_accuracy(info: ModelInfo | None) -> float | None:
    """The model's cross-validated accuracy: the one an instant refit measured (metrics["cv"]),
    else the one Auto measured for the method it chose (metrics["auto"]["cv_accuracy"]), else None."""
    metrics = (info.metrics or {}) if info is not None else {}
    cv = metrics.get(modeling.CV)
    if isinstance(cv, dict) and isinstance(cv.get("accuracy"), (int, float)):
        return float(cv["accuracy"])
    auto = metrics.get("auto")
    if isinstance(auto, dict) and isinstance(auto.get("cv_accuracy"), dict):
        score = auto["cv_accuracy"].get(auto.get("winner"))
        if isinstance(score, (int, float)):
            return float(score)
    return None


def counters(scope: ProjectScope) -> Counters:
    """Labeled today (since local midnight, net of undo), left in the pool, examples per class,
    the current model's cross-validated accuracy (`cv_accuracy`) and its label."""
    store = scope.store
    counts = store.class_counts(scope.id)
    names = {c.id: c.name for c in store.list_classes(scope.id)}
    info = modeling.current_model_info(scope)
    return Counters(store.labeled_since(scope.id, _local_midnight()), counts.get(None, 0),
                    {names[c]: n for c, n in counts.items() if c is not None and c in names},
                    cv_accuracy(info), model_label(info))
