"""Export and import: labels (CSV, JSON), the labeled set as an ImageFolder zip, the trained
model as a zip (safetensors + config.json) with a Python usage snippet; import a model zip."""
from __future__ import annotations

import gradio as gr

from ..errors import DataError
from ..app import exports
from . import presenters
from .common import UI, consumed, friendly, who
from .uploads import discard, served_copy


def build(ui: UI) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("**Labels** of every image (yours, accepted and corrected) and the **model**.")
            with gr.Row():
                ui.export_csv_btn = gr.Button("Labels CSV", elem_id="export-csv-btn")
                ui.export_json_btn = gr.Button("Labels JSON", elem_id="export-json-btn")
            with gr.Row():
                ui.export_folder_btn = gr.Button("Labeled set (ImageFolder zip)", elem_id="export-imagefolder-btn")
                ui.export_model_btn = gr.Button("Trained model (zip)", variant="primary", elem_id="export-model-btn")
            ui.export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
            ui.export_served = gr.State(None)  # Gradio's copy of the session's last export (to delete)
            gr.Markdown("---\n**Import a model** exported by Few-Shot Studio (a zip with config.json and "
                        "model.safetensors; its classes must be this project's classes).")
            ui.import_file = gr.File(label="Model zip", file_types=[".zip"], height=110, elem_id="import-model-file")
            ui.import_btn = gr.Button("Import model", elem_id="import-model-btn")
        with gr.Column(scale=3):
            ui.usage = gr.Code(label="Use the exported model in Python", language="python", interactive=False,
                               value="# Export a trained model to see how to use it.", elem_id="usage-snippet")

    ui.add_view(lambda pid, owner: {ui.export_file: None}, [ui.export_file])


def wire(ui: UI) -> None:

    def exporter(kind):
        @friendly
        def run(pid, served, owner, request: gr.Request):
            scope = ui.scope(pid, who(owner, request))
            # the copy of this session's previous export that Gradio keeps for the download
            # goes: a visitor holds one export at a time (exports.write_export removes ours)
            discard([served])
            out = {}
            if kind == "csv":
                path, what = exports.export_labels_csv(scope), "the labels as CSV"
            elif kind == "json":
                path, what = exports.export_labels_json(scope), "the labels as JSON"
            elif kind == "imagefolder":
                folder = exports.export_imagefolder(scope)
                path, what = folder.path, "the labeled images as class folders"
                return {ui.export_file: str(path), ui.export_served: served_copy(path),
                        ui.notice: f"Exported {what}: download it below.{presenters.renamed_folders(folder)}"}
            else:
                path, what = exports.export_model(scope), "the trained model"
                out[ui.usage] = presenters.usage(scope)
            return {ui.export_file: str(path), ui.export_served: served_copy(path),
                    ui.notice: f"Exported {what}: download it below.", **out}
        return run

    outs = [ui.notice, ui.export_file, ui.export_served]
    ins = [ui.project, ui.export_served, ui.owner]
    ui.export_csv_btn.click(exporter("csv"), ins, outs, api_name="export_labels_csv")
    ui.export_json_btn.click(exporter("json"), ins, outs, api_name="export_labels_json")
    ui.export_folder_btn.click(exporter("imagefolder"), ins, outs, api_name="export_imagefolder")
    ui.export_model_btn.click(exporter("model"), ins, outs + [ui.usage], api_name="export_model")

    @friendly
    def import_model(pid, file, owner, request: gr.Request):
        owner = who(owner, request)
        with consumed(file) as paths:
            if not paths:
                raise DataError("Choose a model zip to import.")
            scope = ui.scope(pid, owner)
            info = exports.import_model(scope, paths[0])
        return {ui.notice: f"Imported the model as #{info.id}; it is now the model in use (the Model menu at "
                           "the top switches back).",
                ui.import_file: None, ui.usage: presenters.usage(scope), **ui.current_model_views(pid, owner)}

    ui.import_btn.click(import_model, [ui.project, ui.import_file, ui.owner],
                        [ui.notice, ui.import_file, ui.usage, *ui.model_view_outputs], api_name="import_model")
