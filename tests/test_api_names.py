"""The page's public endpoints keep the names they were given. Gradio gives every event an
api_name, a private one too (its function's name), and renames a later clash `name_1`: a
private "accept" added in another tab once turned the pool table's public /accept into
/accept_1 and broke every client of the API."""
from __future__ import annotations

import re

from fewshot_studio.app import Workspace
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.ui.app import build_app

# what the README's Python API and the app tests call by name
DOCUMENTED = {"/create_project", "/add_class", "/add_images", "/add_pool", "/train", "/training_status",
              "/predict", "/label_pool", "/accept", "/correct", "/accept_confident", "/retrain", "/graph",
              "/export_model", "/export_onnx", "/export_labels_csv", "/export_hf_imagefolder",
              "/export_fiftyone", "/export_label_studio", "/import_label_studio", "/import_predictions",
              "/inspect", "/station_accept", "/station_undo"}


def test_public_endpoints_keep_their_names(tmp_path, tiny):
    ws = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"), loader=lambda spec: tiny)
    try:
        names = set(build_app(ws).get_api_info()["named_endpoints"])
    finally:
        ws.close()
    assert DOCUMENTED <= names, sorted(DOCUMENTED - names)
    assert not [n for n in names if re.search(r"_\d+$", n)], sorted(names)
