"""Predict & label: one image -> top-k bars; a pool (files or a zip) -> predictions, least
confident first; accept or correct one or many; accepted images join their class. A closed-form
model (GDA, ProKeR, Tip-Adapter) refits at once and predicts the pool again; for the others,
Retrain reuses the cached features."""
from __future__ import annotations

import gradio as gr

from ..app import library, modeling, pool_import
from ..app.library import POOL
from ..errors import DataError, FewShotError
from ..jobs import CANCELLED, DONE, FAILED
from . import presenters
from .common import UI, added_text, consumed, follow, friendly, picked, progress_html, refused_text, toast_text, unchanged, who
from .presenters import md, parse_image_ids

POOL_COLUMNS = ["id", "file", "prediction", "confidence (%)", "top 3", "selected"]
MARK = "✓"


def build(ui: UI) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            ui.predict_image = gr.Image(label="An image to classify", type="filepath", height=260,
                                        sources=["upload", "webcam", "clipboard"], elem_id="predict-image")
            ui.predict_btn = gr.Button("Predict", variant="primary", elem_id="predict-btn")
            ui.prediction = gr.Label(label="Prediction (top 5)", num_top_classes=5, elem_id="predict-label")
            ui.label_model_md = gr.Markdown("", elem_id="label-model-summary")
        with gr.Column(scale=3):
            ui.pool_upload = gr.File(label="Add unlabeled images to the pool (files or a zip)", file_count="multiple",
                                     height=110, elem_id="pool-upload")  # no file_types: judged by content
            ui.predictions_upload = gr.File(
                label="Import pool predictions (Parquet from `python -m fewshot_studio label`)",
                file_count="multiple", height=80, elem_id="predictions-upload")
            with gr.Row():
                ui.label_pool_btn = gr.Button("Label the pool", variant="primary", elem_id="label-pool-btn")
                ui.label_cancel_btn = gr.Button("Cancel", variant="stop", elem_id="label-cancel-btn", scale=0)
                ui.retrain_btn = gr.Button("Retrain with the accepted images (cached features)", elem_id="retrain-btn")
            ui.label_progress = gr.HTML(progress_html(None, idle=""), elem_id="label-progress")
            ui.pool_table = gr.Dataframe(headers=POOL_COLUMNS, value=[], interactive=False, max_height=300,
                                         datatype=["number", "str", "str", "number", "str", "str"],
                                         elem_id="pool-table",
                                         label="Predictions, least confident first (click rows to select)")
            # what the page leaves out of a long pool ("Showing 200 of 10,000 ...")
            ui.pool_note = gr.Markdown("", elem_id="pool-note")
            ui.pool_gallery = gr.Gallery(label="Pool (click thumbnails to select; ✓ marks the selected)", columns=6,
                                         height=260, allow_preview=False, object_fit="contain", elem_id="pool-gallery")
            # the ids the table and the gallery show, in order: a click's position maps to an id here
            ui.pool_row_ids, ui.pool_ids = gr.State([]), gr.State([])
            with gr.Row(elem_classes="fs-inline"):
                # written only by clicks (ids as data); API clients pass ids ("12, 15")
                ui.pool_selection = gr.Textbox(label="Selected image ids", placeholder="click rows or thumbnails",
                                               interactive=False, scale=4, elem_id="pool-selection")
                ui.clear_selection_btn = gr.Button("Clear selection", scale=1, elem_id="clear-selection")
            with gr.Row(elem_classes="fs-inline"):
                ui.accept_btn = gr.Button("Accept selected", variant="primary", elem_id="accept-btn")
                ui.correct_dd = gr.Dropdown(label="Correct to class", choices=[], value=None,
                                            elem_id="correct-class")
                ui.correct_btn = gr.Button("Correct selected", elem_id="correct-btn")
            with gr.Row(elem_classes="fs-inline"):
                ui.accept_threshold = gr.Slider(0.0, 1.0, value=0.9, step=0.01, elem_id="accept-threshold",
                                                label="Confidence to accept automatically")
                ui.accept_conf_btn = gr.Button("Accept confident", elem_id="accept-confident-btn")

    pool_outs = [ui.pool_table, ui.pool_gallery, ui.pool_row_ids, ui.pool_ids, ui.pool_selection, ui.correct_dd,
                 ui.pool_note]

    def pool_view(pid, owner, selection=()):
        """The first page of the pool's predictions (table) and thumbnails (gallery), the ids
        `selection` marked ✓: a page (modeling.pool_page), never the whole pool, so a
        10,000-image pool renders as fast as a small one; the note says how much is shown."""
        if pid is None:
            return {ui.pool_table: [], ui.pool_gallery: [], ui.pool_row_ids: [], ui.pool_ids: [],
                    ui.pool_selection: "", ui.correct_dd: gr.Dropdown(choices=[], value=None), ui.pool_note: ""}
        scope = ui.scope(pid, owner)
        page = modeling.pool_page(scope)
        rows, chosen = page.rows, set(selection)
        table = [[r.image_id, r.name, r.label, round(100 * r.confidence, 1), presenters.top_text(r.top),
                  MARK if r.image_id in chosen else ""] for r in rows]
        gallery, ids = presenters.pool_page_gallery(scope, page)
        gallery = [(t, f"{MARK} {c}" if i in chosen else c) for (t, c), i in zip(gallery, ids)]
        choices = [v for _, v in presenters.class_choices(scope)]
        return {ui.pool_table: table, ui.pool_gallery: gallery, ui.pool_row_ids: [r.image_id for r in rows],
                ui.pool_ids: ids, ui.pool_selection: ", ".join(str(i) for i in selection),
                ui.correct_dd: gr.Dropdown(choices=choices, value=choices[0] if choices else None),
                ui.pool_note: presenters.pool_page_note(page, len(rows), len(ids))}

    ui.pool_view = pool_view

    def on_tab(pid, owner, request: gr.Request):
        """Entering the tab: the class list and model line may have changed elsewhere."""
        owner = who(owner, request)
        if pid is None:
            return unchanged([ui.correct_dd, ui.label_model_md])
        scope = ui.scope(pid, owner)
        choices = [v for _, v in presenters.class_choices(scope)]
        return {ui.correct_dd: gr.Dropdown(choices=choices), ui.label_model_md: presenters.model_summary(scope)}

    ui.label_tab_fn = on_tab

    def view(pid, owner):
        out = pool_view(pid, owner)
        out[ui.label_model_md] = presenters.model_summary(ui.scope(pid, owner)) if pid is not None else ""
        out[ui.prediction] = None
        return out

    ui.add_view(view, [*pool_outs, ui.label_model_md, ui.prediction], model=True)
    ui.pool_outs = pool_outs


