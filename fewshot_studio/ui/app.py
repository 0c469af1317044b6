"""The Few-Shot Studio page, assembled from small builder modules. Thin handlers: each parses
its inputs, calls one use case of `fewshot_studio.app` and shows the result (ui/presenters.py).

    demo = build_app()                 # a Workspace from the environment (AppConfig.from_env())
    demo.queue().launch()              # serves the data dir's thumbnails and exports only
"""
from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from ..app import Workspace, library
from . import classes, evaluate, export, graph, insight, label, projects, station, train
from .common import CSS, POLL_SECONDS, UI, theme
from .uploads import UploadBudget, UploadBudgetMiddleware

DEFAULT_CONCURRENCY = 4
#: Gradio's delete_cache (every, age) in seconds: uploads no handler consumed and the copies of
#: outputs (thumbnails, exports) Gradio keeps for serving go once they are an hour old.
CACHE_SWEEP = (300, 3600)


class StudioBlocks(gr.Blocks):
    """gr.Blocks whose launch() defaults to the app's theme and CSS and serves exactly the
    workspace's thumbnail and export folders (whoever calls launch: app.py, a Space, a test)."""

    workspace: Workspace
    upload_budget: UploadBudget  # hosted mode's upload budget (tests may set a smaller one)
    status_sink: gr.components.Component | None = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("delete_cache", CACHE_SWEEP)
        super().__init__(*args, **kwargs)
        self.upload_budget = UploadBudget()
        # One way to report a user error: the handler raises gr.Error (a toast with its one
        # sentence, and an error for API clients), and its pending/error status goes to the
        # hidden sink instead of the outputs, so no component turns into an "Error" badge.
        # Events that show their own progress name another component (show_progress_on).
        # (Every listener registers through this config's set_event_trigger.)
        config = self.default_config
        register = config.set_event_trigger

        def set_event_trigger(targets, fn, inputs, outputs, *a, **kw):
            if fn is not None and kw.get("show_progress_on") is None and self.status_sink is not None:
                kw["show_progress_on"] = self.status_sink
            return register(targets, fn, inputs, outputs, *a, **kw)

        config.set_event_trigger = set_event_trigger

    def launch(self, *args, **kwargs):
        st = self.workspace
        st.thumbs_dir.mkdir(parents=True, exist_ok=True)
        library.forget_hash_thumbnails(st)  # the old layout was servable to whoever knew an image's hash
        st.exports_dir.mkdir(parents=True, exist_ok=True)
        allowed = [str(st.thumbs_dir.resolve()), str(st.exports_dir.resolve())]
        kwargs["allowed_paths"] = list(kwargs.get("allowed_paths") or []) + allowed
        kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)  # Gradio refuses bigger uploads with a message
        if st.hosted:  # a public server: a budget of upload bytes per visitor and in total
            app_kwargs = dict(kwargs.get("app_kwargs") or {})
            app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                        Middleware(UploadBudgetMiddleware, budget=self.upload_budget)]
            kwargs["app_kwargs"] = app_kwargs
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("js", page_script())  # the station's keys and grid, the Inspect map's events
        kwargs.setdefault("theme", theme())
        kwargs.setdefault("footer_links", ["api", "gradio"])
        return super().launch(*args, **kwargs)

    def close(self, *args, **kwargs):
        # the server stops: the database file takes in the log now (the workspace may live on)
        ws = getattr(self, "workspace", None)
        if ws is not None:
            ws.store.checkpoint()
        return super().close(*args, **kwargs)

    def queue(self, *args, **kwargs):
        kwargs.setdefault("default_concurrency_limit", DEFAULT_CONCURRENCY)
        return super().queue(*args, **kwargs)


def page_script() -> str:
    """The page's scripts (station.js, insight.js) as the one function gr.Blocks.launch(js=...)
    runs on load."""
    return "() => {\n" + station.SCRIPT.read_text() + "\n" + insight.SCRIPT.read_text() + "\n}"


MAX_UPLOAD_BYTES = 512 * 2**20  # one uploaded file (a zip of many images included)


def build_app(workspace: Workspace | None = None) -> StudioBlocks:
    """The whole page. One Workspace serves every browser session; per-session state (owner
    token, current project, current job) lives in gr.State, and the browser remembers the
    last project (gr.BrowserState)."""
    ws = workspace or Workspace()
    ui = UI(ws)
    with StudioBlocks(title="Few-Shot Studio") as demo:
        demo.workspace = ws
        demo.status_sink = ui.sink = gr.HTML("", elem_classes="fs-sink", elem_id="status-sink")
        ui.owner = gr.State(None)
        ui.project = gr.State(None)
        ui.job = gr.State(None)
        # polls the session's jobs; outside the tabs, because a component in a tab that is not
        # shown is not mounted, and a timer there would stop ticking
        ui.timer = gr.Timer(POLL_SECONDS, active=False)
        ui.remembered = gr.BrowserState({"owner": None, "project": None}, storage_key="fewshot-studio",
                                        secret=ws.browser_secret())
        projects.build_header(ui)
        projects.build_bar(ui)
        with gr.Tabs(selected="classes", elem_id="tabs") as ui.tabs:
            with gr.Tab("1 · Classes & examples", id="classes", elem_id="tab-classes") as classes_tab:
                classes.build(ui)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train"):
                train.build(ui)
            with gr.Tab("3 · Knowledge graph", id="graph", elem_id="tab-graph") as graph_tab:
                graph.build(ui)
            with gr.Tab("4 · Evaluate", id="evaluate", elem_id="tab-evaluate"):
                evaluate.build(ui)
            with gr.Tab("5 · Predict & label", id="label", elem_id="tab-label") as label_tab:
                station.build(ui)  # the station first: it is where the labeling happens
                label.build(ui)
            with gr.Tab("6 · Export", id="export", elem_id="tab-export"):
                export.build(ui)
            with gr.Tab("7 · Inspect", id="inspect", elem_id="tab-inspect"):
                insight.build(ui)
        # events that reach across tabs
        train.wire(ui)
        evaluate.wire(ui)
        label.wire(ui)
        station.wire(ui)
        export.wire(ui)
        projects.wire(ui)
        fn, ins, outs = ui.graph_fn
        graph_tab.select(fn, ins, outs, api_visibility="private")
        classes_tab.select(ui.classes_tab_fn, [ui.project, ui.class_dd, ui.owner], ui.class_outputs,
                           api_visibility="private")
        label_tab.select(ui.label_tab_fn, [ui.project, ui.owner], [ui.correct_dd, ui.label_model_md],
                         api_visibility="private")
        fn, ins, outs = ui.station_tab_fn  # the model may have changed in another tab
        label_tab.select(fn, ins, outs, api_visibility="private", show_progress="hidden")
        resume_outputs, resume = train.resume(ui)
        projects.wire_session(ui, demo, resume_outputs, resume)
    demo.ui = ui
    return demo
