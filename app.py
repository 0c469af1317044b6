"""Few-Shot Studio entry point: `python app.py` locally, and unchanged as a Hugging Face Space.

Environment: FEWSHOT_STUDIO_BACKBONE (e.g. tiny), FEWSHOT_STUDIO_DATA (where projects live),
FEWSHOT_STUDIO_HOSTED=1 (each browser sees only its own projects; the default in a Hugging Face
Space), and Gradio's own
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""
import signal
import sys

from fewshot_studio.ui.app import build_app

demo = build_app()

if __name__ == "__main__":
    # a Space (docker stop) ends the app with SIGTERM: exit normally, so the workspace is
    # closed at exit and the project database file takes in its write-ahead log
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.queue(max_size=64).launch()
