"""The plotting module: class knowledge graph, edge tables, training curve, evaluation plots."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from fewshot_studio import viz
from fewshot_studio.methods.knowledge_graph import KnowledgeGraph

CLASSES = ["cat", "dog", "lynx", "car"]
# Pairs: cat–dog (t .8, v .7), cat–lynx (t .2, v .9: looks alike, named differently),
# cat–car (.5/.3), dog–lynx (.3/.2), dog–car (.4/.35), lynx–car (.6/.5).
TEXT = np.array([[1.0, 0.8, 0.2, 0.5],
                 [0.8, 1.0, 0.3, 0.4],
                 [0.2, 0.3, 1.0, 0.6],
                 [0.5, 0.4, 0.6, 1.0]])
VISUAL = np.array([[1.0, 0.7, 0.9, 0.3],
                   [0.7, 1.0, 0.2, 0.35],
                   [0.9, 0.2, 1.0, 0.5],
                   [0.3, 0.35, 0.5, 1.0]])


def make_kg(visual=True, fused=False, counts=(5, 0, 3, 10)) -> KnowledgeGraph:
    return KnowledgeGraph(list(CLASSES), TEXT.astype(np.float32), VISUAL.astype(np.float32) if visual else None,
                          ((TEXT + VISUAL) / 2).astype(np.float32) if fused else None,
                          list(counts) if counts is not None else None)


def traces(fig: go.Figure, name: str) -> list:
    return [t for t in fig.data if t.name == name]


def segments(fig: go.Figure, name: str) -> list[tuple]:
    """The line segments of every trace called `name`, as ((x0, y0), (x1, y1))."""
    segs = []
    for t in traces(fig, name):
        xs, ys = list(t.x), list(t.y)
        assert len(xs) % 3 == 0 and all(x is None for x in xs[2::3]) and all(y is None for y in ys[2::3])
        segs += [((xs[k], ys[k]), (xs[k + 1], ys[k + 1])) for k in range(0, len(xs), 3)]
    return segs


def legend_names(fig: go.Figure) -> set[str]:
    return {t.name for t in fig.data if t.showlegend is not False}


def edge_hover(fig: go.Figure) -> list[str]:
    (t,) = traces(fig, viz.EDGE_HOVER_NAME)
    return list(t.hovertext)


def node_trace(fig: go.Figure):
    (t,) = traces(fig, viz.NODES_NAME)
    return t


def annotations(fig: go.Figure) -> str:
    return " | ".join(a.text for a in fig.layout.annotations)


def count_pairs(m: np.ndarray, thr: float) -> int:
    iu = np.triu_indices(len(m), k=1)
    return int((m[iu] >= thr).sum())


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize("mode", viz.MODES)
def test_layout_deterministic_finite_and_bounded(mode):
    kg = make_kg(fused=True)
    a, b = viz.graph_layout(kg, mode), viz.graph_layout(make_kg(fused=True), mode)
    assert a.shape == (4, 2) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() == pytest.approx(1.0)
    # distinct classes get distinct positions
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)[np.triu_indices(4, 1)]
    assert d.min() > 0.05


def test_layout_places_similar_classes_closer():
    kg = make_kg()
    pos = viz.graph_layout(kg, "text")
    dist = lambda i, j: np.linalg.norm(pos[i] - pos[j])  # noqa: E731
    assert dist(0, 1) < dist(0, 2)  # cat–dog textually close, cat–lynx far
    pos = viz.graph_layout(kg, "visual")
    dist = lambda i, j: np.linalg.norm(pos[i] - pos[j])  # noqa: E731
    assert dist(0, 2) < dist(0, 3)  # cat–lynx look alike, cat–car do not


def test_layout_small_and_degenerate_cases():
    assert viz.graph_layout(KnowledgeGraph([], np.zeros((0, 0))), "text").shape == (0, 2)
    np.testing.assert_array_equal(viz.graph_layout(KnowledgeGraph(["a"], np.ones((1, 1))), "both"), [[0, 0]])
    two = viz.graph_layout(KnowledgeGraph(["a", "b"], np.eye(2)), "text")
    assert two.shape == (2, 2) and np.linalg.norm(two[0] - two[1]) > 1
    same = viz.graph_layout(KnowledgeGraph(list("abcde"), np.ones((5, 5))), "text")  # no structure
    assert np.all(np.isfinite(same)) and len({tuple(np.round(p, 6)) for p in same}) == 5
    nan = np.full((3, 3), np.nan)
    assert np.all(np.isfinite(viz.graph_layout(KnowledgeGraph(list("abc"), nan), "text")))
    with pytest.raises(ValueError):
        viz.graph_layout(make_kg(), "sideways")


# ---------------------------------------------------------------- knowledge graph figure
@pytest.mark.parametrize("thr", [0.0, 0.25, 0.45, 0.65, 0.85, 0.95])
def test_threshold_filters_edges(thr):
    fig = viz.knowledge_graph_figure(make_kg(), "both", threshold=thr, highlight=False)
    assert len(segments(fig, viz.TEXT_NAME)) == count_pairs(TEXT, thr)
    assert len(segments(fig, viz.VISUAL_NAME)) == count_pairs(VISUAL, thr)
    shown = {h.split(":")[0] for h in edge_hover(fig)} if traces(fig, viz.EDGE_HOVER_NAME) else set()
    both = np.maximum(TEXT, VISUAL)
    assert len(shown) == count_pairs(both, thr)


def test_single_mode_edges_follow_that_subgraph():
    fig = viz.knowledge_graph_figure(make_kg(), "text", threshold=0.45, highlight=False)
    pos = viz.graph_layout(make_kg(), "text")
    want = {frozenset((i, j)) for i in range(4) for j in range(i + 1, 4) if TEXT[i, j] >= 0.45}
    got = set()
    for (a, b) in segments(fig, viz.TEXT_NAME):
        ia = int(np.argmin(np.linalg.norm(pos - np.array(a), axis=1)))
        ib = int(np.argmin(np.linalg.norm(pos - np.array(b), axis=1)))
        assert np.allclose(pos[ia], a) and np.allclose(pos[ib], b)  # no offset in single mode
        got.add(frozenset((ia, ib)))
    assert got == want


def test_heavier_edges_are_wider_and_more_opaque():
    fig = viz.knowledge_graph_figure(make_kg(), "text", threshold=0.0, highlight=False)
    ts = traces(fig, viz.TEXT_NAME)
    assert len(ts) >= 2
    assert sum(t.showlegend is not False for t in ts) == 1  # one legend entry for the group
    assert {t.legendgroup for t in ts} == {viz.TEXT_NAME}
    widths = [t.line.width for t in ts]
    opac = [t.opacity for t in ts]
    assert widths == sorted(widths, reverse=True) and opac == sorted(opac, reverse=True)
    # the heaviest pair (cat–dog 0.8) sits in the widest trace
    pos = viz.graph_layout(make_kg(), "text")
    xs = [x for x in ts[0].x if x is not None]
    assert any(np.isclose(x, pos[0, 0]) for x in xs) and any(np.isclose(x, pos[1, 0]) for x in xs)


def test_hover_text_has_exact_weights():
    kg = make_kg()
    kg.text_edges = kg.text_edges.astype(np.float64)
    kg.text_edges[0, 1] = kg.text_edges[1, 0] = 0.81234
    kg.visual_edges = kg.visual_edges.astype(np.float64)
    kg.visual_edges[0, 1] = kg.visual_edges[1, 0] = 0.60119
    fig = viz.knowledge_graph_figure(kg, "both")
    hov = edge_hover(fig)
    assert "cat — dog: text 0.8123, visual 0.6012" in hov
    assert any(h.startswith("lynx — car: text 0.6000, visual 0.5000") for h in hov)
    # midpoint markers are invisible, sit at the pair's midpoint and carry only hover text
    (t,) = traces(fig, viz.EDGE_HOVER_NAME)
    assert t.showlegend is False and t.mode == "markers" and "rgba(0,0,0,0)" in t.marker.color.replace(" ", "")
    pos = viz.graph_layout(kg, "both")
    k = hov.index("cat — dog: text 0.8123, visual 0.6012")
    assert np.allclose([t.x[k], t.y[k]], (pos[0] + pos[1]) / 2)
    # nodes: class, count, strongest neighbours with exact weights
    nodes = node_trace(fig)
    cat = nodes.hovertext[0]
    assert "<b>cat</b>" in cat and "5 support images" in cat
    assert "dog: text 0.8123, visual 0.6012" in cat
    assert "no support images" in nodes.hovertext[1]
    assert list(nodes.text) == CLASSES and nodes.mode == "markers+text"


def test_node_sizes_follow_counts():
    sizes = list(node_trace(viz.knowledge_graph_figure(make_kg())).marker.size)
    assert sizes[1] == viz.MIN_NODE_SIZE  # 0 images: the minimum size
    assert sizes[3] == viz.MAX_NODE_SIZE  # the most images: the maximum
    assert sizes[1] < sizes[2] < sizes[0] < sizes[3]
    flat = list(node_trace(viz.knowledge_graph_figure(make_kg(counts=None))).marker.size)
    assert len(set(flat)) == 1
    none = list(node_trace(viz.knowledge_graph_figure(make_kg(counts=(0, 0, 0, 0)))).marker.size)
    assert none == [viz.MIN_NODE_SIZE] * 4


def test_modes_produce_the_right_traces_and_legend():
    kg = make_kg(fused=True)
    both = viz.knowledge_graph_figure(kg, "both", highlight=False)
    assert legend_names(both) == {viz.TEXT_NAME, viz.VISUAL_NAME}
    t_style = {t.line.dash for t in traces(both, viz.TEXT_NAME)}
    v_style = {t.line.dash for t in traces(both, viz.VISUAL_NAME)}
    t_col = {t.line.color for t in traces(both, viz.TEXT_NAME)}
    v_col = {t.line.color for t in traces(both, viz.VISUAL_NAME)}
    assert len(t_style) == len(v_style) == len(t_col) == len(v_col) == 1
    assert t_style != v_style and t_col != v_col
    # in "both" mode the two lines of one pair are drawn side by side, not on top of each other
    ts, vs = segments(both, viz.TEXT_NAME), segments(both, viz.VISUAL_NAME)
    assert not {tuple(map(tuple, s)) for s in ts} & {tuple(map(tuple, s)) for s in vs}

    text = viz.knowledge_graph_figure(kg, "text", highlight=False)
    assert legend_names(text) == {viz.TEXT_NAME} and not traces(text, viz.VISUAL_NAME)
    visual = viz.knowledge_graph_figure(kg, "visual", highlight=False)
    assert legend_names(visual) == {viz.VISUAL_NAME} and not traces(visual, viz.TEXT_NAME)
    fused = viz.knowledge_graph_figure(kg, "fused", highlight=False)
    assert legend_names(fused) == {viz.FUSED_NAME}
    assert len(segments(fused, viz.FUSED_NAME)) == 6
    assert any(", fused 0.7500" in h for h in edge_hover(fused))  # cat–dog (0.8 + 0.7) / 2
    for fig in (both, text, visual, fused):
        assert not annotations(fig)
    with pytest.raises(ValueError):
        viz.knowledge_graph_figure(kg, "nope")


def test_highlight_only_for_high_visual_low_text_pair():
    fig = viz.knowledge_graph_figure(make_kg(), "both")
    assert viz.HIGHLIGHT_NAME in legend_names(fig)
    (hl,) = traces(fig, viz.HIGHLIGHT_NAME)
    assert hl.line.color == viz.WARN_COLOR
    assert hl.line.color not in {t.line.color for t in fig.data if t.mode == "lines" and t.name != viz.HIGHLIGHT_NAME}
    assert len(segments(fig, viz.HIGHLIGHT_NAME)) == 1
    assert viz.confusable_pairs(make_kg()) == [(0, 2)]  # cat–lynx
    # the highlighted pair's visual edge is the warning line, not also a plain visual line
    assert len(segments(fig, viz.VISUAL_NAME)) == 5
    flagged = [h for h in edge_hover(fig) if viz.HIGHLIGHT_NAME in h]
    assert len(flagged) == 1 and flagged[0].startswith("cat — lynx: text 0.2000, visual 0.9000")
    # the segment joins cat and lynx (allowing for the side-by-side offset)
    pos = viz.graph_layout(make_kg(), "both")
    (a, b), = segments(fig, viz.HIGHLIGHT_NAME)
    assert np.linalg.norm(np.array(a) - pos[0]) < 0.05 and np.linalg.norm(np.array(b) - pos[2]) < 0.05
    # also shown in single-sub-graph modes; off on request, or above the threshold
    for mode in ("text", "visual"):
        assert viz.HIGHLIGHT_NAME in legend_names(viz.knowledge_graph_figure(make_kg(), mode))
    assert not traces(viz.knowledge_graph_figure(make_kg(), "both", highlight=False), viz.HIGHLIGHT_NAME)
    assert not traces(viz.knowledge_graph_figure(make_kg(), "both", threshold=0.95), viz.HIGHLIGHT_NAME)


def test_no_highlight_without_a_confusable_pair():
    # visual tracks text (slightly lower everywhere): nothing looks alike but is named differently
    kg = KnowledgeGraph(list(CLASSES), TEXT, TEXT - 0.05 + 0.05 * np.eye(4), None, [1, 1, 1, 1])
    assert viz.confusable_pairs(kg) == []
    assert not traces(viz.knowledge_graph_figure(kg, "both"), viz.HIGHLIGHT_NAME)
    # high gap but low visual similarity (below the median) is not "looks alike"
    t = np.full((4, 4), -0.5) + 1.5 * np.eye(4)
    v = np.full((4, 4), 0.8) + 0.2 * np.eye(4)
    t[0, 1] = t[1, 0] = -0.9
    v[0, 1] = v[1, 0] = 0.1
    kg = KnowledgeGraph(list(CLASSES), t, v)
    assert (0, 1) not in viz.confusable_pairs(kg)


def test_visual_none_falls_back_to_text_with_notice():
    kg = make_kg(visual=False)
    for mode in ("both", "visual"):
        fig = viz.knowledge_graph_figure(kg, mode)
        assert legend_names(fig) == {viz.TEXT_NAME}
        assert len(segments(fig, viz.TEXT_NAME)) == 6
        assert "no visual graph" in annotations(fig)
        assert all(h.count(":") == 1 and "visual" not in h for h in edge_hover(fig))
    fig = viz.knowledge_graph_figure(kg, "text")
    assert not annotations(fig)
    fig = viz.knowledge_graph_figure(make_kg(), "fused")  # visual but no fused graph
    assert legend_names(fig) >= {viz.TEXT_NAME, viz.VISUAL_NAME} and "no fused graph" in annotations(fig)
    assert viz.available_modes(kg) == ["text"]
    assert viz.available_modes(make_kg()) == ["both", "text", "visual"]
    assert viz.available_modes(make_kg(fused=True)) == ["both", "text", "visual", "fused"]


def test_zero_and_one_class():
    empty = viz.knowledge_graph_figure(KnowledgeGraph([], np.zeros((0, 0))))
    assert len(empty.data) == 0 and "No classes" in annotations(empty)
    one = viz.knowledge_graph_figure(KnowledgeGraph(["cat"], np.ones((1, 1)), np.ones((1, 1)), None, [3]))
    nodes = node_trace(one)
    assert list(nodes.text) == ["cat"] and "3 support images" in nodes.hovertext[0]
    assert not [t for t in one.data if t.mode == "lines"]
    assert "one class" in annotations(one)
    for fig in (empty, one):
        json.loads(fig.to_json())


def test_threshold_above_everything_says_so():
    fig = viz.knowledge_graph_figure(make_kg(), "both", threshold=0.99)
    assert not [t for t in fig.data if t.mode == "lines"] and not traces(fig, viz.EDGE_HOVER_NAME)
    assert "threshold" in annotations(fig)
    assert len(node_trace(fig).x) == 4


def test_graph_figure_is_clean_and_light():
    fig = viz.knowledge_graph_figure(make_kg(), "both")
    lay = fig.layout
    assert lay.xaxis.visible is False and lay.yaxis.visible is False
    assert lay.yaxis.scaleanchor == "x" and lay.yaxis.scaleratio == 1
    assert lay.plot_bgcolor == "white" and lay.paper_bgcolor == "white"
    assert "textual + visual" in lay.title.text
    # a large graph still needs only a handful of traces
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.3 * rng.normal(size=x.shape)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    big = KnowledgeGraph([f"c{i}" for i in range(60)], x @ x.T, y @ y.T, None, list(range(60)))
    fig = viz.knowledge_graph_figure(big, "both", threshold=-1.0)
    assert len(fig.data) <= 2 * viz.EDGE_LEVELS + 3
    assert len(segments(fig, viz.TEXT_NAME)) == 60 * 59 // 2
    assert len(edge_hover(fig)) == 60 * 59 // 2
    assert len(fig.to_json()) < 3_000_000


def test_figures_are_deterministic():
    a = viz.knowledge_graph_figure(make_kg(), "both", 0.3).to_json()
    b = viz.knowledge_graph_figure(make_kg(), "both", 0.3).to_json()
    assert a == b


# ---------------------------------------------------------------- tables
def test_edge_rows_sorted_and_complete():
    rows = viz.edge_rows(make_kg())
    assert len(rows) == 4 * 3 // 2 and all(len(r) == len(viz.EDGE_COLUMNS) for r in rows)
    assert viz.EDGE_COLUMNS == ["class A", "class B", "textual", "visual", "visual − textual", "fused"]
    gaps = [r[4] for r in rows]
    assert gaps == sorted(gaps, reverse=True)
    assert rows[0] == ["cat", "lynx", 0.2, 0.9, 0.7, None]  # no fused graph: the fused cell is blank
    pairs = {frozenset(r[:2]) for r in rows}
    assert len(pairs) == 6
    for a, b, t, v, g, f in rows:
        i, j = CLASSES.index(a), CLASSES.index(b)
        assert i < j and t == pytest.approx(TEXT[i, j], abs=1e-4) and v == pytest.approx(VISUAL[i, j], abs=1e-4)
        assert g == pytest.approx(v - t, abs=2e-4) and f is None
    assert len(viz.edge_rows(make_kg(), threshold=0.55)) == count_pairs(np.maximum(TEXT, VISUAL), 0.55)
    json.dumps(rows)


def test_edge_rows_without_visual_and_tiny():
    rows = viz.edge_rows(make_kg(visual=False))
    assert len(rows) == 6 and all(r[3] is None and r[4] is None for r in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert viz.edge_rows(KnowledgeGraph(["a"], np.ones((1, 1)))) == []
    assert viz.edge_rows(KnowledgeGraph([], np.zeros((0, 0)))) == []


def test_confusable_rows():
    rows = viz.confusable_rows(make_kg())
    assert viz.CONFUSABLE_COLUMNS[:2] == ["class A", "class B"] and len(viz.CONFUSABLE_COLUMNS) == 5
    assert rows == [["cat", "lynx", 0.2, 0.9, 0.7]]
    assert viz.confusable_rows(make_kg(visual=False)) == []
    t = np.eye(5)
    v = np.eye(5) + 0.3 * (1 - np.eye(5))  # every pair: visual 0.3, visual − text = 0.3
    assert len(viz.confusable_rows(KnowledgeGraph(list("abcde"), t, v), top=3)) == 3
    # visual 0.1 is below the "looks alike" floor (KnowledgeGraph.CONFUSABLE_MIN_VISUAL), whatever the gap
    v = np.eye(5) + 0.1 * (1 - np.eye(5))
    assert viz.confusable_rows(KnowledgeGraph(list("abcde"), t, v)) == []


# The knowledge graph of the shapes example (assets/examples/shapes/train, tiny backbone,
# GraphAdapter), rounded: the old rules listed green triangle–purple hexagon (visual 0.065).
SHAPES = ["blue square", "green triangle", "purple hexagon", "red circle", "yellow star"]
SHAPES_TEXT = np.array([[1.0, 0.239, 0.123, 0.099, -0.318],
                        [0.239, 1.0, 0.010, -0.430, 0.263],
                        [0.123, 0.010, 1.0, 0.489, -0.409],
                        [0.099, -0.430, 0.489, 1.0, -0.865],
                        [-0.318, 0.263, -0.409, -0.865, 1.0]], dtype=np.float32)
SHAPES_VISUAL = np.array([[1.0, 0.117, 0.116, 0.317, -0.382],
                          [0.117, 1.0, 0.065, -0.242, -0.037],
                          [0.116, 0.065, 1.0, 0.468, -0.230],
                          [0.317, -0.242, 0.468, 1.0, -0.743],
                          [-0.382, -0.037, -0.230, -0.743, 1.0]], dtype=np.float32)
SHAPES_FUSED = np.array([[1.0, 0.092, -0.252, -0.167, -0.195],
                         [0.092, 1.0, 0.118, -0.581, 0.013],
                         [-0.252, 0.118, 1.0, -0.209, 0.118],
                         [-0.167, -0.581, -0.209, 1.0, -0.652],
                         [-0.195, 0.013, 0.118, -0.652, 1.0]], dtype=np.float32)


def shapes_kg(fused=True) -> KnowledgeGraph:
    return KnowledgeGraph(list(SHAPES), SHAPES_TEXT, SHAPES_VISUAL, SHAPES_FUSED if fused else None, [4] * 5)


def highlighted_pairs(fig: go.Figure) -> list[tuple[str, str]]:
    """The class pairs the figure flags as "looks alike, named differently" (edge hover texts)."""
    flagged = [h.split(":", 1)[0].split(" — ") for h in edge_hover(fig) if viz.HIGHLIGHT_NAME in h] \
        if traces(fig, viz.EDGE_HOVER_NAME) else []
    return sorted((a, b) for a, b in flagged)


def highlighted_edges(fig: go.Figure) -> list[tuple[str, str]]:
    """The class pairs the warning-coloured trace draws, read back from its line segments: each
    end is matched to the nearest node of the figure's node trace (in "both" mode the segment is
    shifted sideways by a small offset, far less than the distance between nodes)."""
    nodes = node_trace(fig)
    pos = np.column_stack([list(nodes.x), list(nodes.y)]).astype(np.float64)
    names = list(nodes.text)
    pairs = []
    for a, b in segments(fig, viz.HIGHLIGHT_NAME):
        ends = []
        for p in (a, b):
            d = np.linalg.norm(pos - np.asarray(p, dtype=np.float64), axis=1)
            near = np.argsort(d)
            assert d[near[0]] < 0.05 and d[near[1]] > 2 * d[near[0]], "ambiguous segment end"
            ends.append(int(near[0]))
        i, j = sorted(ends)
        assert i != j
        pairs.append((names[i], names[j]))
    return sorted(pairs)


def test_looks_alike_needs_a_high_visual_similarity():
    kg = shapes_kg()
    level = kg.confusable_level()
    iu = np.triu_indices(5, k=1)
    off = SHAPES_VISUAL[iu]
    assert level == pytest.approx(max(np.percentile(off, 75), KnowledgeGraph.CONFUSABLE_MIN_VISUAL))
    assert level >= 0.2 > 0.117  # the upper quartile (0.117) is not yet "clearly positive"
    pairs = kg.confusable_pairs()  # what the CLI's `graph` command prints
    assert [(p["a"], p["b"]) for p in pairs] == [("blue square", "red circle")]
    assert all(p["visual"] >= level and p["gap"] >= KnowledgeGraph.CONFUSABLE_GAP for p in pairs)
    # the low-visual pair with a positive gap (0.065 vs 0.010) and the "more unrelated by name
    # than by look" pairs (visual < 0) are not listed anywhere
    for rows in (viz.confusable_rows(kg), viz.confusable_rows(kg, 0.0), viz.confusable_rows(kg, -1.0)):
        assert [r[:2] for r in rows] == [["blue square", "red circle"]]
        assert all(r[3] >= level for r in rows)
    assert viz.confusable_pairs(kg) == [(0, 3)]
    # a visually close pair that is also named alike (purple hexagon–red circle, 0.468 vs 0.489) is not
    assert (2, 3) not in viz.confusable_pairs(kg)
    # no visual graph or fewer than two classes: nothing, and no level
    no_visual = KnowledgeGraph(list(SHAPES), SHAPES_TEXT)
    assert no_visual.confusable_level() is None and no_visual.confusable_pairs() == []
    assert KnowledgeGraph(["a"], np.ones((1, 1)), np.ones((1, 1))).confusable_pairs() == []
    # non-finite similarities are skipped, not listed
    v = SHAPES_VISUAL.copy()
    v[0, 3] = v[3, 0] = np.nan
    assert KnowledgeGraph(list(SHAPES), SHAPES_TEXT, v).confusable_pairs() == []
    # one definition, many consumers: the pairs carry their indices and respect `top`
    t = np.eye(6)
    v = np.eye(6) + 0.5 * (1 - np.eye(6))
    many = KnowledgeGraph(list("abcdef"), t, v)
    assert len(many.confusable_pairs(top=100)) == 15 and len(many.confusable_pairs(top=4)) == 4
    assert len(many.confusable_pairs()) == KnowledgeGraph.CONFUSABLE_TOP
    assert all(many.classes[p["i"]] == p["a"] and many.classes[p["j"]] == p["b"] for p in many.confusable_pairs(15))


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("which", ["toy", "shapes", "random", "no visual"])
def test_figure_highlights_equal_table_rows_and_info_pair(which, threshold):
    if which == "toy":
        kg = make_kg(fused=True)
    elif which == "no visual":  # cat–lynx would be confusable, but without a visual graph nothing is
        kg = make_kg(visual=False)
    elif which == "shapes":
        kg = shapes_kg()
    else:
        rng = np.random.default_rng(3)
        x = rng.normal(size=(12, 6))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x + 0.8 * rng.normal(size=x.shape)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        kg = KnowledgeGraph([f"c{i}" for i in range(12)], x @ x.T, y @ y.T)
    rows = viz.confusable_rows(kg, threshold)
    table = sorted((r[0], r[1]) for r in rows)
    idx = viz.confusable_pairs(kg, threshold)
    assert [(kg.classes[i], kg.classes[j]) for i, j in idx] == [(r[0], r[1]) for r in rows]
    # the one rule, filtered to the pairs whose visual edge is drawn at this threshold
    rule = sorted((p["a"], p["b"]) for p in kg.confusable_pairs() if p["visual"] >= threshold)
    assert table == rule
    for mode in viz.MODES:  # every mode, also those that fall back (no visual or fused graph)
        fig = viz.knowledge_graph_figure(kg, mode, threshold)
        assert highlighted_pairs(fig) == table
        assert highlighted_edges(fig) == table  # the drawn warning-coloured edges themselves
        assert len(segments(fig, viz.HIGHLIGHT_NAME)) == len(rows)
    assert highlighted_edges(viz.knowledge_graph_figure(kg, "both", threshold, highlight=False)) == []
    # the info line names rows[0]: the largest gap among the highlighted pairs
    if rows:
        gaps = [r[4] for r in rows]
        assert rows[0][4] == max(gaps) and gaps == sorted(gaps, reverse=True)
    # every row is one of the graph's confusable pairs whose visual edge is drawn
    every = {(p["a"], p["b"]) for p in kg.confusable_pairs()}
    assert set(table) <= every and all(r[3] >= threshold for r in rows)
    if which == "random":
        assert kg.confusable_pairs()  # the random graph has some pairs to compare
    if which == "toy" and threshold <= 0.6:
        assert table == [("cat", "lynx")]  # the known pair (visual .9 vs textual .2), and only it
    if which == "no visual":
        assert kg.confusable_pairs() == [] and rows == []
        assert make_kg().confusable_pairs()  # the same classes with their visual graph do have a pair


def test_edge_rows_fused_column_and_sorting():
    kg = shapes_kg()
    rows = viz.edge_rows(kg, threshold=-1.0)
    assert len(rows) == 10
    fused = {(r[0], r[1]): r[5] for r in rows}
    assert fused[("blue square", "green triangle")] == pytest.approx(0.092, abs=1e-4)
    assert fused[("red circle", "yellow star")] == pytest.approx(-0.652, abs=1e-4)
    assert all(r[5] is None for r in viz.edge_rows(shapes_kg(fused=False), -1.0))
    # the threshold counts the fused edge too: a pair shows when any of its weights reaches it
    fm = np.maximum(np.maximum(SHAPES_TEXT, SHAPES_VISUAL), SHAPES_FUSED)
    for thr in (-0.5, 0.0, 0.1, 0.3):
        assert len(viz.edge_rows(kg, thr)) == count_pairs(fm, thr)
    assert len(viz.edge_rows(kg, 0.1)) != len(viz.edge_rows(kg, 0.3))
    for col in ("textual", "visual", "fused", "visual − textual"):
        k = viz.EDGE_COLUMNS.index(col)
        vals = [r[k] for r in viz.edge_rows(kg, -1.0, sort_by=col)]
        assert vals == sorted(vals, reverse=True), col
    names = [(r[0], r[1]) for r in viz.edge_rows(kg, -1.0, sort_by="class A")]
    assert names == sorted(names)
    assert viz.edge_rows(kg, -1.0) == viz.edge_rows(kg, -1.0, sort_by=viz.DEFAULT_EDGE_SORT)
    assert set(viz.EDGE_SORTS) <= set(viz.EDGE_COLUMNS)
    # sorting by a column the method lacks keeps the rows, in textual order
    no_fused = viz.edge_rows(shapes_kg(fused=False), -1.0, sort_by="fused")
    assert [r[2] for r in no_fused] == sorted((r[2] for r in no_fused), reverse=True)
    with pytest.raises(ValueError):
        viz.edge_rows(kg, sort_by="nope")


# ---------------------------------------------------------------- training curve
def test_training_curve_two_axes_and_data():
    hist = [{"step": s, "loss": 2.0 / s, "accuracy": min(1.0, 0.2 * s)} for s in range(1, 8)]
    fig = viz.training_curve_figure(hist, title="GraphAdapter training")
    (loss,) = traces(fig, "loss")
    (acc,) = traces(fig, "train accuracy")
    assert list(loss.x) == list(range(1, 8)) and list(loss.y) == pytest.approx([2.0 / s for s in range(1, 8)])
    assert list(acc.y) == pytest.approx([min(1.0, 0.2 * s) for s in range(1, 8)])
    assert loss.yaxis in (None, "y") and acc.yaxis == "y2"
    lay = fig.layout
    assert lay.yaxis2.overlaying == "y" and lay.yaxis2.side == "right"
    assert lay.yaxis2.tickformat.endswith("%") and lay.yaxis2.range[0] == 0 and lay.yaxis2.range[1] >= 1
    assert lay.title.text == "GraphAdapter training"
    json.loads(fig.to_json())


def test_training_curve_empty_and_partial():
    fig = viz.training_curve_figure([])
    assert len(fig.data) == 0 and "Training has not started" in annotations(fig)
    fig = viz.training_curve_figure([{"step": 1, "loss": 1.5, "accuracy": None}, {"step": 2, "loss": 1.0}])
    assert [t.name for t in fig.data] == ["loss"]


# ---------------------------------------------------------------- evaluation
def test_confusion_heatmap_row_normalised():
    conf = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    fig = viz.confusion_figure(conf, ["a", "b", "c"])
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    z = np.array(hm.z, dtype=float)
    np.testing.assert_allclose(z[0], [0.8, 0.2, 0.0])
    np.testing.assert_allclose(z[1], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(z[2], [0, 0, 0])  # no images of c: no division by zero
    assert [list(r) for r in hm.text] == [["8", "2", "0"], ["1", "1", "2"], ["0", "0", "0"]]
    assert hm.texttemplate == "%{text}"
    assert list(hm.x) == list(hm.y) == ["a", "b", "c"] and hm.zmin == 0 and hm.zmax == 1
    assert fig.layout.yaxis.autorange == "reversed"  # first true class on top
    assert "true" in fig.layout.yaxis.title.text and "predicted" in fig.layout.xaxis.title.text
    json.loads(fig.to_json())
    with pytest.raises(ValueError):
        viz.confusion_figure(np.zeros((2, 2)), ["a", "b", "c"])
    assert "No evaluation" in annotations(viz.confusion_figure(np.zeros((0, 0)), []))


def test_per_class_bars():
    fig = viz.per_class_figure({"a": 0.5, "b": 1.0, "c": None})
    (bar,) = [t for t in fig.data if isinstance(t, go.Bar)]
    assert list(bar.x) == ["a", "b", "c"] and list(bar.y) == [0.5, 1.0, 0.0]
    assert list(bar.text) == ["50.0%", "100.0%", "no test images"]
    assert bar.marker.color[2] != bar.marker.color[0]
    assert fig.layout.yaxis.tickformat.endswith("%")
    json.loads(fig.to_json())
    assert "No evaluation" in annotations(viz.per_class_figure({}))


def test_comparison_bars_highlight_best():
    fig = viz.comparison_figure({"Zero-shot CLIP": 0.61, "GraphAdapter": 0.83, "Tip-Adapter": 0.79, "MMA": None})
    (bar,) = fig.data
    assert list(bar.x) == ["Zero-shot CLIP", "GraphAdapter", "Tip-Adapter", "MMA"]
    assert list(bar.y) == [0.61, 0.83, 0.79, 0.0]
    colors = list(bar.marker.color)
    assert colors[1] == viz.BEST_COLOR and colors.count(viz.BEST_COLOR) == 1
    assert "best" in bar.text[1] and "83.0%" in bar.text[1] and bar.text[3] == "n/a"
    tie = viz.comparison_figure({"x": 0.5, "y": 0.5})
    assert list(tie.data[0].marker.color) == [viz.BEST_COLOR] * 2
    json.loads(fig.to_json())
    assert "No results" in annotations(viz.comparison_figure({}))


def test_viz_imports_only_plotly_and_numpy():
    src = Path(viz.__file__).read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    assert mods <= {"__future__", "typing", "numpy", "plotly"}
    # at run time, importing viz pulls in neither torch nor gradio
    code = "import sys, fewshot_studio.viz; print(sorted({'torch', 'gradio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_knowledge_graph_lives_in_a_numpy_only_module():
    from fewshot_studio import methods
    from fewshot_studio.methods import base, knowledge_graph

    assert methods.KnowledgeGraph is base.KnowledgeGraph is knowledge_graph.KnowledgeGraph is KnowledgeGraph
    src = Path(knowledge_graph.__file__).read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "imports nothing of the package"
            mods.add(node.module.split(".")[0])
    assert mods <= {"__future__", "dataclasses", "typing", "numpy"}


HOSTILE = ['<a href="http://evil.example/">Session expired: sign in</a>', '<span style="font-size:80px">big</span>',
           "cat & <b>dog</b>"]


def test_class_names_are_shown_as_text_never_as_markup():
    """Plotly renders <a href>, <span style>, <b> in labels and hover texts: a class name must
    show exactly as typed (escaped; plotly turns the entities back into characters)."""
    t = np.eye(3)
    kg = KnowledgeGraph(list(HOSTILE), t, np.eye(3) + 0.5 * (1 - np.eye(3)))
    escaped = [viz.label_text(n) for n in HOSTILE]
    assert escaped[0] == '&lt;a href="http://evil.example/"&gt;Session expired: sign in&lt;/a&gt;'
    figures = [viz.knowledge_graph_figure(kg, mode, -1.0) for mode in viz.MODES]
    figures += [viz.confusion_figure(np.eye(3), HOSTILE), viz.per_class_figure(dict.fromkeys(HOSTILE, 0.5))]
    for fig in figures:
        blob = json.dumps(fig.to_plotly_json()["data"])
        for tag in ("<a ", "<span", "<b>dog"):
            assert tag not in blob, (tag, blob[:300])
    nodes = next(tr for tr in figures[0].data if tr.name == viz.NODES_NAME)
    assert list(nodes.text) == escaped
    assert list(figures[-2].data[0].x) == escaped and list(figures[-1].data[0].x) == escaped
