"""The labeling station's presenters (ui/presenters.py): what its buttons, counters, history,
review image and grid tiles say, and that user text in them stays text."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from fewshot_studio.ui import presenters as P


def item(image_id=7, name="a.png", label="red circle", confidence=0.87,
         top=(("red circle", 0.87), ("blue square", 0.1))):
    return SimpleNamespace(image_id=image_id, name=name, label=label, confidence=confidence, top=top)


@pytest.mark.parametrize("p, text", [(0.0, "0%"), (0.0004, "<0.1%"), (0.004, "0.4%"), (0.5, "50%"), (0.87, "87%"),
                                     (0.996, "99.6%"), (0.9996, ">99.9%"), (1.0, "100%")])
def test_percent_never_rounds_uncertainty_to_certainty(p, text):
    assert P.percent(p) == text


def test_station_classes_keep_class_order_up_to_nine_keys():
    names = ["a", "b", "c", "d"]
    shown = P.station_classes(names, (("c", 0.7), ("a", 0.2)))
    assert shown == [("a", 0.2), ("b", None), ("c", 0.7), ("d", None)]  # key k is always class k
    assert P.class_button_text(3, *shown[2]) == "3 · c · 70%"
    assert P.class_button_text(2, *shown[1]) == "2 · b"


def test_station_classes_beyond_nine_put_the_models_top_classes_first():
    names = [f"c{i}" for i in range(12)]
    shown = P.station_classes(names, (("c11", 0.6), ("c4", 0.3)))
    assert [n for n, _ in shown] == ["c11", "c4", "c0", "c1", "c2", "c3", "c5", "c6", "c7"]
    assert shown[0] == ("c11", 0.6) and len(shown) == 9


def test_counters_name_the_model_and_escape_class_names():
    c = SimpleNamespace(labeled_today=3, pool_left=40, per_class={"<b>x</b>": 5, "dog": 2}, cv_accuracy=0.815,
                        model_label="GDA #12 (refit 3 of #9)")
    html = P.counters_html(c, "GDA #11", note="Entropy order for now.")
    assert "<b>3</b> labeled today" in html and "<b>40</b> left in the pool" in html
    assert "&lt;b&gt;x&lt;/b&gt; 5" in html and "<b>x</b>" not in html
    assert "82%" in html and "predictions by <b>GDA #11</b>" in html  # the model on screen, not the newest
    assert "Entropy order for now." in html
    assert "not measured" in P.counters_html(SimpleNamespace(**{**c.__dict__, "cv_accuracy": None}))


def test_history_lists_actions_newest_first_with_their_age():
    acts = [SimpleNamespace(kind="undo", summary="Undid: labeled 1 image.", note="", created=100.0),
            SimpleNamespace(kind="correct", summary="Labeled 3 images as <cat>.", note="Refit.", created=40.0)]
    html = P.history_html(acts, now=100.4)
    rows = re.findall(r"<li data-kind=\"(\w+)\">(.*?)</li>", html)
    assert [k for k, _ in rows] == ["undo", "correct"]
    assert "just now" in rows[0][1] and "1 min ago" in rows[1][1] and "&lt;cat&gt;" in rows[1][1]
    assert "No labeling actions yet" in P.history_html([])


def test_review_strip_and_grid_carry_image_ids_and_escape_names():
    it = item(name='x" onerror="alert(1).png')
    review = P.review_html(it, "/data/thumbs/ab/c d.png", 4, 10)
    assert 'data-image-id="7"' in review and "5 of 10" in review
    assert 'src="gradio_api/file=/data/thumbs/ab/c%20d.png"' in review
    assert 'onerror="' not in review  # the name is an attribute value, never markup
    assert 'data-image-id=""' in P.review_html(None, None, 0, 0)
    items = [item(image_id=i) for i in (3, 9, 12)]
    thumbs = {3: "/t/3.png", 9: "/t/9.png"}  # 12's image went meanwhile: left out
    grid = P.grid_html(items, thumbs)
    assert re.findall(r'data-image-id="(\d+)"', grid) == ["3", "9"]
    assert grid.count('tabindex="0"') == 2 and 'aria-multiselectable="true"' in grid
    assert P.strip_html(items, thumbs).count("<img") == 2
    assert "No pool images match" in P.grid_html([], {})


def test_page_text():
    assert P.page_text(48, 48, 310) == "Images 49–96 of 310"
    assert P.page_text(0, 0, 0) == "No images."
