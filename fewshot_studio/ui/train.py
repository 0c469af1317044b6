"""Train: method and backbone, advanced settings (papers' defaults), Train / Cancel, a live
progress bar and loss/accuracy curve polled by a timer while the job runs in the background."""
from __future__ import annotations

import time

import gradio as gr

from .. import shapes, viz
from ..app import library, modeling
from ..backbone import TINY
from ..jobs import DONE, FINISHED, TRAIN
from ..methods import catalog
from . import presenters
from .common import UI, friendly, need_project, progress_html, status_bar, who


def setting_number(value, label: str, precision: int | None, bounds: tuple) -> gr.Number:
    """A method setting's number box: its minimum/maximum (the catalog's bounds) guide the
    browser's input, and the server's check is the catalog's one rule (`coerce_settings`), whose
    sentence names the method and the setting, instead of Number's own range message. (An
    instance override, not a subclass: Gradio writes a .pyi file next to every Component
    subclass's module.)"""
    lo, hi = bounds
    box = gr.Number(value=value, label=label, precision=precision, minimum=lo, maximum=hi)

    def preprocess(payload):
        return None if payload is None else box.round_to_precision(payload, box.precision)

    box.preprocess = preprocess
    return box


def build(ui: UI) -> None:
    ws = ui.ws
    ui.adv = []  # (method, key, component), in input order
    with gr.Row():
        with gr.Column(scale=2):
            ui.method = gr.Radio(presenters.method_choices(with_auto=True), value=catalog.DEFAULT_CHOICE,
                                 label="Method", elem_id="method")
            ui.method_note = gr.Markdown(catalog.summary(catalog.DEFAULT_CHOICE), elem_classes="fs-hint")
            ui.backbone = gr.Dropdown(presenters.backbone_choices(ws), value=presenters.default_backbone_value(ws),
                                      label="Backbone", allow_custom_value=True, elem_id="backbone",
                                      info=("One of the backbones this public app offers; tiny (offline) only "
                                            "knows coloured shapes." if ws.hosted else
                                            "An open_clip model/pretrained tag, or tiny (offline; it only knows "
                                            "coloured shapes)."))
            # a public app never reads a path a visitor names (Workspace.check_backbone refuses it too)
            ui.checkpoint = gr.Textbox(label="Local checkpoint (optional)", elem_id="checkpoint",
                                       placeholder="/path/to/weights.safetensors or an open_clip folder",
                                       info="For offline machines: used instead of downloading the weights.",
                                       visible=not ws.hosted)
            with gr.Accordion("Advanced settings (the papers' defaults)", open=False, elem_id="advanced"):
                ui.adv_groups = {}
                for m in catalog.choices():
                    with gr.Group(visible=m == catalog.DEFAULT_CHOICE) as grp:
                        defaults = catalog.settings(m)
                        limits = catalog.bounds(m)
                        options = catalog.setting_choices(m)
                        keys = list(defaults)
                        for i in range(0, len(keys), 3):
                            with gr.Row():
                                for k in keys[i:i + 3]:
                                    v = defaults[k]
                                    if isinstance(v, bool):
                                        c = gr.Checkbox(value=v, label=presenters.label_for(m, k))
                                    elif k in options:  # a text setting with fixed values (MMA's recipe)
                                        c = gr.Dropdown(list(options[k]), value=v, label=presenters.label_for(m, k))
                                    elif v is None:  # "auto": a blank box (a Number cannot be blank)
                                        c = gr.Textbox(value="", label=presenters.label_for(m, k), placeholder="auto")
                                    else:
                                        c = setting_number(v, presenters.label_for(m, k),
                                                           0 if isinstance(v, int) else None,
                                                           limits.get(k, (None, None)))
                                    ui.adv.append((m, k, c))
                    ui.adv_groups[m] = grp
            with gr.Row():
                ui.train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
                ui.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
        with gr.Column(scale=3, elem_id="train-right"):
            ui.progress = gr.HTML(progress_html(None), elem_id="train-progress")
            ui.curve = gr.Plot(viz.training_curve_figure([]), label="Training curve", elem_id="train-curve")
            ui.model_md = gr.Markdown("", elem_id="model-summary")

    def view(pid, owner):
        if pid is None:
            return {ui.model_md: "", ui.curve: viz.training_curve_figure([]), ui.progress: progress_html(None)}
        scope = ui.scope(pid, owner)
        empty = ("The model in use trains no steps, so it has no curve." if modeling.current_model_info(scope)
                 else "No model yet: press Train.")
        return {ui.model_md: presenters.model_summary(scope), ui.progress: idle_progress(scope),
                ui.curve: viz.training_curve_figure(modeling.model_history(scope), "Current model's training",
                                                    empty)}

    ui.add_view(view, [ui.model_md, ui.curve, ui.progress], model=True)

    def on_method(m):
        return {ui.method_note: catalog.summary(m) if m in catalog.choices() else "",
                **{g: gr.Group(visible=k == m) for k, g in ui.adv_groups.items()}}

    ui.method.change(on_method, ui.method, [ui.method_note, *ui.adv_groups.values()], api_visibility="private")


