"""Knowledge graph: the latest model's class network (textual / visual / both / fused), an
edge-weight threshold, a sortable edge table and the "looks alike, named differently" pairs."""
from __future__ import annotations

import gradio as gr

from .. import viz
from ..errors import DataError
from .common import UI, friendly, need_project, who

MODE_CHOICES = [("textual + visual", "both"), ("textual", "text"), ("visual", "visual"),
                ("fused (GraphAdapter's adapted classes)", "fused")]


def build(ui: UI) -> None:
    s = ui.studio
    with gr.Row(elem_classes="fs-inline"):
        ui.graph_mode = gr.Radio(MODE_CHOICES, value="both", label="Sub-graph", scale=3, elem_id="graph-mode")
        ui.graph_threshold = gr.Slider(-1.0, 1.0, value=0.0, step=0.01, label="Edge threshold (cosine similarity)",
                                       scale=3, elem_id="graph-threshold")
        ui.graph_btn = gr.Button("Refresh", scale=1, elem_id="graph-refresh")
    ui.graph_info = gr.Markdown("", elem_id="graph-info")
    ui.graph_plot = gr.Plot(label="Class graph (hover for exact weights; node size = number of examples)",
                            elem_id="graph-plot")
    with gr.Row():
        ui.edge_table = gr.Dataframe(headers=viz.EDGE_COLUMNS, value=[], interactive=False, elem_id="edge-table",
                                     label="Edges at or above the threshold (click a header to sort)",
                                     max_height=380, scale=3)
        ui.confusable_table = gr.Dataframe(headers=viz.CONFUSABLE_COLUMNS, value=[], interactive=False,
                                           label="Looks alike, named differently (visual ≫ textual similarity)",
                                           elem_id="confusable-table", max_height=380, scale=2)

    outs = [ui.graph_plot, ui.edge_table, ui.confusable_table, ui.graph_info]

    def empty(message=""):
        return {ui.graph_plot: None, ui.edge_table: [], ui.confusable_table: [], ui.graph_info: message}

    ui.add_view(lambda pid, owner: empty(), outs)

    @friendly
    def graph(pid, mode, threshold, owner, request: gr.Request):
        owner = who(owner, request)
        try:
            kg = s.knowledge_graph(need_project(pid), owner=owner)
        except DataError as e:
            return empty(str(e))
        mode = mode or "both"
        threshold = float(threshold if threshold is not None else 0.0)
        info = s.model_summary(pid, owner)
        # "looks alike": a clearly positive visual similarity, well above the textual one
        pairs = [r for r in viz.confusable_rows(kg) if r[3] >= max(threshold, 0.0) and r[4] >= viz.CONFUSABLE_GAP]
        if pairs:
            a, b = pairs[0][0], pairs[0][1]
            info += f" · most confusable pair: **{a}** and **{b}**"
        return {ui.graph_plot: viz.knowledge_graph_figure(kg, mode, threshold),
                ui.edge_table: viz.edge_rows(kg, threshold), ui.confusable_table: pairs, ui.graph_info: info}

    ins = [ui.project, ui.graph_mode, ui.graph_threshold, ui.owner]
    ui.graph_btn.click(graph, ins, outs, api_name="graph")
    ui.graph_mode.change(graph, ins, outs, api_visibility="private")
    ui.graph_threshold.release(graph, ins, outs, api_visibility="private")
    ui.graph_fn = (graph, ins, outs)
