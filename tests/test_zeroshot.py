"""Zero-shot CLIP behind the method interface."""
from __future__ import annotations

import threading

import pytest
import torch

from fewshot_studio import shapes
from fewshot_studio.data import SupportSet
from fewshot_studio.errors import Cancelled, DataError
from fewshot_studio.methods import load_model, make_method

from helpers import accuracy, make_task

REAL = {"red circle": "red circle", "blue square": "blue square", "green_triangle": "green triangle",
        "yellow star": "yellow star"}


def test_zero_shot_logits_are_scaled_cosines(tiny, extractor):
    support, test, labels = make_task(REAL, shots=0, test_per_class=5, seed=1)
    m = make_method("zeroshot", tiny, support.classnames).fit(support, extractor)
    f = extractor.image_features(test)[:, 0]
    t = extractor.class_text_features(support.classnames)
    assert torch.allclose(m.logits_from_features(f), tiny.logit_scale * f @ t.T)
    # '_' reads as a space: same weights as the spaced name
    assert torch.allclose(t[2], extractor.class_text_features(["green triangle"])[0])
    assert accuracy(m, test, labels, extractor) >= 0.75


def test_progress_save_load_and_graph(tiny, extractor, tmp_path):
    support, test, _ = make_task(REAL, shots=1, test_per_class=3, seed=2)
    seen = []
    m = make_method("zeroshot", tiny, support.classnames).fit(support, extractor, progress=seen.append)
    assert seen and seen[-1].step == seen[-1].total
    m.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    m2 = load_model(tmp_path / "m", backbone=tiny)
    assert torch.equal(m.predict_proba(test, extractor), m2.predict_proba(test, extractor))
    g = m2.knowledge_graph()
    assert g.classes == support.classnames and g.text_edges.shape == (4, 4) and g.visual_edges is None
    assert torch.allclose(torch.tensor(g.text_edges).diagonal(), torch.ones(4), atol=1e-5)


def test_description_changes_prompts(tiny, extractor):
    a = extractor.class_text_features(["thing"], ["it is red and round"])
    b = extractor.class_text_features(["thing"], None)
    assert not torch.allclose(a, b)


def test_bad_class_lists_are_one_sentence():
    with pytest.raises(DataError, match="at least one class"):
        SupportSet([])
    with pytest.raises(DataError, match="used twice"):
        SupportSet(["cat", "Cat "])
    with pytest.raises(DataError, match="blank"):
        SupportSet(["cat", "  "])


def test_cancel_before_start(tiny, extractor):
    ev = threading.Event()
    ev.set()
    support = SupportSet(list(shapes.CLASSES[:3]))
    m = make_method("zeroshot", tiny, support.classnames)
    before = m.text_weights.clone()
    with pytest.raises(Cancelled):
        from fewshot_studio.training import check_cancel
        m.fit(support, extractor, cancel=ev, progress=lambda p: check_cancel(ev))
    assert torch.equal(m.text_weights, before)