def settings_from(ui: UI, values) -> dict[str, dict]:
    """{method: coerced settings} from the advanced inputs' values (in ui.adv order)."""
    raw: dict[str, dict] = {}
    for (m, k, _), v in zip(ui.adv, values):
        raw.setdefault(m, {})[k] = v
    return {m: catalog.coerce_settings(m, d) for m, d in raw.items()}


def idle_progress(scope) -> str:
    """The Train tab's bar when no job of this session runs: idle, or, when the app stopped
    while the project's last training ran, a failed bar that says so (the job is gone)."""
    job = modeling.interrupted_training(scope)
    if job is None:
        return progress_html(None)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
    what = (f"the app stopped before the training queued at {when} could start, so it did not run. "
            if modeling.never_started(job) else
            f"the app stopped while the training started at {when} was running, so it was not saved. ")
    return status_bar("interrupted", 0, "Interrupted:", what + "Press Train to run it again.")


def shapes_only_warning(scope, spec) -> str:
    """A hint when `tiny` (which only knows coloured shapes) is asked to learn other classes."""
    if spec.name != TINY:
        return ""
    words = {w for c in shapes.CLASSES for w in c.split()}
    names = [c.name for c in library.classes(scope)]
    if all(any(w in words for w in n.casefold().replace("_", " ").split()) for n in names):
        return ""
    return (" Note: `tiny` only knows coloured shapes, so it cannot tell these classes apart well; "
            "for photos pick a real CLIP backbone (e.g. ViT-B-32 / openai).")


def start_outputs(ui: UI, job_id: str, notice: str) -> dict:
    st = modeling.job(ui.ws, job_id)
    return {ui.notice: notice, ui.job: {"id": job_id, "seen": -1, "status": st.status},
            ui.timer: gr.Timer(active=True), ui.progress: progress_html(st),
            ui.label_progress: progress_html(st),
            ui.curve: viz.training_curve_figure([], "Training: loss and train accuracy")}


