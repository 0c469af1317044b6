"""Gradio UI: Blocks assembled from small builder functions; handlers only call the core."""
