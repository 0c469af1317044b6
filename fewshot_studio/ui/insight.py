"""Inspect: the embedding map of every image (click a point to open it, lasso or box to select),
near-duplicate groups with "keep one", examples that may be in the wrong class and pool images
unlike every class (app/insight.py). gr.Plot does not send plotly's click and selection events
to Python, so insight.js writes the picked ids into a hidden textbox and presses a hidden button."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from .. import viz
from ..app import insight as app_insight
from ..app import library, station
from ..errors import FewShotError
from ..jobs import CANCELLED, FAILED
from . import presenters
from .common import UI, follow, friendly, need_project, progress_html, who
from .presenters import md

SCRIPT = Path(__file__).with_name("insight.js")
#: Hover thumbnails are made for maps up to this many points (about 2 ms each the first time).
HOVER_THUMBS_MAX = 2000


def _figure(result: app_insight.Insight):
    pts = result.points
    return viz.embedding_map_figure(
        [(p.x, p.y) for p in pts], [p.group or viz.UNPREDICTED_NAME for p in pts], [p.image_id for p in pts], [p.name for p in pts],
        [p.example for p in pts], [p.confidence for p in pts], [p.outlier for p in pts],
        title=f"Embedding map ({result.map_method.upper()}: {len(pts)} images; filled = examples, "
              "open = pool by predicted class, × = none of these classes?)")


def _summary(result: app_insight.Insight) -> str:
    lines = [f"**{len(result.duplicates)}** near-duplicate group{'s' if len(result.duplicates) != 1 else ''} "
             f"(cosine ≥ {result.threshold:g})"
             + (f", {result.leaks} of them across examples and pool (evaluation on those pool images is "
                "meaningless)" if result.leaks else "")
             + f" · **{len(result.label_issues)}** example{'s' if len(result.label_issues) != 1 else ''} "
             "that may be in the wrong class · "
             f"**{len(result.outliers)}** pool image{'s' if len(result.outliers) != 1 else ''} unlike every class"]
    if result.map_extended:
        lines.append(f"{result.map_extended} new image{'s' if result.map_extended != 1 else ''} placed on the "
                     "existing map.")
    if result.label_issues:
        lines.append("\n| example | given | suggested | confidence |\n|---|---|---|---|")
        lines += [f"| {md(e.name)} | {md(e.given)} | {md(e.suggested)} | {e.confidence:.0%} |"
                  for e in result.label_issues[:20]]
    for name, spread in result.wide_classes:
        lines.append(f"\nThe examples of **{md(name)}** are spread wider than the others' "
                     f"(mean distance to their centre {spread:.3f}): it may mix looks or hold wrong examples.")
    if result.outliers:
        names = {p.image_id: p.name for p in result.points}
        lines.append("\nNone of these classes? " + ", ".join(md(names[i]) for i, _ in result.outliers[:20]))
    return "\n".join(lines)


def _thumbs_html(scope, result: app_insight.Insight) -> str:
    if len(result.points) > HOVER_THUMBS_MAX:
        return '<div id="insight-thumbs" data-thumbs="{}"></div>'
    paths = presenters.thumbnails(scope, [p.image_id for p in result.points])
    data = json.dumps({str(i): presenters.file_url(p) for i, p in paths.items()})
    from html import escape

    return f'<div id="insight-thumbs" data-thumbs="{escape(data, quote=True)}"></div>'


def _selected_ids(text: str | None) -> list[int]:
    """'click:12' or 'select:12,13' (insight.js) or plain ids."""
    text = (text or "").strip()
    _, _, ids = text.rpartition(":")
    return presenters.parse_image_ids(ids)


def build(ui: UI) -> None:
    ws = ui.ws
    with gr.Row(elem_classes="fs-inline"):
        ui.insight_btn = gr.Button("Inspect the data", variant="primary", scale=1, elem_id="insight-run")
        ui.insight_progress = gr.HTML(progress_html(None, idle="Press Inspect to draw the map and look for "
                                                    "problems."), elem_id="insight-progress")
    ui.insight_info = gr.Markdown("", elem_id="insight-info")
    ui.insight_plot = gr.Plot(label="Every image of the project (click a point to open it; lasso or box to select)",
                              elem_id="insight-map")
    ui.insight_thumbs = gr.HTML('<div id="insight-thumbs" data-thumbs="{}"></div>', elem_id="insight-thumbs-box",
                                visible="hidden")
    ui.insight_sel = gr.Textbox("", visible="hidden", elem_id="insight-selection")
    # insight.js presses it after writing the selection (a hidden textbox's own events do not reach Python)
    ui.insight_pick = gr.Button("Open the selection", visible="hidden", elem_id="insight-pick")
    with gr.Row():
        with gr.Column(scale=2):
            ui.insight_image = gr.Image(label="Opened image", interactive=False, height=260, elem_id="insight-image")
            ui.insight_picked = gr.Markdown("Click a point, or lasso several.", elem_id="insight-picked")
        with gr.Column(scale=3):
            ui.insight_class = gr.Dropdown([], label="Class", elem_id="insight-class", allow_custom_value=False)
            with gr.Row():
                ui.insight_relabel = gr.Button("Label selected as this class", elem_id="insight-relabel")
                ui.insight_accept = gr.Button("Accept the predictions", elem_id="insight-accept")
                ui.insight_remove = gr.Button("Remove selected", variant="stop", elem_id="insight-remove")
            ui.insight_groups = gr.Dropdown([], label="Near-duplicate groups", elem_id="insight-groups")
            ui.insight_keep = gr.Button("Keep the first, remove the others", elem_id="insight-keep")
            ui.insight_done = gr.Markdown("", elem_id="insight-done")

    outs = [ui.insight_plot, ui.insight_info, ui.insight_thumbs, ui.insight_groups, ui.insight_class,
            ui.insight_progress]

    def empty():
        return {ui.insight_plot: None, ui.insight_info: "", ui.insight_groups: gr.update(choices=[], value=None),
                ui.insight_thumbs: '<div id="insight-thumbs" data-thumbs="{}"></div>',
                ui.insight_class: gr.update(choices=[], value=None),
                ui.insight_progress: progress_html(None, idle="Press Inspect to draw the map and look for problems.")}

    ui.add_view(lambda pid, owner: empty(), outs)

    @friendly
    def run(pid, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        job_id = app_insight.start(scope)
        state = yield from follow(ws, job_id, ui.insight_progress)
        bar = {ui.insight_progress: progress_html(state)}
        if state.status == CANCELLED:
            yield bar
            return
        if state.status == FAILED:
            yield bar
            raise FewShotError(state.message)
        result = state.result
        names = presenters.class_names(scope)
        groups = [(f"{k + 1}: " + ", ".join(n for _, n in g), ",".join(str(i) for i, _ in g))
                  for k, g in enumerate(result.duplicates)]
        yield {**bar, ui.insight_plot: _figure(result), ui.insight_info: _summary(result),
               ui.insight_thumbs: _thumbs_html(scope, result),
               ui.insight_groups: gr.update(choices=groups, value=groups[0][1] if groups else None),
               ui.insight_class: gr.update(choices=names, value=names[0] if names else None)}

    ui.insight_btn.click(run, [ui.project, ui.owner], outs, api_name="inspect",
                         show_progress_on=ui.insight_progress)

    @friendly
    def pick(pid, selection, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        ids = _selected_ids(selection)
        if not ids:
            return {ui.insight_picked: "Click a point, or lasso several.", ui.insight_image: None}
        if len(ids) > 1:
            return {ui.insight_picked: f"**{len(ids)} images selected**: label them, accept their predictions "
                                       "or remove them.", ui.insight_image: None}
        img = library.image(scope, ids[0])
        where = "example of **" + md(next((c.name for c in library.classes(scope) if c.id == img.class_id), "?")) \
            + "**" if img.class_id is not None else "in the pool"
        path = library.thumbnail(ws, img, library.PREVIEW_SIZE)
        return {ui.insight_picked: f"**{md(img.original_name)}** (#{img.id}), {where}", ui.insight_image: path}

    ui.insight_pick.click(pick, [ui.project, ui.insight_sel, ui.owner], [ui.insight_picked, ui.insight_image],
                         api_name="insight_pick", api_visibility="private")

    def acted(message: str) -> dict:
        return {ui.insight_done: message + " Press Inspect to redraw the map."}

    @friendly
    def relabel(pid, selection, class_name, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        ids = _selected_ids(selection)
        station.assign(scope, ids, class_name or None)
        return acted(f"Labeled {len(ids)} image{'s' if len(ids) != 1 else ''} as {md(class_name)}.")

    @friendly
    def accept(pid, selection, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        ids = _selected_ids(selection)
        a = station.assign(scope, ids, None)
        return acted(a.summary)

    @friendly
    def remove(pid, selection, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        ids = _selected_ids(selection)
        station.remove(scope, ids)
        return acted(f"Removed {len(ids)} image{'s' if len(ids) != 1 else ''} (undo in the station).")

    @friendly
    def keep(pid, group, owner, request: gr.Request):
        scope = ui.scope(need_project(pid), who(owner, request))
        ids = presenters.parse_image_ids((group or "").replace(",", " "))
        if not ids:
            raise FewShotError("Inspect the data first, then pick a near-duplicate group.")
        a = app_insight.keep_one(scope, ids, ids[0])
        return acted(a.summary if getattr(a, "summary", "") else f"Kept one of {len(ids)}.")

    ins = [ui.project, ui.insight_sel, ui.owner]
    ui.insight_relabel.click(relabel, [ui.project, ui.insight_sel, ui.insight_class, ui.owner], [ui.insight_done],
                             api_name="insight_relabel", api_visibility="private")
    # named: a private event still takes its function's name, and "accept" is the pool table's endpoint
    ui.insight_accept.click(accept, ins, [ui.insight_done], api_name="insight_accept", api_visibility="private")
    ui.insight_remove.click(remove, ins, [ui.insight_done], api_name="insight_remove", api_visibility="private")
    ui.insight_keep.click(keep, [ui.project, ui.insight_groups, ui.owner], [ui.insight_done],
                          api_name="insight_keep", api_visibility="private")
