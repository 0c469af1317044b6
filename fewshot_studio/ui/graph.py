"""Knowledge graph: the latest model's class network (textual / visual / both / fused), an
edge-weight threshold, a sortable edge table and the "looks alike, named differently" pairs."""
from __future__ import annotations

import gradio as gr

from .. import viz
from ..errors import DataError
from ..app import modeling
from ..methods.knowledge_graph import KnowledgeGraph
from . import presenters
from .presenters import md
from .common import UI, friendly, who

MODE_CHOICES = [("textual + visual", "both"), ("textual", "text"), ("visual", "visual"),
                ("fused (GraphAdapter's adapted classes)", "fused")]


def build(ui: UI) -> None:
    with gr.Row(elem_classes="fs-inline"):
        ui.graph_mode = gr.Radio(MODE_CHOICES, value="both", label="Sub-graph", scale=3, elem_id="graph-mode")
        ui.graph_threshold = gr.Slider(-1.0, 1.0, value=0.0, step=0.01, label="Edge threshold (cosine similarity)",
                                       scale=3, elem_id="graph-threshold")
        ui.graph_btn = gr.Button("Refresh", scale=1, elem_id="graph-refresh")
    ui.graph_info = gr.Markdown("", elem_id="graph-info")
    ui.graph_plot = gr.Plot(label="Class graph (hover for exact weights; node size = number of examples)",
                            elem_id="graph-plot")
    with gr.Row():
        with gr.Column(scale=3):
            ui.edge_sort = gr.Dropdown(viz.EDGE_SORTS, value=viz.DEFAULT_EDGE_SORT, elem_id="edge-sort",
                                       label="Sort edges by (numbers largest first, class names A–Z)")
            # Gradio 6's Dataframe sorts only through the ⋮ menu of a hovered header (a click
            # merely selects it), and only in the browser; the dropdown above sorts server-side.
            ui.edge_table = gr.Dataframe(headers=viz.EDGE_COLUMNS, value=[], interactive=False, elem_id="edge-table",
                                         label="Edges at or above the threshold (fused: GraphAdapter's adapted "
                                               "classes; a header's ⋮ menu also sorts)",
                                         max_height=380)
        with gr.Column(scale=2):
            ui.confusable_table = gr.Dataframe(
                headers=viz.CONFUSABLE_COLUMNS, value=[], interactive=False, elem_id="confusable-table",
                label=(f"Looks alike, named differently (visual similarity in the top quarter of pairs and "
                       f"≥ {KnowledgeGraph.CONFUSABLE_MIN_VISUAL:g}, and ≥ textual + {KnowledgeGraph.CONFUSABLE_GAP:g})"),
                max_height=380)

    outs = [ui.graph_plot, ui.edge_table, ui.confusable_table, ui.graph_info]

    def empty(message=""):
        return {ui.graph_plot: None, ui.edge_table: [], ui.confusable_table: [], ui.graph_info: message}

    ui.add_view(lambda pid, owner: empty(), outs)

    @friendly
    def graph(pid, mode, threshold, sort_by, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        try:
            kg = modeling.knowledge_graph(scope)
        except DataError as e:
            return empty(str(e))
        mode = mode or "both"
        threshold = float(threshold if threshold is not None else 0.0)
        # the figure highlights exactly these pairs (same kg, same threshold)
        pairs = viz.confusable_rows(kg, threshold)
        info = presenters.model_summary(scope)
        if pairs:
            a, b, t, v, _ = pairs[0]
            info += f" · most confusable pair: **{md(a)}** and **{md(b)}** (visual {v:.2f}, textual {t:.2f})"
        return {ui.graph_plot: viz.knowledge_graph_figure(kg, mode, threshold),
                ui.edge_table: viz.edge_rows(kg, threshold, sort_by or viz.DEFAULT_EDGE_SORT),
                ui.confusable_table: pairs, ui.graph_info: info}

    ins = [ui.project, ui.graph_mode, ui.graph_threshold, ui.edge_sort, ui.owner]
    ui.graph_btn.click(graph, ins, outs, api_name="graph")
    ui.graph_mode.change(graph, ins, outs, api_visibility="private")
    # .change, not .release: typing a number into the slider's box never fires .release until it
    # loses focus; always_last coalesces the stream of changes while dragging into one redraw
    ui.graph_threshold.change(graph, ins, outs, api_visibility="private", trigger_mode="always_last")
    ui.edge_sort.change(graph, ins, outs, api_visibility="private")
    ui.graph_fn = (graph, ins, outs)
