"""Header (backbone and device banner) and the project bar: create, open, rename, delete,
load an example; the last project reopens (remembered by the browser)."""
from __future__ import annotations

import secrets

import gradio as gr

from ..errors import FewShotError
from ..app import modeling, projects
from ..app.projects import EXAMPLES
from . import presenters
from .presenters import md
from .common import UI, friendly, who


def build_header(ui: UI) -> None:
    with gr.Row(elem_id="fs-header"):
        gr.HTML("<h1>Few-Shot Studio</h1><p class='fs-tagline'>Name a few classes, drop a few images "
                "in each, train an adapter on a frozen CLIP, label the rest.</p>")
        ui.banner = gr.Markdown("Loading the backbone…", elem_id="status-banner")


def build_bar(ui: UI) -> None:
    with gr.Row(elem_classes="fs-inline fs-bar-row", variant="panel"):
        ui.project_dd = gr.Dropdown(label="Project", choices=[], value=None, scale=3, elem_id="project-select",
                                    info="Your projects, most recent first.")
        ui.new_project = gr.Textbox(label="New project", placeholder="Name, then press Create", scale=2,
                                    elem_id="new-project-name")
        ui.create_btn = gr.Button("Create", scale=1, elem_id="create-project")
        ui.example_dd = gr.Dropdown(label="Example project", scale=3, elem_id="example-select",
                                    choices=[(e["title"], k) for k, e in EXAMPLES.items()], value="shapes",
                                    info="Coloured shapes works offline with tiny; textile needs a real CLIP.")
        ui.example_btn = gr.Button("Load example", scale=1, variant="secondary", elem_id="load-example")
        ui.example_copy = gr.State(None)  # the example whose existing copy was just opened
    with gr.Accordion("Rename, share or delete this project", open=False):
        with gr.Row(elem_classes="fs-inline"):
            ui.rename_project_box = gr.Textbox(label="Project name", scale=3, elem_id="rename-project-name")
            ui.rename_project_btn = gr.Button("Rename", scale=1, elem_id="rename-project")
            ui.delete_project_btn = gr.Button("Delete project…", variant="stop", scale=1, elem_id="delete-project")
            ui.confirm_delete_btn = gr.Button("Yes, delete it and all its images and models", variant="stop",
                                              visible=False, scale=2, elem_id="confirm-delete-project")
        with gr.Row(elem_classes="fs-inline"):
            ui.share_link = gr.Textbox(label="Link to this project", interactive=False, scale=4, buttons=["copy"],
                                       elem_id="share-link", placeholder="press Share link",
                                       info="Whoever opens it sees this project next to their own and can label "
                                            "it; only you can rename, delete, renew or stop sharing it.")
            ui.share_btn = gr.Button("Share link", scale=1, elem_id="share-project")
            ui.renew_link_btn = gr.Button("New link (the old one stops working)", scale=1, elem_id="renew-link")
            ui.stop_sharing_btn = gr.Button("Stop sharing (who joined loses access)", scale=1, variant="stop",
                                            elem_id="stop-sharing")
            ui.share_token = gr.Textbox(visible=False)
    ui.model_dd = gr.Dropdown(label="Model in use (graph, predictions, labeling, retraining and export)",
                              choices=[], value=None, elem_id="model-select",
                              info="Every model of this project, newest first: method, backbone, what its "
                                   "training measured and when. A new training becomes the one in use.")
    ui.notice = gr.Markdown("", elem_id="notice")

    def view(pid, owner):
        mine = projects.list_projects(ui.ws, owner)
        name = next((p.name for p in mine if p.id == pid), "")
        return {ui.project_dd: gr.Dropdown(choices=[(p.name, p.id) for p in mine], value=pid),
                ui.rename_project_box: name, ui.confirm_delete_btn: gr.Button(visible=False), ui.share_link: ""}

    def model_view(pid, owner):
        if pid is None:
            return {ui.model_dd: gr.Dropdown(choices=[], value=None)}
        choices, current = presenters.model_choices(ui.scope(pid, owner))
        return {ui.model_dd: gr.Dropdown(choices=choices, value=current)}

    ui.add_view(view, [ui.project_dd, ui.rename_project_box, ui.confirm_delete_btn, ui.share_link])
    ui.add_view(model_view, [ui.model_dd], model=True)


