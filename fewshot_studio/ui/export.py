"""Export and import: labels (CSV, JSON), the labeled set as an ImageFolder, Hugging Face
imagefolder or FiftyOne zip, every image as Label Studio tasks, the trained model as a zip
(safetensors + config.json + model card) or as ONNX; import a model zip or Label Studio labels."""
from __future__ import annotations

import gradio as gr

from ..errors import DataError, FewShotError
from ..app import exports
from ..jobs import CANCELLED, FAILED
from . import presenters
from .common import UI, consumed, follow, friendly, need_project, progress_html, who
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
            with gr.Row():
                ui.export_hf_btn = gr.Button("Hugging Face imagefolder", elem_id="export-hf-btn")
                ui.export_fiftyone_btn = gr.Button("FiftyOne classification", elem_id="export-fiftyone-btn")
                ui.export_ls_btn = gr.Button("Label Studio tasks", elem_id="export-ls-btn")
                ui.export_onnx_btn = gr.Button("Model as ONNX", elem_id="export-onnx-btn")
            ui.export_progress = gr.HTML(progress_html(None, idle=""), elem_id="export-progress")
            ui.export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
            ui.export_served = gr.State(None)  # Gradio's copy of the session's last export (to delete)
            gr.Markdown("---\n**Import a model** exported by Few-Shot Studio (a zip with config.json and "
                        "model.safetensors; its classes must be this project's classes).")
            ui.import_file = gr.File(label="Model zip", file_types=[".zip"], height=110, elem_id="import-model-file")
            ui.import_btn = gr.Button("Import model", elem_id="import-model-btn")
            gr.Markdown("---\n**Import labels from Label Studio**: its JSON export of a classification project; "
                        "images are matched to this project's by content (tasks exported here) or file name.")
            ui.import_ls_file = gr.File(label="Label Studio JSON", file_types=[".json"], height=110,
                                        elem_id="import-ls-file")
            ui.import_ls_btn = gr.Button("Import labels", elem_id="import-ls-btn")
        with gr.Column(scale=3):
            ui.usage = gr.Code(label="Use the exported model in Python", language="python", interactive=False,
                               value="# Export a trained model to see how to use it.", elem_id="usage-snippet")

    ui.add_view(lambda pid, owner: {ui.export_file: None}, [ui.export_file])


#: the dataset formats of one click: button kind -> (app function, what the notice says)
FORMATS = {"hf": (exports.export_hf_imagefolder, "the labeled set as a Hugging Face imagefolder"),
           "fiftyone": (exports.export_fiftyone, "the labeled set in FiftyOne's classification layout"),
           "label-studio": (exports.export_label_studio, "every image as Label Studio tasks")}


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
            elif kind in FORMATS:
                make, what = FORMATS[kind]
                path = make(scope)
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

    @friendly
    def export_onnx(pid, served, owner, request: gr.Request):
        """The ONNX export runs as a job (seconds to a minute of tracing): its bar until it ends."""
        scope = ui.scope(need_project(pid), who(owner, request))
        discard([served])
        state = yield from follow(ui.ws, exports.start_onnx_export(scope), ui.export_progress)
        bar = {ui.export_progress: progress_html(state)}
        if state.status in (FAILED, CANCELLED):
            yield bar
            raise FewShotError(state.message or "The ONNX export was cancelled.")
        path = state.result
        yield {**bar, ui.export_file: str(path), ui.export_served: served_copy(path),
               ui.notice: "Exported the model as ONNX (input 'pixels', output 'probs'; the classes and "
                          "preprocessing are in its metadata): download it below."}

    outs = [ui.notice, ui.export_file, ui.export_served]
    ins = [ui.project, ui.export_served, ui.owner]
    ui.export_csv_btn.click(exporter("csv"), ins, outs, api_name="export_labels_csv")
    ui.export_json_btn.click(exporter("json"), ins, outs, api_name="export_labels_json")
    ui.export_folder_btn.click(exporter("imagefolder"), ins, outs, api_name="export_imagefolder")
    ui.export_model_btn.click(exporter("model"), ins, outs + [ui.usage], api_name="export_model")
    ui.export_hf_btn.click(exporter("hf"), ins, outs, api_name="export_hf_imagefolder")
    ui.export_fiftyone_btn.click(exporter("fiftyone"), ins, outs, api_name="export_fiftyone")
    ui.export_ls_btn.click(exporter("label-studio"), ins, outs, api_name="export_label_studio")
    ui.export_onnx_btn.click(export_onnx, ins, outs + [ui.export_progress], api_name="export_onnx",
                             show_progress="hidden")

    @friendly
    def import_labels(pid, file, owner, request: gr.Request):
        with consumed(file) as paths:
            if not paths:
                raise DataError("Choose a Label Studio JSON export to import.")
            result = exports.import_label_studio(ui.scope(pid, who(owner, request)), paths[0])
        return {ui.notice: presenters.label_import(result), ui.import_ls_file: None}

    ui.import_ls_btn.click(import_labels, [ui.project, ui.import_ls_file, ui.owner], [ui.notice, ui.import_ls_file],
                           api_name="import_label_studio")

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