def wire(ui: UI) -> None:
    """Train, cancel and poll (registered after the label tab, which shows the progress too)."""
    ws = ui.ws
    adv = [c for _, _, c in ui.adv]
    outs = [ui.notice, ui.job, ui.timer, ui.progress, ui.label_progress, ui.curve, ui.banner]

    @friendly
    def train(pid, method, backbone, checkpoint, owner, request: gr.Request, *values):
        owner = who(owner, request)
        pid = need_project(pid)
        settings = settings_from(ui, values).get(method, {})
        spec = modeling.backbone_spec(ws, backbone, None, checkpoint)
        scope = ui.scope(pid, owner)
        job_id = modeling.start_training(scope, method, spec, settings)
        what = ("Auto: comparing methods on your examples, then training the best,"
                if method == catalog.AUTO else f"Training {presenters.method_label(method)}")
        notice = f"{what} on `{spec.label}`: the page stays usable meanwhile.{shapes_only_warning(scope, spec)}"
        if method == "mma" and ws.backbone(spec).device.type == "cpu":  # loaded by start_training
            notice += (" On a CPU MMA takes minutes: the progress bar says how long after its first step; "
                       "GDA or ProKeR give a model in seconds.")
        # the backbone just loaded: the banner names it (it may have said "unavailable" before)
        return start_outputs(ui, job_id, notice) | {ui.banner: presenters.backbone_status(ws, spec)[1]}

    @friendly
    def cancel(job, owner, request: gr.Request):
        """Cancel the shown training and every other training this session started."""
        n = modeling.cancel_owner_jobs(ws, who(owner, request), TRAIN, also=job["id"] if job else None)
        if not n:
            return {ui.notice: "No training is running."}
        what = "the job stops" if n == 1 else f"the {n} jobs stop"
        return {ui.notice: f"Cancelling: {what} within one step and the project stays as it was."}

    def poll(job, pid, owner, request: gr.Request):
        """One timer tick: progress, stage text and curve of the current job; stops the timer
        when it finishes."""
        if not job:
            return {ui.timer: gr.Timer(active=False)}
        try:
            st = modeling.job(ws, job["id"])
        except KeyError:
            return {ui.timer: gr.Timer(active=False), ui.job: None}
        bar = progress_html(st)
        out = {ui.progress: bar, ui.label_progress: bar}
        if st.model_id is not None and st.model_id != job.get("model") and st.status not in FINISHED:
            # a closed-form method's first model (plain views): shown at once while it refines
            job = {**job, "model": st.model_id}
            out[ui.job] = job
            if pid is not None and st.project_id == pid:
                try:
                    views = ui.current_model_views(pid, who(owner, request))
                    views.pop(ui.progress, None)
                    out.update(views)
                except Exception:  # noqa: BLE001 - a deleted project: nothing to show
                    pass
            out[ui.notice] = (f"Model #{st.model_id}, a first model on plain views, is ready to use; "
                              "refining it with augmented views in the background.")
        n = len(st.history)
        if n != job.get("seen") or st.status != job.get("status"):
            out[ui.curve] = viz.training_curve_figure(
                st.history, "Training: loss and train accuracy",
                "This method trains no steps, so it has no curve." if st.status == DONE else "Starting…")
            out[ui.job] = {**job, "seen": n, "status": st.status}
        if st.status in FINISHED:
            out[ui.timer] = gr.Timer(active=False)
            out[ui.job] = None
            owner = who(owner, request)
            if st.status == DONE and pid is not None and st.project_id == pid:
                try:  # everything that shows the current model: the new one
                    views = ui.current_model_views(pid, owner)
                    views.pop(ui.progress, None)  # the bar keeps this job's last words
                    out.update(views)
                except Exception:  # noqa: BLE001 - a deleted project: nothing to show
                    pass
            out[ui.notice] = ("Training finished: try the Knowledge graph, Evaluate or Predict & label tabs."
                              if st.status == DONE else st.message)
        return out

    train_inputs = [ui.project, ui.method, ui.backbone, ui.checkpoint, ui.owner, *adv]
    ui.train_btn.click(train, train_inputs, outs, api_name="train", concurrency_limit=None, show_progress="hidden")
    # the progress bar may be below the fold (Advanced settings open): bring it into view
    ui.train_btn.click(None, None, None, js=SCROLL_TO_PROGRESS, api_visibility="private")
    ui.cancel_btn.click(cancel, [ui.job, ui.owner], [ui.notice], api_name="cancel_training", concurrency_limit=None)
    poll_outs = [ui.notice, ui.job, ui.timer, ui.progress, ui.label_progress, ui.curve,
                 *[o for o in ui.model_view_outputs if o not in (ui.progress, ui.curve)]]
    ui.timer.tick(poll, [ui.job, ui.project, ui.owner], poll_outs,
                  api_name="training_status", show_progress="hidden", concurrency_limit=None,
                  trigger_mode="always_last")


SCROLL_TO_PROGRESS = ("() => { const e = document.querySelector('#train-progress');"
                      " if (e) e.scrollIntoView({behavior: 'smooth', block: 'center'}); }")


def resume(ui: UI):
    """Outputs and function for page load: keep showing a job still running for the project."""

    def fn(pid):
        st = modeling.active_job(ui.ws, pid)
        if st is None:  # (the project view already shows an interrupted training, if any)
            return {ui.job: None, ui.timer: gr.Timer(active=False)}
        return {ui.job: {"id": st.id, "seen": -1, "status": st.status}, ui.timer: gr.Timer(active=True),
                ui.progress: progress_html(st), ui.label_progress: progress_html(st)}

    return [ui.job, ui.timer, ui.progress, ui.label_progress], fn