def wire(ui: UI) -> None:
    """Project events; registered after every tab so they can refresh all of them."""
    ws = ui.ws
    outs = [ui.notice, ui.project, *ui.view_outputs]

    def show(pid, owner, message=""):
        missing = presenters.missing_notice(ui.scope(pid, owner)) if pid is not None else ""
        return {ui.notice: " ".join(t for t in (message, missing) if t), ui.project: pid,
                **ui.project_views(pid, owner)}

    @friendly
    def create(name, owner, request: gr.Request):
        owner = who(owner, request)
        p = projects.create_project(ws, name or "", owner)
        return {**show(p.id, owner, f"Created project **{md(p.name)}**. Add classes below."), ui.new_project: ""}

    @friendly
    def open_project(pid, owner, request: gr.Request):
        owner = who(owner, request)
        p = ui.scope(pid, owner).project
        return show(p.id, owner, f"Opened **{md(p.name)}**.")

    @friendly
    def load_example(name, opened, owner, request: gr.Request):
        owner = who(owner, request)
        name = name or "shapes"
        have = projects.example_project(ws, name, owner)
        if have is not None and opened != name:  # a second press makes the fresh copy
            return {**show(have.id, owner, f"Opened your copy of the example, **{md(have.name)}**. Press *Load example* "
                                           "again for a fresh copy."), ui.example_copy: name}
        p = projects.load_example(ws, name, owner)
        return {**show(p.id, owner, f"Loaded the example project **{md(p.name)}**: its classes and images are below, "
                                    "and its unlabeled pool waits in Predict & label."), ui.example_copy: None}

    @friendly
    def use_model(pid, model_id, owner, request: gr.Request):
        owner = who(owner, request)
        m = modeling.set_current_model(ui.scope(pid, owner), model_id)
        return {ui.notice: f"The graph, predictions, labeling, retraining and export now use model #{m.id}.",
                **ui.current_model_views(pid, owner)}

    @friendly
    def rename(pid, name, owner, request: gr.Request):
        owner = who(owner, request)
        p = projects.rename_project(ui.scope(pid, owner), name or "")
        return show(p.id, owner, f"Renamed the project to **{md(p.name)}**.")

    def ask_delete(pid):
        return gr.Button(visible=pid is not None)

    @friendly
    def delete(pid, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        projects.delete_project(scope)
        nxt = projects.last_project(ws, owner)
        name = scope.project.name
        return show(nxt.id if nxt else None, owner, f"Deleted **{md(name)}**.")

    ui.create_btn.click(create, [ui.new_project, ui.owner], outs + [ui.new_project], api_name="create_project")
    ui.new_project.submit(create, [ui.new_project, ui.owner], outs + [ui.new_project], api_visibility="private")
    ui.project_dd.input(open_project, [ui.project_dd, ui.owner], outs, api_name="open_project")
    ui.example_btn.click(load_example, [ui.example_dd, ui.example_copy, ui.owner], outs + [ui.example_copy],
                         api_name="load_example")
    ui.example_dd.input(lambda: None, None, ui.example_copy, api_visibility="private")
    ui.model_dd.input(use_model, [ui.project, ui.model_dd, ui.owner], [ui.notice, *ui.model_view_outputs],
                      api_name="use_model")
    ui.rename_project_btn.click(rename, [ui.project, ui.rename_project_box, ui.owner], outs,
                                api_name="rename_project")
    ui.delete_project_btn.click(ask_delete, [ui.project], ui.confirm_delete_btn, api_visibility="private")
    ui.confirm_delete_btn.click(delete, [ui.project, ui.owner], outs, api_name="delete_project")

    def share(renew: bool):
        @friendly
        def handler(pid, owner, request: gr.Request):
            owner = who(owner, request)
            scope = ui.scope(pid, owner)
            name = scope.project.name
            token = projects.project_link(scope, renew=renew)
            what = "A new link" if renew else "The link"
            return {ui.share_token: token,
                    ui.notice: f"{what} to **{md(name)}** is below{'; the old one no longer opens it' if renew else ''}."}
        return handler

    @friendly
    def stop_sharing(pid, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        n = projects.stop_sharing(scope)
        joined = (f"the {n} session{'s' if n != 1 else ''} that joined through it no longer see{'s' if n == 1 else ''} it"
                  if n else "nobody had joined through it")
        return {ui.share_token: "", ui.share_link: "",
                ui.notice: f"Stopped sharing **{md(scope.project.name)}**: its link no longer opens it, and {joined}."}

    ui.stop_sharing_btn.click(stop_sharing, [ui.project, ui.owner], [ui.share_token, ui.share_link, ui.notice],
                              api_name="stop_sharing")

    # the page knows its own address (behind a proxy or in a Space, the server may not)
    to_link = ("(t) => t ? window.location.origin + window.location.pathname + '?project=' + "
               "encodeURIComponent(t) : ''")
    for btn, renew, api in ((ui.share_btn, False, "share_project"), (ui.renew_link_btn, True, "renew_project_link")):
        btn.click(share(renew), [ui.project, ui.owner], [ui.share_token, ui.notice], api_name=api).then(
            None, [ui.share_token], [ui.share_link], js=to_link, api_visibility="private")


def wire_session(ui: UI, demo: gr.Blocks, resume_outputs: list, resume) -> None:
    """On page load: restore the owner token and reopen the last project (remembered by the
    browser, else the most recent one); remember the project whenever it changes."""
    ws = ui.ws

    def restore(remembered, request: gr.Request):
        remembered = remembered if isinstance(remembered, dict) else {}
        owner = remembered.get("owner") or secrets.token_urlsafe(16)
        preferred, notice = remembered.get("project"), ""
        link = request.query_params.get("project") if request is not None else None
        if link:  # the page was opened through a project link (?project=<token>)
            try:
                shared = projects.open_link(ws, link, owner)
                preferred, notice = shared.id, f"Opened **{md(shared.name)}** from its link."
            except FewShotError as e:
                notice = str(e)
        p = projects.last_project(ws, owner, preferred)
        pid = p.id if p else None
        lost = modeling.interrupted_training(ws.scope(pid, owner)) if pid is not None and not notice else None
        if lost is not None:
            notice = ("The app stopped before this project's last training started, so it did not run; "
                      "press Train to run it again." if modeling.never_started(lost) else
                      "The app stopped while this project's last training was running, so it was not saved; "
                      "press Train to run it again.")
        if pid is not None:
            notice = " ".join(t for t in (notice, presenters.missing_notice(ws.scope(pid, owner))) if t)
        if ws.storage_notice:  # the database was damaged and set aside when the app started
            notice = " ".join(t for t in (f"⚠️ {md(ws.storage_notice)}", notice) if t)
        out = {ui.owner: owner, ui.project: pid, **ui.project_views(pid, owner),
               ui.remembered: {"owner": owner, "project": pid}, ui.notice: notice}
        out.update(resume(pid))
        return out

    def banner():
        # separate from restore: loading the backbone may take a while (a download, the first time)
        return presenters.backbone_status(ws)[1]

    demo.load(restore, [ui.remembered], [ui.owner, ui.project, ui.remembered, ui.notice, *ui.view_outputs,
                                         *resume_outputs],
              api_visibility="private", concurrency_limit=None)
    demo.load(banner, None, ui.banner, api_visibility="private", concurrency_limit=None)

    def remember(pid, owner, remembered):
        remembered = dict(remembered) if isinstance(remembered, dict) else {}
        if owner:
            remembered["owner"] = owner
        remembered["project"] = pid
        return remembered

    ui.project.change(remember, [ui.project, ui.owner, ui.remembered], ui.remembered, api_visibility="private")
