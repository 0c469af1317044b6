"""The Gradio app starts and answers through its named API endpoints."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_studio import shapes


@pytest.fixture(scope="module")
def running_app(tmp_path_factory):
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.service import Studio
    from fewshot_studio.ui.app import build_app

    demo = build_app(Studio(BackboneSpec(name="tiny", pretrained=None, device="cpu")))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


def test_zero_shot_prediction_endpoint(running_app, tmp_path):
    from gradio_client import Client, handle_file

    img = tmp_path / "star.png"
    shapes.render(shapes.ShapeSpec("yellow", "star"), np.random.default_rng(3), 96).save(img)
    client = Client(running_app.local_url, verbose=False)
    out = client.predict("red circle, yellow star, blue square", handle_file(str(img)), api_name="/predict")
    assert out["label"] == "yellow star"


def test_status_banner_names_backbone_and_device():
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.service import Studio

    line = Studio(BackboneSpec(name="tiny", pretrained=None, device="cpu")).status_line()
    assert "tiny" in line and "CPU" in line
    bad = Studio(BackboneSpec(name="ViT-B-32", checkpoint="/no/such/file.pt", device="cpu")).status_line()
    assert "unavailable" in bad and "does not exist" in bad
