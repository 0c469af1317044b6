"""Few-Shot Studio entry point: `python app.py` locally, unchanged as a Hugging Face Space.

Environment: FEWSHOT_STUDIO_BACKBONE (e.g. tiny), FEWSHOT_STUDIO_DATA, GRADIO_SERVER_NAME/PORT.
"""
from fewshot_studio.ui.app import build_app

demo = build_app()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=4, max_size=64).launch()
