"""The Few-Shot Studio page. Thin handlers: every decision lives in the core package."""
from __future__ import annotations

import gradio as gr

from ..backbone import BackboneSpec, load_backbone
from ..errors import FewShotError
from ..service import Studio


def build_app(studio: Studio | None = None) -> gr.Blocks:
    studio = studio or Studio()
    with gr.Blocks(title="Few-Shot Studio") as demo:
        gr.Markdown("# Few-Shot Studio\nName a few classes, show an image, get a prediction.")
        banner = gr.Markdown(studio.status_line())
        with gr.Row():
            classes = gr.Textbox(label="Classes (comma separated)", value="red circle, blue square, green triangle")
            image = gr.Image(label="Image", type="pil")
        go = gr.Button("Predict (zero-shot)", variant="primary")
        out = gr.Label(label="Prediction", num_top_classes=5)

        def predict(names: str, img):
            try:
                return studio.zero_shot(names, img)
            except FewShotError as e:
                raise gr.Error(str(e))

        go.click(predict, [classes, image], out, api_name="predict")
        demo.load(studio.status_line, None, banner)
    return demo