def wire(ui: UI) -> None:
    acts = [ui.notice, *ui.pool_outs, ui.label_model_md]

    @friendly
    def predict(pid, image, owner, request: gr.Request):
        if image is None:
            raise DataError("Upload an image to classify.")
        return modeling.predict(ui.scope(pid, who(owner, request)), image, k=5)

    @friendly
    def add_pool(pid, files, owner, request: gr.Request):
        owner = who(owner, request)
        with consumed(files) as paths:
            up = library.add_uploads(ui.scope(pid, owner), paths, POOL)
        if up.errors:
            gr.Warning(refused_text(up.errors, escape=toast_text).strip())
        return {ui.notice: added_text(up.added, up.duplicates, "to the pool") + " Press Label the pool to label them."
                           + refused_text(up.errors), **ui.pool_view(pid, owner), ui.pool_upload: None}

    @friendly
    def import_predictions(pid, files, owner, request: gr.Request):
        owner = who(owner, request)
        with consumed(files) as paths:
            r = pool_import.import_predictions(ui.scope(pid, owner), paths)
        return {ui.notice: presenters.imported_text(r), **ui.pool_view(pid, owner), ui.predictions_upload: None}

    @friendly
    def check_label_pool(pid, owner, request: gr.Request):
        """Fails fast with the one sentence (no model, a stale model) before the long run."""
        modeling.current_model(ui.scope(pid, who(owner, request)))

    labeling: dict[str, str] = {}  # browser session -> the pool-labeling job it started

    @friendly
    def label_pool(pid, owner, request: gr.Request):
        """Label the pool as a job: its progress on the bar until it ends, then the rows."""
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        job_id = labeling[request.session_hash] = modeling.start_labeling(scope)
        try:
            # each stored chunk shows at once (the review starts on the first one); the
            # selection box is left as the clicks made it
            shown = -1
            jobs = follow(ui.ws, job_id, ui.label_progress)
            while True:
                try:
                    bar = next(jobs)
                except StopIteration as end:
                    state = end.value
                    break
                scored = modeling.pool_page(scope, 0, 0).scored
                if scored != shown:
                    shown = scored
                    bar = {**bar, **ui.pool_view(pid, owner), ui.pool_selection: gr.skip(), ui.correct_dd: gr.skip()}
                yield bar
        finally:
            if labeling.get(request.session_hash) == job_id:
                del labeling[request.session_hash]
        bar = {ui.label_progress: progress_html(state)}
        if state.status == CANCELLED:
            yield {**bar, ui.notice: state.message, **ui.pool_view(pid, owner),
                   ui.label_model_md: presenters.model_summary(scope)}
            return
        if state.status == FAILED:
            yield bar
            raise FewShotError(state.message)
        rows = state.result
        if not rows:
            msg = "The pool is empty: add unlabeled images first."
        else:
            low = sum(r.confidence < 0.5 for r in rows)
            msg = (f"Labeled {len(rows)} pool image{'s' if len(rows) != 1 else ''}, least confident first "
                   f"({low} below 50%). Select and accept, or correct.")
        yield {**bar, ui.notice: msg, **ui.pool_view(pid, owner),
               ui.label_model_md: presenters.model_summary(scope)}

    def cancel_labeling(request: gr.Request):
        job_id = labeling.get(request.session_hash)
        if job_id is None or not modeling.cancel(ui.ws, job_id):
            return {ui.notice: "No pool labeling is running."}
        return {ui.notice: "Cancelling the pool labeling (it stops after the current batch; "
                           "earlier predictions are kept)."}

    def toggle(pid, selection, ids, owner, evt: gr.SelectData, request: gr.Request):
        """A click on a row or thumbnail selects its image, or unselects it; the view marks it."""
        image_id = picked(ids, evt)
        if pid is None or image_id is None:
            return unchanged(ui.pool_outs)
        chosen = parse_image_ids(selection)
        chosen = [i for i in chosen if i != image_id] if image_id in chosen else chosen + [image_id]
        return ui.pool_view(pid, who(owner, request), selection=chosen) | {ui.correct_dd: gr.skip()}

    def clear_selection(pid, owner, request: gr.Request):
        if pid is None:
            return unchanged(ui.pool_outs)
        return ui.pool_view(pid, who(owner, request)) | {ui.correct_dd: gr.skip()}

    def after_change(pid, owner, message):
        return {ui.notice: message, **ui.pool_view(pid, owner),
                ui.label_model_md: presenters.model_summary(ui.scope(pid, owner))}

    def them(n: int) -> str:
        return "it" if n == 1 else "them"

    def labeled(pid, owner, done, message: str):
        """The pool after labels were accepted or corrected. A closed-form model refits at once
        (modeling.instant_refit): the bar follows that job, then the pool shows the new model's
        predictions; any other model waits for Retrain."""
        if not done.count:
            yield after_change(pid, owner, message)
            return
        if done.refit_job is None:
            yield after_change(pid, owner, f"{message} {done.note or f'Retrain to use {them(done.count)}.'}")
            return
        scope = ui.scope(pid, owner)
        method = presenters.method_label(modeling.current_model_info(scope).method)
        yield {**after_change(pid, owner, f"{message} Refitting the {method} model with "
                                          f"{them(done.count)} (closed form, cached features)..."),
               ui.label_progress: progress_html(ui.ws.runner.get(done.refit_job))}
        job_id = done.refit_job
        state = yield from follow(ui.ws, job_id, ui.label_progress)
        # a refit still queued is cancelled by the next label's (modeling.instant_refit): that
        # newer one fits these labels too, so the bar follows it instead of reporting a failure
        while state.status == CANCELLED and (newer := modeling.newer_refit(scope, job_id)) is not None:
            job_id = newer
            state = yield from follow(ui.ws, job_id, ui.label_progress)
        if state.status != DONE:
            yield {**after_change(pid, owner, f"{message} The refit did not finish: {state.message} "
                                              f"Retrain to use {them(done.count)}."),
                   ui.label_progress: progress_html(state)}
            return
        message += (f" The {method} model, refitted with {them(done.count)}, is now current and has "
                    "predicted the pool again.")
        research = modeling.refit_research(scope)
        if research is None:
            yield {**after_change(pid, owner, message), ui.label_progress: progress_html(state)}
            return
        # the refit reused its search's values; the search runs again in the background and
        # its model (usually milliseconds later) replaces the refit: the pool follows it too
        yield {**after_change(pid, owner, f"{message} Searching its hyper-parameters again..."),
               ui.label_progress: progress_html(state)}
        again = yield from follow(ui.ws, research, ui.label_progress)
        if again.status == DONE:
            message += " Its hyper-parameters were then searched again with the new labels."
        yield {**after_change(pid, owner, message), ui.label_progress: progress_html(again if again.status == DONE
                                                                                     else state)}

    @friendly
    def accept(pid, selection, owner, request: gr.Request):
        owner = who(owner, request)
        ids = parse_image_ids(selection)
        if not ids:
            raise DataError("Select images first: click their rows or thumbnails.")
        done = modeling.accept(ui.scope(pid, owner), ids)
        n = done.count
        yield from labeled(pid, owner, done, f"Accepted {n} prediction{'s' if n != 1 else ''}: "
                                             f"{'they join' if n != 1 else 'it joins'} the predicted class.")

    @friendly
    def correct(pid, selection, class_name, owner, request: gr.Request):
        owner = who(owner, request)
        ids = parse_image_ids(selection)
        if not ids:
            raise DataError("Select images first: click their rows or thumbnails.")
        if not class_name:
            raise DataError("Pick the class to label them with.")
        done = modeling.correct(ui.scope(pid, owner), ids, class_name)
        n = done.count
        yield from labeled(pid, owner, done, f"Labeled {n} image{'s' if n != 1 else ''} as **{md(class_name)}**.")

    @friendly
    def accept_confident(pid, threshold, owner, request: gr.Request):
        owner = who(owner, request)
        done = modeling.accept_confident(ui.scope(pid, owner), threshold)
        n = done.count
        yield from labeled(pid, owner, done, f"Accepted {n} prediction{'s' if n != 1 else ''} at or above "
                                             f"{float(threshold):.0%} confidence.")

    @friendly
    def retrain(pid, owner, request: gr.Request):
        from .train import start_outputs

        owner = who(owner, request)
        job_id = modeling.retrain(ui.scope(pid, owner))
        return start_outputs(ui, job_id, "Retraining with the same method and settings; features of images "
                                         "seen before come from the cache.")

    ui.predict_btn.click(predict, [ui.project, ui.predict_image, ui.owner], ui.prediction, api_name="predict")
    ui.predict_image.upload(predict, [ui.project, ui.predict_image, ui.owner], ui.prediction,
                            api_visibility="private")
    # what changes the pool; the station (ui/station.py) refreshes after each
    ui.pool_events = []
    ui.pool_events.append(ui.pool_upload.upload(add_pool, [ui.project, ui.pool_upload, ui.owner], acts + [ui.pool_upload],
                          api_name="add_pool"))
    ui.pool_events.append(ui.predictions_upload.upload(
        import_predictions, [ui.project, ui.predictions_upload, ui.owner], acts + [ui.predictions_upload],
        api_name="import_predictions"))
    # the check fails fast in one sentence; the labeling itself shows its progress on the bar
    ui.pool_events.append(ui.label_pool_btn.click(
        check_label_pool, [ui.project, ui.owner], None, api_visibility="private").success(
        label_pool, [ui.project, ui.owner], acts + [ui.label_progress], api_name="label_pool", show_progress="hidden"))
    ui.label_cancel_btn.click(cancel_labeling, None, [ui.notice], api_name="cancel_labeling", concurrency_limit=None)
    sel_ins = [ui.project, ui.pool_selection]
    ui.pool_table.select(toggle, [*sel_ins, ui.pool_row_ids, ui.owner], ui.pool_outs, api_visibility="private")
    ui.pool_gallery.select(toggle, [*sel_ins, ui.pool_ids, ui.owner], ui.pool_outs, api_visibility="private")
    ui.clear_selection_btn.click(clear_selection, [ui.project, ui.owner], ui.pool_outs, api_visibility="private")
    # a closed-form model refits at once: these follow the refit on the bar (no spinner over the pool)
    ui.pool_events += [
        ui.accept_btn.click(accept, [ui.project, ui.pool_selection, ui.owner], acts + [ui.label_progress],
                            api_name="accept", show_progress="hidden"),
        ui.correct_btn.click(correct, [ui.project, ui.pool_selection, ui.correct_dd, ui.owner],
                             acts + [ui.label_progress], api_name="correct", show_progress="hidden"),
        ui.accept_conf_btn.click(accept_confident, [ui.project, ui.accept_threshold, ui.owner],
                                 acts + [ui.label_progress], api_name="accept_confident", show_progress="hidden")]
    ui.retrain_btn.click(retrain, [ui.project, ui.owner],
                         [ui.notice, ui.job, ui.timer, ui.progress, ui.label_progress, ui.curve],
                         api_name="retrain", concurrency_limit=None, show_progress="hidden")
