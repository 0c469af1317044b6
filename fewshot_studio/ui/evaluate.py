"""Evaluate: cross-validated accuracy on the user's own examples, per-class accuracy, a
confusion matrix, and methods side by side on the same folds with a "use the best" button."""
from __future__ import annotations

import gradio as gr

from .. import viz
from ..app import modeling
from ..errors import DataError, FewShotError
from ..jobs import CANCELLED, FAILED
from .common import UI, follow, friendly, need_project, progress_html, who
from .presenters import method_choices, method_label
from .train import settings_from


def build(ui: UI) -> None:
    with gr.Row(elem_classes="fs-inline"):
        ui.eval_methods = gr.CheckboxGroup(method_choices(), value=["graph", "tip", "zeroshot"], scale=4,
                                           label="Methods to compare (same folds; the Train tab's backbone and "
                                                 "advanced settings)", elem_id="eval-methods")
        ui.eval_btn = gr.Button("Cross-validate", variant="primary", scale=1, elem_id="eval-btn")
        ui.eval_cancel_btn = gr.Button("Cancel", variant="stop", scale=1, elem_id="eval-cancel-btn")
        ui.use_best_btn = gr.Button("Use the best in Train", scale=1, interactive=False, elem_id="use-best")
    ui.eval_progress = gr.HTML(progress_html(None, idle=""), elem_id="eval-progress")
    ui.eval_md = gr.Markdown(INTRO, elem_id="eval-summary", min_height=60)
    with gr.Row():
        ui.comparison_plot = gr.Plot(label="Methods compared", elem_id="comparison-plot")
        ui.per_class_plot = gr.Plot(label="Accuracy per class", elem_id="per-class-plot")
    with gr.Row(elem_classes="fs-inline"):
        ui.eval_detail = gr.Dropdown(label="Details for", choices=[], value=None, scale=1, elem_id="eval-detail")
    ui.confusion_plot = gr.Plot(label="Confusion matrix", elem_id="confusion-plot")
    ui.eval_state = gr.State(None)

    outs = [ui.eval_md, ui.comparison_plot, ui.per_class_plot, ui.confusion_plot, ui.eval_detail, ui.use_best_btn,
            ui.eval_state]

    def cleared(pid, owner):
        return {ui.comparison_plot: None, ui.per_class_plot: None, ui.confusion_plot: None, ui.eval_state: None,
                ui.eval_detail: gr.Dropdown(choices=[], value=None), ui.use_best_btn: gr.Button(interactive=False)}

    ui.add_view(cleared, [o for o in outs if o is not ui.eval_md])
    ui.eval_outs = outs


INTRO = ("Cross-validation trains each method on part of your examples and tests it on the rest: "
         "leave-one-out with few images, else 5-fold.")


def details(comp, method):
    r = comp.results[method]
    label = method_label(method)
    return (viz.per_class_figure(r.per_class_accuracy, f"{label}: accuracy per class"),
            viz.confusion_figure(r.confusion, comp.classnames, f"{label}: confusion matrix"))


def wire(ui: UI) -> None:
    ws = ui.ws
    adv = [c for _, _, c in ui.adv]
    running: dict[str, str] = {}  # browser session -> the cross-validation job it started

    def cleared(message: str) -> dict:
        """No results on screen (a new run starts, or one was cancelled): nothing of an earlier
        run may pass for this one's."""
        return {ui.eval_md: message, ui.comparison_plot: None, ui.per_class_plot: None, ui.confusion_plot: None,
                ui.eval_detail: gr.Dropdown(choices=[], value=None), ui.use_best_btn: gr.Button(interactive=False),
                ui.eval_state: None}

    @friendly
    def check(pid, methods, owner, request: gr.Request):
        """Fails fast with the one sentence before the long run (which shows its progress)."""
        ui.scope(pid, who(owner, request))
        if not methods:
            raise DataError("Pick at least one method to compare.")
        return cleared("Cross-validating…")

    @friendly
    def evaluate(pid, methods, backbone, checkpoint, owner, request: gr.Request, *values):
        """Start the cross-validation as a job, show its progress on the bar until it ends, then
        its results (an API client gets the final results)."""
        scope = ui.scope(need_project(pid), who(owner, request))
        settings = settings_from(ui, values)
        spec = modeling.backbone_spec(ws, backbone, None, checkpoint)
        job_id = running[request.session_hash] = modeling.start_evaluation(
            scope, list(methods or []), spec, settings={m: settings.get(m, {}) for m in methods or []})
        try:
            state = yield from follow(ws, job_id, ui.eval_progress)
        finally:
            if running.get(request.session_hash) == job_id:
                del running[request.session_hash]
        bar = {ui.eval_progress: progress_html(state)}
        if state.status == CANCELLED:  # what the user asked for, not a failure
            yield {**cleared("Cross-validation cancelled: no results. Press Cross-validate to run it again."),
                   **bar, ui.notice: "Cross-validation cancelled."}
            return
        if state.status == FAILED:
            yield bar
            raise FewShotError(state.message)
        comp = state.result
        best = comp.best
        md = comp.to_markdown()
        if best:
            md += f"\n\n**Best on your examples: {method_label(best)}.**"
        results = {method_label(m): r.accuracy for m, r in comp.results.items()}
        first = best or next(iter(comp.results), None)
        per_class, confusion = details(comp, first) if first else (None, None)
        yield {**bar, ui.notice: "Cross-validation finished.", ui.eval_md: md,
               ui.comparison_plot: viz.comparison_figure(results),
               ui.per_class_plot: per_class, ui.confusion_plot: confusion,
               ui.eval_detail: gr.Dropdown(choices=[(method_label(m), m) for m in comp.results], value=first),
               ui.use_best_btn: gr.Button(interactive=best is not None), ui.eval_state: comp}

    def cancel(request: gr.Request):
        job_id = running.get(request.session_hash)
        if job_id is None or not modeling.cancel(ws, job_id):
            return {ui.notice: "No cross-validation is running."}
        return {ui.notice: "Cancelling the cross-validation (it stops within one training step)."}

    def show_detail(comp, method):
        if comp is None or method not in getattr(comp, "results", {}):
            return gr.skip(), gr.skip()
        return details(comp, method)

    def use_best(comp):
        best = getattr(comp, "best", None)
        if not best:
            return {ui.notice: "Run a cross-validation first."}
        return {ui.method: best, ui.tabs: gr.Tabs(selected="train"),
                ui.notice: f"The Train tab now uses **{method_label(best)}**, the best on your examples."}

    ui.eval_btn.click(check, [ui.project, ui.eval_methods, ui.owner], ui.eval_outs, api_visibility="private").success(
        evaluate, [ui.project, ui.eval_methods, ui.backbone, ui.checkpoint, ui.owner, *adv],
        [*ui.eval_outs, ui.eval_progress, ui.notice], api_name="evaluate", show_progress="hidden")
    ui.eval_cancel_btn.click(cancel, None, [ui.notice], api_name="cancel_evaluation", concurrency_limit=None)
    ui.eval_detail.input(show_detail, [ui.eval_state, ui.eval_detail], [ui.per_class_plot, ui.confusion_plot],
                         api_visibility="private")
    ui.use_best_btn.click(use_best, [ui.eval_state], [ui.method, ui.tabs, ui.notice], api_name="use_best")
