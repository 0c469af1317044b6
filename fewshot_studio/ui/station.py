"""The labeling station, at the top of the Predict & label tab: keyboard-first review of the pool
(one image large, its classes as numbered buttons, the next images as a prefetched strip), a grid of
thumbnails for bulk work, undo with a short history, and counters. Every action is one call of
app/station.py; only the station's own components update (no page re-render). The keys live in
ui/station.js: they click these buttons by elem_id, so the mouse and the keyboard share one path.

Review is a position in the queue's order (app.station.queue): labeling or skipping the image at
the position lets the next one slide in, ←/→ move the position, and a refreshed queue (a refit's
new predictions) keeps the image on screen where it still is in the pool. While the pool is
being labeled, the station follows the job: its timer shows the predictions stored so far (the
first chunk's image as soon as it is stored), at most every FOLLOW_EVERY seconds, the image
under review staying on screen as the queue reorders around it.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from ..app import library, modeling, station
from ..errors import DataError
from ..jobs import FINISHED, LABEL
from . import presenters
from .common import UI, friendly, unchanged, who
from .presenters import parse_image_ids

KEYS = 9  # numbered class buttons: keys 1-9
STRIP = 8  # next images shown (and so prefetched) after the one under review
PREFETCH = 2  # next review images loaded ahead at full review size (a key press is ~0.3 s apart)
GRID_PAGE = 48  # grid thumbnails per page: 6 rows of 8 at 1400 px, one screen without scrolling
HISTORY = 8  # actions the history list shows
SESSIONS = 1024  # browser sessions whose last station state is kept; the oldest idle ones are forgotten
#: While the pool is labeled, the review shows newly stored predictions at most this often
#: (seconds): each refresh re-reads the predictions stored so far (a 10,000-image pool: 250–450
#: ms of parsing on this shared 2-core machine) and a key pressed meanwhile waits for it, so
#: refreshing on every timer tick would make keys lag; the job stores a chunk every 1–3 s.
FOLLOW_EVERY = 1.0
#: How long after Label the pool is pressed the station waits for its job to appear before it
#: stops following (the check before it may refuse). Generous: on a busy 2-core machine the job
#: appeared after more than 5 s, and the station then missed the whole labeling; once the job
#: has been seen, the station stops as soon as it is gone.
FOLLOW_START = 60.0
REVIEW, GRID = "Review", "Grid"
SCRIPT = Path(__file__).with_name("station.js")


def script() -> str:
    """The page's one script (station.js) as the function gr.Blocks.launch(js=...) runs on load.
    (A <script> in launch(head=...) kept the Evaluate tab's plotly chart from rendering.)"""
    return f"() => {{\n{SCRIPT.read_text()}\n}}"


def fresh_state() -> dict:
    """A browser session's station: the review position, the image on it and its prediction
    shown, the images it skipped (they go to the end of its queue), the grid's page, the grid's
    shown ids and predictions, the refit it waits for, the model whose predictions are on
    screen, and while a pool labeling runs: when following it began and what it showed last (a
    stamp of the stored predictions) and when."""
    return {"pos": 0, "current": None, "label": None, "skipped": [], "grid_offset": 0, "grid_ids": [],
            "grid_labels": [], "pending": None, "model_id": None, "labeling": None, "followed": None,
            "followed_at": 0.0}


def polling(state: dict) -> bool:
    """Whether the station's timer runs: a refit to wait for, or a pool labeling to follow."""
    return bool(state.get("pending") or state.get("labeling"))


def build(ui: UI) -> None:
    with gr.Group(elem_id="station"):
        with gr.Row(elem_classes="fs-inline"):
            ui.st_mode = gr.Radio([REVIEW, GRID], value=REVIEW, label="Labeling station", elem_id="station-mode",
                                  scale=1)
            ui.st_strategy = gr.Dropdown([(presenters.STRATEGY_LABELS.get(s, s), s) for s in station.QUEUE_ORDERS],
                                         value=station.DEFAULT_STRATEGY, label="Queue order",
                                         elem_id="station-strategy", scale=1)
            # closed-form models refit after every label; the others retrain after this many
            ui.st_every = gr.Number(station.DEFAULT_RETRAIN_EVERY, precision=0, minimum=1, maximum=1000, step=1,
                                    label="Retrain every N labels", elem_id="station-every", scale=0,
                                    min_width=150)
            ui.st_undo = gr.Button("Undo · Z", elem_id="station-undo", scale=0)
            ui.st_refresh = gr.Button("Refresh", elem_id="station-refresh", scale=0)
        ui.st_counters = gr.HTML("", elem_id="station-counters")
        with gr.Column(elem_id="station-review") as ui.st_review:
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=260):
                    ui.st_image = gr.HTML(presenters.review_html(None, None, 0, 0), elem_id="station-image")
                with gr.Column(scale=2, min_width=260, elem_id="station-classes"):
                    ui.st_class_btns = [gr.Button(f"{k}", visible=False, elem_id=f"station-class-{k}",
                                                  elem_classes="fs-class-btn") for k in range(1, KEYS + 1)]
                    with gr.Row(elem_classes="fs-station-actions"):
                        ui.st_accept = gr.Button("Accept prediction · Enter / A", variant="primary",
                                                 elem_id="station-accept")
                        ui.st_skip = gr.Button("Skip · S", elem_id="station-skip")
                    with gr.Row(elem_classes="fs-station-actions"):
                        ui.st_prev = gr.Button("← Back", elem_id="station-prev")
                        ui.st_next = gr.Button("Next →", elem_id="station-next")
            ui.st_strip = gr.HTML("", elem_id="station-strip")
        with gr.Column(visible=False, elem_id="station-grid") as ui.st_grid:
            with gr.Row(elem_classes="fs-inline"):
                ui.st_grid_class = gr.Dropdown([("All classes", "")], value="", label="Predicted class",
                                               elem_id="station-grid-class")
                ui.st_grid_min = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Confidence from",
                                           elem_id="station-grid-min")
                ui.st_grid_max = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="to", elem_id="station-grid-max")
                ui.st_grid_sort = gr.Dropdown(list(presenters.GRID_SORTS), value="", label="Sort",
                                              elem_id="station-grid-sort")
            ui.st_grid_tiles = gr.HTML("", elem_id="station-grid-tiles")
            # station.js writes the selected tiles' ids here (never typed): the handlers read it
            ui.st_grid_sel = gr.Textbox("", visible="hidden", elem_id="station-grid-selection")
            with gr.Row(elem_classes="fs-inline"):
                ui.st_grid_prev = gr.Button("← Page", elem_id="station-grid-prev", scale=0)
                ui.st_grid_page = gr.Markdown("", elem_id="station-grid-page")
                ui.st_grid_next = gr.Button("Page →", elem_id="station-grid-next", scale=0)
            with gr.Row(elem_classes="fs-inline"):
                ui.st_grid_accept = gr.Button("Accept all shown", variant="primary", elem_id="station-grid-accept")
                ui.st_grid_to = gr.Dropdown([], value=None, label="Class", elem_id="station-grid-to")
                ui.st_grid_assign = gr.Button("Assign class to selected", elem_id="station-grid-assign")
        ui.st_keys = gr.HTML(KEYS_HELP, elem_id="station-keys")
        ui.st_history = gr.HTML(presenters.history_html([]), elem_id="station-history")
        ui.st_state = gr.State(fresh_state())
        # polls a refit the last label started or a pool labeling, only while there is one
        ui.st_timer = gr.Timer(0.5, active=False)

    ui.st_review_outs = [ui.st_state, ui.st_image, *ui.st_class_btns, ui.st_strip, ui.st_counters,
                         ui.st_history, ui.st_timer]
    ui.st_grid_outs = [ui.st_state, ui.st_grid_tiles, ui.st_grid_page, ui.st_grid_sel, ui.st_grid_class,
                       ui.st_grid_to, ui.st_counters, ui.st_history, ui.st_timer]
    ui.st_outs = list(dict.fromkeys(ui.st_review_outs + ui.st_grid_outs + [ui.st_mode, ui.st_review, ui.st_grid]))

    def view(pid, owner):
        """A project opened: its station from the top of the queue, in review mode."""
        if pid is None:
            return {ui.st_state: fresh_state(), ui.st_image: presenters.review_html(None, None, 0, 0),
                    **{b: gr.Button(visible=False) for b in ui.st_class_btns}, ui.st_strip: "",
                    ui.st_counters: "", ui.st_history: presenters.history_html([]), ui.st_mode: REVIEW,
                    ui.st_review: gr.Column(visible=True), ui.st_grid: gr.Column(visible=False)}
        return {**review(ui.scope(pid, owner), fresh_state(), ui.st_strategy.value, keep=False),
                ui.st_mode: REVIEW, ui.st_review: gr.Column(visible=True), ui.st_grid: gr.Column(visible=False)}

    ui.add_view(view, [o for o in ui.st_outs if o not in (ui.st_grid_tiles, ui.st_grid_page, ui.st_grid_sel,
                                                          ui.st_grid_class, ui.st_grid_to)])

    def review(scope, state: dict, strategy: str, keep: bool = True) -> dict:
        """The review at the state's position. `keep`: the image that was on screen stays there if
        it is still in the pool (a refreshed queue may have moved it)."""
        state = dict(state)
        strategy = strategy or station.DEFAULT_STRATEGY
        pos = max(0, int(state.get("pos") or 0))
        current = state.get("current")
        if keep and current is not None:  # the same limit as the page: the diverse order depends on it
            found = station.queue(scope, strategy, offset=0, limit=1 + STRIP, skipped=state["skipped"],
                                  find=current).found
            if found is not None:
                pos = found
        page = station.queue(scope, strategy, offset=pos, limit=1 + STRIP, skipped=state["skipped"])
        if not page.items and page.total:  # the position ran past the end (the last image was labeled)
            pos = page.total - 1
            page = station.queue(scope, strategy, offset=pos, limit=1 + STRIP, skipped=state["skipped"])
        item = page.items[0] if page.items else None
        thumbs = presenters.thumbnails(scope, [i.image_id for i in page.items])
        # the large image on screen and those of the next PREFETCH, made now and loaded hidden
        previews = presenters.thumbnails(scope, [i.image_id for i in page.items[:1 + PREFETCH]], library.PREVIEW_SIZE)
        counts = station.counters(scope)
        shown = presenters.station_classes(presenters.class_names(scope), item.top if item else (), KEYS)
        # `label`: the prediction on screen, what Enter accepts even if a refit changes it meanwhile
        state.update(pid=scope.id, pos=pos, current=item.image_id if item else None, model_id=page.model_id,
                     classes=[n for n, _ in shown], label=item.label if item else None)
        if not state.get("labeling") and modeling.active_job(scope.ws, scope.id, LABEL) is not None:
            state["labeling"] = time.time()  # a labeling runs (opened mid-way, another session's)
        buttons = {b: gr.Button(presenters.class_button_text(k + 1, *shown[k]), visible=True,
                                variant="primary" if item is not None and shown[k][0] == item.label else "secondary")
                   if k < len(shown) and item is not None else gr.Button(visible=False)
                   for k, b in enumerate(ui.st_class_btns)}
        return {ui.st_state: state, **buttons,
                ui.st_image: presenters.review_html(item, previews.get(item.image_id) if item else None, pos,
                                                    page.total),
                ui.st_strip: presenters.strip_html(page.items[1:], thumbs,
                                                   {i: p for i, p in previews.items() if item is None or i != item.image_id}),
                ui.st_counters: presenters.counters_html(counts, page.model_label, page.note),
                ui.st_history: presenters.history_html(station.history(scope, HISTORY)),
                ui.st_timer: gr.Timer(active=polling(state))}

    def grid(scope, state: dict, strategy: str, predicted: str, lo: float, hi: float, sort: str) -> dict:
        """A page of the queue as tiles, filtered and sorted; the selection starts empty."""
        state = dict(state)
        offset = max(0, int(state.get("grid_offset") or 0))
        args = dict(predicted=predicted or None, min_confidence=float(lo), max_confidence=float(hi),
                    sort=sort or None, skipped=state["skipped"])
        page = station.queue(scope, strategy or station.DEFAULT_STRATEGY, offset=offset, limit=GRID_PAGE, **args)
        if not page.items and offset:  # the last page emptied: show the one before
            offset = max(0, (page.total - 1) // GRID_PAGE * GRID_PAGE)
            page = station.queue(scope, strategy or station.DEFAULT_STRATEGY, offset=offset, limit=GRID_PAGE,
                                 **args)
        thumbs = presenters.thumbnails(scope, [i.image_id for i in page.items])
        counts = station.counters(scope)
        names = presenters.class_names(scope)
        state.update(pid=scope.id, grid_offset=offset, grid_ids=[i.image_id for i in page.items],
                     grid_labels=[i.label for i in page.items], model_id=page.model_id)
        return {ui.st_state: state, ui.st_grid_tiles: presenters.grid_html(page.items, thumbs),
                ui.st_grid_page: presenters.page_text(offset, len(page.items), page.total), ui.st_grid_sel: "",
                ui.st_grid_class: gr.Dropdown(choices=[("All classes", ""), *[(n, n) for n in names]]),
                ui.st_grid_to: gr.Dropdown(choices=names),
                ui.st_counters: presenters.counters_html(counts, page.model_label, page.note),
                ui.st_history: presenters.history_html(station.history(scope, HISTORY)),
                ui.st_timer: gr.Timer(active=polling(state))}

    ui.st_render_review, ui.st_render_grid = review, grid


def wire(ui: UI) -> None:
    review, grid = ui.st_render_review, ui.st_render_grid
    newest: OrderedDict[str, dict] = OrderedDict()  # browser session -> the state its last event left
    locks: dict[str, threading.Lock] = {}
    guard = threading.Lock()

    def forget_idle() -> None:
        """Keep the last SESSIONS sessions (a public Space sees many visitors over days); a
        forgotten one just starts again from the gr.State its page sends. Called under `guard`."""
        while len(newest) > SESSIONS:
            old, _ = newest.popitem(last=False)
            lock = locks.get(old)
            if lock is not None and not lock.locked():
                del locks[old]

    def serial(fn):
        """One station event at a time per browser session, each starting from the state the
        session's previous event left: a timer tick sent before a key's action would otherwise
        finish later from its older copy of gr.State and put the old image back."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
            key = getattr(request, "session_hash", None)
            if key is None:
                return fn(*args, **kwargs)
            with guard:
                lock = locks.setdefault(key, threading.Lock())
            with lock:
                args = list(args)
                last = newest.get(key)
                if last is not None and isinstance(args[1], dict) and str(last.get("pid")) == str(args[0]):
                    args[1] = last
                out = fn(*args, **kwargs)
                if isinstance(out, dict) and isinstance(out.get(ui.st_state), dict):
                    with guard:
                        newest[key] = out[ui.st_state]
                        newest.move_to_end(key)
                        forget_idle()
                return out
        return wrapper
    grid_ins = [ui.st_strategy, ui.st_grid_class, ui.st_grid_min, ui.st_grid_max, ui.st_grid_sort]

    def acted(state: dict, done) -> dict:
        """The state after an action: a refit it started is what the timer waits for."""
        state = dict(state)
        if getattr(done, "refit_job", None):
            state["pending"] = done.refit_job
        return state

    def current(state: dict) -> int:
        if state.get("current") is None:
            raise DataError("There is no image to label: add pool images and press Label the pool.")
        return int(state["current"])

    def assign_key(k: int):
        def handler(pid, state, strategy, owner, every, request: gr.Request):
            scope = ui.scope(pid, who(owner, request))
            names = state.get("classes") or []
            if k >= len(names):
                raise DataError(f"There is no class {k + 1} to assign.")
            done = station.assign(scope, [current(state)], names[k], every=every)
            return review(scope, acted(state, done), strategy, keep=False)
        return friendly(handler)

    @friendly
    def accept(pid, state, strategy, owner, every, request: gr.Request):
        scope = ui.scope(pid, who(owner, request))
        image_id = current(state)
        done = station.assign(scope, [image_id], shown={image_id: state.get("label")}, every=every)
        return review(scope, acted(state, done), strategy, keep=False)

    @friendly
    def skip(pid, state, strategy, owner, request: gr.Request):
        scope = ui.scope(pid, who(owner, request))
        image_id = current(state)
        state = dict(state, skipped=[i for i in state["skipped"] if i != image_id] + [image_id], current=None)
        return review(scope, state, strategy, keep=False)

    def move(step: int):
        @friendly
        def handler(pid, state, strategy, owner, request: gr.Request):
            scope = ui.scope(pid, who(owner, request))
            state = dict(state, pos=max(0, int(state.get("pos") or 0) + step), current=None)
            return review(scope, state, strategy, keep=False)
        return handler

    @friendly
    def undo(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request):
        scope = ui.scope(pid, who(owner, request))
        done = station.undo(scope)
        # the undone image returns to its place in the queue: the position shows it again
        state = dict(acted(state, done), current=None)
        if mode == GRID:
            return grid(scope, state, strategy, g_class, g_lo, g_hi, g_sort)
        return review(scope, state, strategy, keep=False)

    @friendly
    def refresh(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request):
        if pid is None:
            return unchanged(ui.st_outs)
        scope = ui.scope(pid, who(owner, request))
        if mode == GRID:
            return grid(scope, state, strategy, g_class, g_lo, g_hi, g_sort)
        return review(scope, state, strategy)

    show = refresh  # inside events already serial (refresh itself becomes serial below)

    def finished(job_id: str) -> bool:
        try:
            return ui.ws.runner.get(job_id).status in FINISHED
        except KeyError:  # a job the runner no longer knows ended long ago
            return True

    def labeling_news(pid, state: dict, owner, request) -> tuple[dict, bool]:
        """While a pool labeling runs: (the state, whether predictions were stored since the
        station last showed them and FOLLOW_EVERY has passed). When the job is gone the station
        stops following (the pool event's own refresh shows its end)."""
        now = time.time()
        if modeling.active_job(ui.ws, pid, LABEL) is None:
            if state.get("seen") or now - float(state["labeling"]) > FOLLOW_START:
                return dict(state, labeling=None, followed=None, seen=False), False
        elif not state.get("seen"):
            state = dict(state, seen=True)
        if now - float(state.get("followed_at") or 0.0) < FOLLOW_EVERY:
            return state, False
        info = modeling.current_model_info(ui.scope(pid, who(owner, request)))
        stamp = None if info is None else [info.id, *ui.ws.store.prediction_stamp(info.id)]
        if stamp is None or stamp == state.get("followed"):
            return state, False
        return dict(state, followed=stamp, followed_at=now), True

    def tick(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request):
        """While a pool labeling runs: the predictions stored so far, at most every FOLLOW_EVERY
        seconds. While a refit runs: nothing; when it ends, the queue shows the new model's
        predictions. Either way the image on screen stays where it is."""
        job = state.get("pending")
        if pid is None or not polling(state):
            return {**unchanged(ui.st_outs), ui.st_timer: gr.Timer(active=False)}
        due, before = False, state
        if state.get("labeling"):
            try:
                state, due = labeling_news(pid, state, owner, request)
            except Exception:  # noqa: BLE001 - the project went: the refresh below says so
                state, due = dict(state, labeling=None), True
        if job and finished(job):
            # a refit may queue its hyper-parameter search again (modeling.refit_research): its
            # model replaces the refit's moments later, and the queue follows that one too
            try:
                again = modeling.refit_research(ui.scope(pid, who(owner, request)))
            except Exception:  # noqa: BLE001 - the project went: the refresh says so
                again = None
            state, due = dict(state, pending=again if again and again != job and not finished(again) else None), True
        if not due:
            if state is before:
                return unchanged(ui.st_outs)
            return {**unchanged(ui.st_outs), ui.st_state: state, ui.st_timer: gr.Timer(active=polling(state))}
        try:
            return show(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request)
        except gr.Error:
            return {**unchanged(ui.st_outs), ui.st_state: state, ui.st_timer: gr.Timer(active=False)}

    @friendly
    def follow_labeling(pid, state, owner, request: gr.Request):
        """Label the pool was pressed: the timer follows the job (`tick`)."""
        if pid is None:
            return unchanged(ui.st_review_outs)
        state = dict(state, labeling=time.time(), followed=None, followed_at=0.0, seen=False)
        return {**unchanged(ui.st_review_outs), ui.st_state: state, ui.st_timer: gr.Timer(active=True)}

    def switch(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request):
        shown = {ui.st_review: gr.Column(visible=mode != GRID), ui.st_grid: gr.Column(visible=mode == GRID)}
        if pid is None:
            return {**unchanged(ui.st_outs), **shown}
        return {**show(pid, state, mode, strategy, g_class, g_lo, g_hi, g_sort, owner, request), **shown}

    @friendly
    def regrid(pid, state, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request, step: int = 0):
        scope = ui.scope(pid, who(owner, request))
        offset = max(0, int(state.get("grid_offset") or 0) + step * GRID_PAGE)
        return grid(scope, dict(state, grid_offset=offset), strategy, g_class, g_lo, g_hi, g_sort)

    def page(step: int):
        def handler(pid, state, strategy, g_class, g_lo, g_hi, g_sort, owner, request: gr.Request):
            return regrid(pid, state, strategy, g_class, g_lo, g_hi, g_sort, owner, request, step=step)
        return handler

    @friendly
    def accept_shown(pid, state, strategy, g_class, g_lo, g_hi, g_sort, owner, every, request: gr.Request):
        scope = ui.scope(pid, who(owner, request))
        ids = state.get("grid_ids") or []
        if not ids:
            raise DataError("No pool images are shown to accept.")
        done = station.assign(scope, ids, shown=dict(zip(ids, state.get("grid_labels") or [])), every=every)
        return grid(scope, acted(state, done), strategy, g_class, g_lo, g_hi, g_sort)

    @friendly
    def assign_selected(pid, state, selection, class_name, strategy, g_class, g_lo, g_hi, g_sort, owner, every,
                        request: gr.Request):
        scope = ui.scope(pid, who(owner, request))
        shown = set(state.get("grid_ids") or [])
        ids = [i for i in parse_image_ids(selection) if i in shown]  # only tiles of the page on screen
        if not ids:
            raise DataError("Select images first: click tiles (shift-click or drag for a range).")
        if not class_name:
            raise DataError("Pick the class to assign.")
        done = station.assign(scope, ids, class_name, every=every)
        return grid(scope, acted(state, done), strategy, g_class, g_lo, g_hi, g_sort)

    base = [ui.project, ui.st_state, ui.st_strategy, ui.owner]
    full = [ui.project, ui.st_state, ui.st_mode, *grid_ins, ui.owner]
    grid_base = [ui.project, ui.st_state, *grid_ins, ui.owner]
    outs = ui.st_review_outs
    private = dict(api_visibility="private", show_progress="hidden")
    # every station event tells station.js it ended (success or error), so keys work again
    idle = "() => { window.fsStation && window.fsStation.idle(); }"

    def on(trigger, fn, ins, o, name=None):
        kw = dict(api_name=name, show_progress="hidden") if name else private
        trigger(fn, ins, o, **kw).then(None, None, None, js=idle)

    accept, skip, undo, refresh, tick, switch = map(serial, (accept, skip, undo, refresh, tick, switch))
    follow_labeling = serial(follow_labeling)
    accept_shown, assign_selected = serial(accept_shown), serial(assign_selected)
    for k, b in enumerate(ui.st_class_btns):
        on(b.click, serial(assign_key(k)), base + [ui.st_every], outs)
    on(ui.st_accept.click, accept, base + [ui.st_every], outs, "station_accept")
    on(ui.st_skip.click, skip, base, outs)
    on(ui.st_prev.click, serial(move(-1)), base, outs)
    on(ui.st_next.click, serial(move(+1)), base, outs)
    on(ui.st_undo.click, undo, full, ui.st_outs, "station_undo")
    on(ui.st_refresh.click, refresh, full, ui.st_outs)
    on(ui.st_strategy.input, refresh, full, ui.st_outs)
    ui.st_mode.input(switch, full, ui.st_outs, **private)
    ui.st_timer.tick(tick, full, ui.st_outs, **private)
    for c in (ui.st_grid_class.input, ui.st_grid_min.release, ui.st_grid_max.release, ui.st_grid_sort.input):
        on(c, serial(regrid), grid_base, ui.st_grid_outs)
    on(ui.st_grid_prev.click, serial(page(-1)), grid_base, ui.st_grid_outs)
    on(ui.st_grid_next.click, serial(page(+1)), grid_base, ui.st_grid_outs)
    on(ui.st_grid_accept.click, accept_shown, grid_base + [ui.st_every], ui.st_grid_outs, "station_accept_shown")
    on(ui.st_grid_assign.click, assign_selected,
       [ui.project, ui.st_state, ui.st_grid_sel, ui.st_grid_to, *grid_ins, ui.owner, ui.st_every], ui.st_grid_outs,
       "station_assign_selected")
    ui.station_tab_fn = (refresh, full, ui.st_outs)
    # the pool changed below (an upload, Label the pool, the table's Accept/Correct): the station
    # follows once that event ends (a .change on the table fired on every render and flooded the queue)
    for event in ui.pool_events:
        event.then(refresh, full, ui.st_outs, **private)
    # the pool labeling's stored chunks show in the review while it runs (tick), not only at its end
    ui.label_pool_btn.click(follow_labeling, base[:2] + [ui.owner], ui.st_review_outs, **private)


KEYS_HELP = """<div class="fs-keys" id="fs-keys-help" hidden><b>Keys</b> (not while typing in a box):
<kbd>1</kbd>–<kbd>9</kbd> label with the class numbered on its button · <kbd>Enter</kbd> or <kbd>A</kbd> accept the
prediction · <kbd>S</kbd> skip (to the end of the queue) · <kbd>Z</kbd> or <kbd>Ctrl</kbd>+<kbd>Z</kbd> undo ·
<kbd>←</kbd> <kbd>→</kbd> move · <kbd>?</kbd> show or hide this. In the grid: click a tile, shift-click a range,
drag across tiles, <kbd>Space</kbd> on a focused tile.</div>
<p class="fs-hint">Press <kbd>?</kbd> for the keys.</p>"""
