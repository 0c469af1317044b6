"""Plots for the UI and the `eval` command: the class knowledge graph, its edge tables,
training curves and evaluation.

Pure, deterministic functions returning plotly Figures or plain table rows; the one module
that imports plotly (evaluation/ and the methods return data); nothing here imports torch or gradio.

    fig = knowledge_graph_figure(kg, mode="both", threshold=0.5)
    rows = edge_rows(kg, 0.5, sort_by="textual")  # header: EDGE_COLUMNS
    pairs = confusable_rows(kg, 0.5)              # "looks alike, named differently" (header: CONFUSABLE_COLUMNS)
    training_curve_figure(method.history)
    confusion_figure(result.confusion, classes)  # an evaluation.EvalResult's matrix
    accuracy_plot(report)                         # an evaluation.ProtocolReport
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .markup import html_text

if TYPE_CHECKING:  # typing only: importing the methods package at run time would pull in torch
    from .evaluation import ProtocolReport
    from .methods.knowledge_graph import KnowledgeGraph

MODES = ("both", "text", "visual", "fused")
MODE_LABELS = {"both": "textual + visual", "text": "textual", "visual": "visual", "fused": "fused"}

# "fused" last: the first five columns mean the same for every method; only GraphAdapter fuses
EDGE_COLUMNS = ["class A", "class B", "textual", "visual", "visual − textual", "fused"]
# what edge_rows can sort by: numbers largest first, class names alphabetically
EDGE_SORTS = ["visual − textual", "textual", "visual", "fused", "class A"]
DEFAULT_EDGE_SORT = "visual − textual"
CONFUSABLE_COLUMNS = ["class A", "class B", "textual", "visual", "visual − textual"]

TEXT_NAME, VISUAL_NAME, FUSED_NAME = "textual", "visual", "fused"
HIGHLIGHT_NAME = "looks alike, named differently"
EDGE_HOVER_NAME = "edge details"
NODES_NAME = "classes"

TEXT_COLOR = "#3a6fb0"       # blue, solid
VISUAL_COLOR = "#2e9e5b"     # green, dotted
FUSED_COLOR = "#8a5cb8"      # purple, solid
WARN_COLOR = "#e8590c"       # orange-red: looks alike, named differently
NODE_COLOR = "#34495e"
EMPTY_NODE_COLOR = "#c4c4c4"  # classes without support images
BEST_COLOR = "#e8590c"
BAR_COLOR = "#3a6fb0"
NA_COLOR = "#c4c4c4"

EDGE_LEVELS = 4              # edge weights are drawn in this many width/opacity steps
MIN_NODE_SIZE, MAX_NODE_SIZE, DEFAULT_NODE_SIZE = 14.0, 42.0, 20.0
NEIGHBOURS_IN_HOVER = 3
FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13, color="#2b2b2b")


# ---------------------------------------------------------------- helpers
def _fmt(w: float | None) -> str:
    return "n/a" if w is None else f"{w:.4f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _matrix(a, c: int) -> np.ndarray | None:
    if a is None:
        return None
    m = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    if m.shape != (c, c):
        raise ValueError(f"an edge matrix has shape {m.shape}; expected {(c, c)} for {c} classes")
    return m


def _base_layout(title: str, **extra) -> dict:
    layout = dict(title=dict(text=title, x=0.02, xanchor="left"), template="plotly_white",
                  paper_bgcolor="white", plot_bgcolor="white", font=FONT, margin=dict(l=50, r=30, t=70, b=50))
    layout.update(extra)
    return layout


def label_text(name) -> str:
    """A class name for a plotly label or hover text. Plotly renders a subset of HTML there
    (<a href>, <span style>, <b>, <br>) and turns entities back into characters, so escaping
    & < > shows a name exactly as typed and never as a link or styled text."""
    return html_text(name)


def _tick_angle(names: Sequence[str]) -> int:
    """Slant category labels when side by side they would not fit (a half-width plot holds
    about 40 characters of labels), so they never overlap."""
    return -35 if len(names) > 6 or sum(len(str(n)) + 2 for n in names) > 40 else 0


def _empty_figure(message: str, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**_base_layout(title, height=360))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color="#777777"))
    return fig


def _note(fig: go.Figure, text: str) -> None:
    """A one-line notice just under the title."""
    fig.add_annotation(text=text, x=0.0, y=1.0, xref="paper", yref="paper", xanchor="left",
                       yanchor="bottom", showarrow=False, font=dict(size=12, color="#a0522d"))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown graph mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def available_modes(kg: KnowledgeGraph) -> list[str]:
    """The graph modes this knowledge graph can show (for the UI's toggle)."""
    modes = ["text"]
    if kg.visual_edges is not None:
        modes = ["both", "text", "visual"]
    if kg.fused_edges is not None:
        modes.append("fused")
    return modes


def _resolve(kg: KnowledgeGraph, mode: str) -> tuple[list[str], str | None]:
    """Which sub-graphs ("text", "visual", "fused") to draw for `mode`, and a notice when
    the method lacks what was asked for."""
    mode = _check_mode(mode)
    has_v, has_f = kg.visual_edges is not None, kg.fused_edges is not None
    if mode == "text":
        return ["text"], None
    if mode == "fused":
        if has_f:
            return ["fused"], None
        if has_v:
            return ["text", "visual"], "This method has no fused graph; showing textual and visual similarities."
        return ["text"], "This method has no fused or visual graph; showing textual similarities."
    if not has_v:
        return ["text"], "This method has no visual graph; showing textual similarities."
    return (["visual"] if mode == "visual" else ["text", "visual"]), None


# ---------------------------------------------------------------- layout
def _circle(c: int) -> np.ndarray:
    if c == 0:
        return np.zeros((0, 2))
    if c == 1:
        return np.zeros((1, 2))
    ang = np.pi - 2 * np.pi * np.arange(c) / c  # first node on the left, clockwise
    return np.stack([np.cos(ang), np.sin(ang)], axis=1)


def _similarity_for_layout(kg: KnowledgeGraph, mode: str) -> np.ndarray:
    c = len(kg.classes)
    subs = _resolve(kg, mode)[0]
    mats = {"text": kg.text_edges, "visual": kg.visual_edges, "fused": kg.fused_edges}
    return np.mean([_matrix(mats[s], c) for s in subs], axis=0)


def graph_layout(kg: KnowledgeGraph, mode: str = "both") -> np.ndarray:
    """Deterministic (C,2) node positions in about [-1,1]²: classical MDS of the distance
    1 − similarity of the chosen sub-graph (the mean of both for "both"); a circle for C ≤ 2
    or when the similarities carry no 2-D structure."""
    c = len(kg.classes)
    _check_mode(mode)
    if c <= 2:
        return _circle(c)
    s = _similarity_for_layout(kg, mode)
    s = (s + s.T) / 2
    d = np.clip(1.0 - s, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    j = np.eye(c) - 1.0 / c
    b = -0.5 * j @ (d ** 2) @ j
    vals, vecs = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(-vals, kind="stable")[:2]
    vals, vecs = vals[order], vecs[:, order]
    if not np.all(np.isfinite(vecs)) or vals[0] <= 1e-9:
        return _circle(c)
    coords = vecs * np.sqrt(np.clip(vals, 0.0, None))
    for k in range(2):  # fix each axis's sign: eigenvectors are only defined up to sign
        col = coords[:, k]
        pivot = int(np.argmax(np.abs(col) + 1e-12 * np.arange(c)[::-1]))
        if col[pivot] < 0:
            coords[:, k] = -col
    # Blend in a little of the circle so identical classes do not sit on top of each other.
    span = np.abs(coords).max()
    coords = coords / span
    coords = 0.92 * coords + 0.08 * _circle(c)
    coords = coords / np.abs(coords).max()
    return np.round(coords, 12)


# ---------------------------------------------------------------- knowledge graph
def _pairs(c: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(c, k=1)


def _confusable(kg: KnowledgeGraph, threshold: float | None) -> list[dict]:
    """KnowledgeGraph.confusable_pairs (the one definition of "looks alike, named differently")
    whose visual edge reaches `threshold`, i.e. is drawn: the figure's highlighted pairs, the
    table and the info line all come from here, so they cannot disagree."""
    pairs = kg.confusable_pairs()
    if threshold is None:
        return pairs
    return [p for p in pairs if p["visual"] >= threshold]


def confusable_pairs(kg: KnowledgeGraph, threshold: float | None = None) -> list[tuple[int, int]]:
    """Index pairs (i<j) that look alike but are named differently (KnowledgeGraph.confusable_pairs),
    largest visual − textual gap first; with `threshold`, only those whose visual edge reaches it."""
    return [(p["i"], p["j"]) for p in _confusable(kg, threshold)]


def _node_sizes(counts: Sequence[int] | None, c: int) -> np.ndarray:
    if counts is None or len(counts) != c:
        return np.full(c, DEFAULT_NODE_SIZE)
    n = np.clip(np.asarray(counts, dtype=np.float64), 0, None)
    top = n.max() if c else 0.0
    if top <= 0:
        return np.full(c, MIN_NODE_SIZE)
    return MIN_NODE_SIZE + (MAX_NODE_SIZE - MIN_NODE_SIZE) * np.sqrt(n / top)


def _segments(pos: np.ndarray, pairs: Sequence[tuple[int, int]], offset: float) -> tuple[list, list]:
    """x and y lists of line segments separated by None, shifted sideways by `offset`."""
    xs: list = []
    ys: list = []
    for i, j in pairs:
        (x0, y0), (x1, y1) = pos[i], pos[j]
        dx, dy = x1 - x0, y1 - y0
        norm = float(np.hypot(dx, dy)) or 1.0
        ox, oy = -dy / norm * offset, dx / norm * offset
        xs += [float(x0 + ox), float(x1 + ox), None]
        ys += [float(y0 + oy), float(y1 + oy), None]
    return xs, ys


def _edge_traces(name: str, color: str, dash: str, pos: np.ndarray, pairs: list[tuple[int, int]],
                 weights: list[float], lo: float, hi: float, offset: float) -> list[go.Scatter]:
    """One trace per weight level (wider and more opaque for heavier edges), all in one
    legend group; the heaviest level carries the legend entry."""
    traces: list[go.Scatter] = []
    if not pairs:
        return traces
    w = np.asarray(weights, dtype=np.float64)
    rel = (w - lo) / (hi - lo) if hi - lo > 1e-12 else np.ones_like(w)
    level = np.clip(np.floor(rel * EDGE_LEVELS), 0, EDGE_LEVELS - 1).astype(int)
    for lv in range(EDGE_LEVELS - 1, -1, -1):
        sel = [p for p, l_ in zip(pairs, level) if l_ == lv]
        if not sel:
            continue
        xs, ys = _segments(pos, sel, offset)
        traces.append(go.Scatter(
            x=xs, y=ys, mode="lines", name=name, legendgroup=name, showlegend=not traces,
            line=dict(color=color, width=1.0 + 1.2 * lv, dash=dash), opacity=0.35 + 0.2 * lv,
            hoverinfo="skip"))
    return traces


def knowledge_graph_figure(kg: KnowledgeGraph, mode: str = "both", threshold: float = 0.0,
                           highlight: bool = True, title: str | None = None) -> go.Figure:
    """An interactive network of the classes.

    Nodes are classes (sized by support-image count); edges are cosine similarities of the
    chosen sub-graph ("text", "visual", "both" or "fused") with weight ≥ `threshold`, wider
    and more opaque when heavier. Hovering a node lists its count and strongest neighbours,
    hovering an edge's midpoint its exact weights. With `highlight`, pairs that look alike
    but are named differently (KnowledgeGraph.confusable_pairs; exactly confusable_rows(kg,
    threshold)) are drawn in a warning colour.
    """
    subs, notice = _resolve(kg, mode)
    c = len(kg.classes)
    title = title or f"Class graph: {MODE_LABELS[mode]} similarities"
    if c == 0:
        return _empty_figure("No classes yet: add classes to see their graph.", title)

    mats = {"text": _matrix(kg.text_edges, c), "visual": _matrix(kg.visual_edges, c),
            "fused": _matrix(kg.fused_edges, c)}
    pos = graph_layout(kg, mode)
    fig = go.Figure()

    hi_pairs = confusable_pairs(kg, threshold) if highlight else []
    hi_set = set(hi_pairs)
    iu, ju = _pairs(c)
    all_pairs = list(zip(iu.tolist(), ju.tolist()))

    # Edges of each drawn sub-graph at or above the threshold.
    drawn: dict[str, list[tuple[int, int]]] = {}
    for s in subs:
        m = mats[s]
        keep = [(i, j) for i, j in all_pairs if m[i, j] >= threshold]
        if s == "visual":  # a highlighted pair's visual edge is drawn in the warning colour
            keep = [p for p in keep if p not in hi_set]
        drawn[s] = keep
    shown_hi = hi_pairs  # already only those whose visual edge reaches the threshold
    ws = [mats[s][i, j] for s in subs for i, j in drawn[s]] + [mats["visual"][p] for p in shown_hi]
    lo, hi = (min(ws), max(ws)) if ws else (0.0, 1.0)

    both = len(subs) == 2
    off = 0.012 if both else 0.0
    style = {"text": (TEXT_NAME, TEXT_COLOR, "solid", off),
             "visual": (VISUAL_NAME, VISUAL_COLOR, "dot", -off),
             "fused": (FUSED_NAME, FUSED_COLOR, "solid", 0.0)}
    for s in subs:
        name, color, dash, o = style[s]
        fig.add_traces(_edge_traces(name, color, dash, pos, drawn[s], [mats[s][p] for p in drawn[s]],
                                    lo, hi, o))
    if shown_hi:
        xs, ys = _segments(pos, shown_hi, -off)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=HIGHLIGHT_NAME, legendgroup=HIGHLIGHT_NAME,
                                 line=dict(color=WARN_COLOR, width=4.5), opacity=0.95, hoverinfo="skip"))

    names = [label_text(n) for n in kg.classes]  # class names are user text: shown, never markup

    # Invisible midpoint markers carry each shown pair's exact weights.
    def pair_text(i: int, j: int) -> str:
        parts = [f"text {_fmt(mats['text'][i, j])}"]
        if mats["visual"] is not None:
            parts.append(f"visual {_fmt(mats['visual'][i, j])}")
        if mats["fused"] is not None and "fused" in subs:
            parts.append(f"fused {_fmt(mats['fused'][i, j])}")
        return f"{names[i]} — {names[j]}: " + ", ".join(parts)

    shown = sorted(set(p for s in subs for p in drawn[s]) | set(shown_hi))
    if shown:
        mid = np.array([(pos[i] + pos[j]) / 2 for i, j in shown])
        texts = []
        for i, j in shown:
            t = pair_text(i, j)
            if (i, j) in hi_set:
                gap = mats["visual"][i, j] - mats["text"][i, j]
                t += f"<br><b>{HIGHLIGHT_NAME}</b> (visual − text {gap:+.4f})"
            texts.append(t)
        fig.add_trace(go.Scatter(x=mid[:, 0].tolist(), y=mid[:, 1].tolist(), mode="markers",
                                 name=EDGE_HOVER_NAME, showlegend=False, hovertext=texts, hoverinfo="text",
                                 marker=dict(size=14, color="rgba(0,0,0,0)")))

    # Nodes.
    counts = list(kg.counts) if kg.counts is not None and len(kg.counts) == c else None
    rank = np.mean([mats[s] for s in subs], axis=0)
    node_text = []
    for i, name in enumerate(names):
        lines = [f"<b>{name}</b>"]
        if counts is not None:
            n = int(counts[i])
            lines.append("no support images" if n == 0 else f"{n} support image{'s' if n != 1 else ''}")
        others = [j for j in np.argsort(-rank[i], kind="stable").tolist() if j != i][:NEIGHBOURS_IN_HOVER]
        if others:
            lines.append("strongest neighbours:")
            for j in others:
                a, b = min(i, j), max(i, j)
                lines.append("  " + names[j] + ": " + pair_text(a, b).split(": ", 1)[1])
        node_text.append("<br>".join(lines))
    colors = [EMPTY_NODE_COLOR if counts is not None and counts[i] == 0 else NODE_COLOR for i in range(c)]
    fig.add_trace(go.Scatter(
        x=pos[:, 0].tolist(), y=pos[:, 1].tolist(), mode="markers+text", name=NODES_NAME, showlegend=False,
        text=names, textposition="top center", textfont=dict(size=13, color="#1f1f1f"),
        hovertext=node_text, hoverinfo="text",
        marker=dict(size=_node_sizes(counts, c).round(2).tolist(), color=colors,
                    line=dict(color="white", width=1.5))))

    fig.update_layout(**_base_layout(title, height=560, hovermode="closest", showlegend=True,
                                     legend=dict(orientation="h", x=0.0, y=-0.02, yanchor="top"),
                                     hoverlabel=dict(bgcolor="white", font_size=12)))
    pad = 0.25
    fig.update_xaxes(visible=False, showgrid=False, zeroline=False, range=[-1 - pad, 1 + pad])
    fig.update_yaxes(visible=False, showgrid=False, zeroline=False, range=[-1 - pad, 1 + pad],
                     scaleanchor="x", scaleratio=1)
    if c == 1:
        _note(fig, "Only one class: add another to see similarities.")
    elif notice:
        _note(fig, notice)
    elif not shown:
        _note(fig, f"No edge reaches the threshold {threshold:.2f}; lower it to see edges.")
    return fig


# ---------------------------------------------------------------- tables
def _r(x: float) -> float:
    return round(float(x), 4)


def _sort_key(sort_by: str):
    """Row sort key for EDGE_SORTS: numbers largest first with missing ones last, class names
    alphabetically; ties by textual similarity (largest first), then class order."""
    if sort_by not in EDGE_SORTS:
        raise ValueError(f"cannot sort edges by {sort_by!r}; choose one of {', '.join(EDGE_SORTS)}")
    col = EDGE_COLUMNS.index(sort_by)
    if sort_by == "class A":
        return lambda row: (row[0], row[1])
    return lambda row: (row[col] is None, -(row[col] or 0.0), -row[2])


def edge_rows(kg: KnowledgeGraph, threshold: float = 0.0, sort_by: str = DEFAULT_EDGE_SORT) -> list[list]:
    """One row per unordered class pair with a similarity ≥ `threshold` (textual, visual or
    fused), columns EDGE_COLUMNS, sorted by `sort_by` (one of EDGE_SORTS; the default, visual −
    textual, falls back to textual similarity when the method has no visual graph). Missing
    values (no visual or fused graph) are None."""
    c = len(kg.classes)
    if c < 2:
        return []
    t, v, f = _matrix(kg.text_edges, c), _matrix(kg.visual_edges, c), _matrix(kg.fused_edges, c)
    key = _sort_key(sort_by)
    iu, ju = _pairs(c)
    rows = []
    for i, j in zip(iu.tolist(), ju.tolist()):
        tw = float(t[i, j])
        vw = None if v is None else float(v[i, j])
        fw = None if f is None else float(f[i, j])
        if max(w for w in (tw, vw, fw) if w is not None) < threshold:
            continue
        rows.append([kg.classes[i], kg.classes[j], _r(tw), None if vw is None else _r(vw),
                     None if vw is None else _r(vw - tw), None if fw is None else _r(fw)])
    return sorted(rows, key=key)


def confusable_rows(kg: KnowledgeGraph, threshold: float | None = None, top: int | None = None) -> list[list]:
    """The pairs that look alike but are named differently (KnowledgeGraph.confusable_pairs),
    columns CONFUSABLE_COLUMNS, largest gap first; with `threshold`, only those whose visual edge
    reaches it (exactly the pairs knowledge_graph_figure highlights at that threshold); at most
    `top`. Empty without a visual graph."""
    pairs = _confusable(kg, threshold)
    if top is not None:
        pairs = pairs[:max(int(top), 0)]
    return [[p["a"], p["b"], _r(p["text"]), _r(p["visual"]), _r(p["gap"])] for p in pairs]


# ---------------------------------------------------------------- training and evaluation
def training_curve_figure(history: Sequence[Mapping], title: str = "Training",
                          empty: str = "Training has not started") -> go.Figure:
    """Loss (left axis) and train accuracy (right axis, as %) against the step; `empty` is
    what an empty history means (a training-free model has none)."""
    if not history:
        return _empty_figure(empty, title)
    steps = [h.get("step", k + 1) for k, h in enumerate(history)]
    loss = [None if h.get("loss") is None else float(h["loss"]) for h in history]
    acc = [None if h.get("accuracy") is None else float(h["accuracy"]) for h in history]
    many = len(history) > 60
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=loss, name="loss", mode="lines" if many else "lines+markers",
                             line=dict(color="#c0392b", width=2), yaxis="y",
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"))
    if any(a is not None for a in acc):
        fig.add_trace(go.Scatter(x=steps, y=acc, name="train accuracy", mode="lines" if many else "lines+markers",
                                 line=dict(color=TEXT_COLOR, width=2), yaxis="y2",
                                 hovertemplate="step %{x}<br>train accuracy %{y:.1%}<extra></extra>"))
    fig.update_layout(**_base_layout(title, height=380, hovermode="x unified",
                                     legend=dict(orientation="h", x=0.0, y=1.0, yanchor="bottom", xanchor="left"),
                                     margin=dict(l=60, r=60, t=90, b=50)),
                      xaxis=dict(title=dict(text="step"), showgrid=False),
                      yaxis=dict(title=dict(text="loss", font=dict(color="#c0392b")), rangemode="tozero",
                                 gridcolor="#eeeeee"),
                      yaxis2=dict(title=dict(text="train accuracy", font=dict(color=TEXT_COLOR)), overlaying="y",
                                  side="right", range=[0, 1.02], tickformat=".0%", showgrid=False))
    return fig


def confusion_figure(confusion, classes: Sequence[str], title: str = "Confusion matrix") -> go.Figure:
    """Heatmap of true (rows) against predicted (columns) classes: cells show counts, the
    colour is the row-normalised fraction (the share of that true class)."""
    classes = list(classes)
    c = len(classes)
    if c == 0:
        return _empty_figure("No evaluation yet.", title)
    m = np.asarray(confusion, dtype=np.float64)
    if m.shape != (c, c):
        raise ValueError(f"the confusion matrix has shape {m.shape}; expected {(c, c)} for {c} classes")
    sums = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)
    counts = [[int(round(x)) if float(x).is_integer() else float(x) for x in row] for row in m]
    custom = [[[counts[i][j], 100 * frac[i, j]] for j in range(c)] for i in range(c)]
    fig = go.Figure(go.Heatmap(
        z=frac.round(6).tolist(), x=[label_text(n) for n in classes], y=[label_text(n) for n in classes], text=[[str(x) for x in row] for row in counts],
        texttemplate="%{text}" if c <= 30 else None, customdata=custom, zmin=0.0, zmax=1.0,
        colorscale="Blues", colorbar=dict(title=dict(text="share of<br>true class"), tickformat=".0%"),
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata[0]} images (%{customdata[1]:.1f}%)<extra></extra>",
        xgap=1, ygap=1))
    side = min(900, 220 + 34 * c)
    fig.update_layout(**_base_layout(title, height=side))
    fig.update_xaxes(title_text="predicted", tickangle=_tick_angle(classes), automargin=True, showgrid=False,
                     type="category")
    fig.update_yaxes(title_text="true", autorange="reversed", showgrid=False, type="category")
    return fig


def per_class_figure(per_class: Mapping[str, float | None], title: str = "Accuracy per class") -> go.Figure:
    """Bar per class of its accuracy (0–1, shown as %); None means no test images."""
    if not per_class:
        return _empty_figure("No evaluation yet.", title)
    vals = [None if v is None else float(v) for v in per_class.values()]
    names = [label_text(n) for n in per_class]
    fig = go.Figure(go.Bar(
        x=names, y=[0.0 if v is None else v for v in vals],
        text=["no test images" if v is None else _pct(v) for v in vals], textposition="outside",
        marker_color=[NA_COLOR if v is None else BAR_COLOR for v in vals], name="accuracy",
        hovertemplate="%{x}: %{text}<extra></extra>", cliponaxis=False))
    known = [v for v in vals if v is not None]
    if known:
        mean = float(np.mean(known))
        fig.add_hline(y=mean, line=dict(color="#888888", dash="dash", width=1),
                      annotation_text=f"mean {_pct(mean)}", annotation_position="top right")
    fig.update_layout(**_base_layout(title, height=380, showlegend=False))
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", title_text="accuracy", gridcolor="#eeeeee")
    fig.update_xaxes(tickangle=_tick_angle(names), automargin=True, type="category")
    return fig


def comparison_figure(results: Mapping[str, float | None], title: str = "Methods compared") -> go.Figure:
    """Bars of each method's accuracy side by side; the best (ties included) highlighted."""
    if not results:
        return _empty_figure("No results to compare yet.", title)
    labels = list(results)
    vals = [None if results[k] is None else float(results[k]) for k in labels]
    known = [v for v in vals if v is not None]
    best = max(known) if known else None
    is_best = [v is not None and best is not None and abs(v - best) < 1e-12 for v in vals]
    fig = go.Figure(go.Bar(
        x=labels, y=[0.0 if v is None else v for v in vals],
        # "★ best" on its own line: side by side, narrow bars' labels ran into each other
        text=[("n/a" if v is None else _pct(v)) + ("<br>★ best" if b else "") for v, b in zip(vals, is_best)],
        textposition="outside", cliponaxis=False, name="accuracy",
        marker=dict(color=[BEST_COLOR if b else (NA_COLOR if v is None else BAR_COLOR)
                           for v, b in zip(vals, is_best)]),
        hovertemplate="%{x}: %{text}<extra></extra>"))
    fig.update_layout(**_base_layout(title, height=380, showlegend=False))
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", title_text="accuracy", gridcolor="#eeeeee")
    fig.update_xaxes(type="category", tickangle=_tick_angle(labels), automargin=True)
    return fig


def accuracy_plot(report: ProtocolReport) -> go.Figure:
    """The K-shot protocol's result (evaluation.ProtocolReport): mean accuracy (%) against shots
    (log₂ axis), one line per method, ± std over the seeds as error bars."""
    shots = list(report.shots)
    fig = go.Figure()
    for m in report.methods:
        label = report.labels.get(m, m)
        fig.add_trace(go.Scatter(
            x=shots, y=[100 * report.mean(m, k) for k in shots], mode="lines+markers", name=label,
            error_y=dict(type="data", array=[100 * report.std(m, k) for k in shots], visible=True),
            hovertemplate="%{x} shots: %{y:.1f}%<extra>" + label + "</extra>"))
    n = len(report.seeds)
    fig.update_layout(
        title=f"Accuracy vs shots (mean ± std over {n} seed{'s' if n != 1 else ''})",
        xaxis=dict(title="shots per class", type="log", tickvals=shots, ticktext=[str(k) for k in shots]),
        yaxis=dict(title="accuracy (%)", range=[0, 105]), legend_title_text="method", template="plotly_white")
    return fig


# ---------------------------------------------------------------- embedding map
MAP_PALETTE = ("#3a6fb0", "#e8590c", "#2e9e5b", "#8a5cb8", "#c2185b", "#00897b", "#f9a825", "#5d4037",
               "#546e7a", "#7cb342", "#6d4c41", "#1e88e5")
OUTLIER_COLOR = "#222222"
UNPREDICTED_NAME = "pool (no prediction)"
SVG_MAX_POINTS = 3000


def embedding_map_figure(coords, groups: Sequence[str], ids: Sequence, names: Sequence[str],
                         examples: Sequence[bool], confidence: Sequence[float | None] | None = None,
                         outliers: Sequence[bool] | None = None, title: str = "Embedding map") -> go.Figure:
    """The embedding map: one point per image at `coords` (N, 2), one trace per group (the
    example's class, or the pool image's predicted class), examples as filled circles and pool
    images as open circles with their confidence as opacity; outliers drawn as crosses. Each
    point's `customdata` is its id (what a click or selection reports); hover shows the name."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        return _empty_figure("No images yet: add examples or pool images to see the map.", title)
    conf = [None] * n if confidence is None else list(confidence)
    out = [False] * n if outliers is None else list(outliers)
    # SVG up to SVG_MAX_POINTS (works in every browser, headless ones included); WebGL beyond
    trace = go.Scatter if n <= SVG_MAX_POINTS else go.Scattergl
    fig = go.Figure()
    order = sorted(set(groups), key=lambda g: (g == UNPREDICTED_NAME, str(g)))
    for k, g in enumerate(order):
        color = NA_COLOR if g == UNPREDICTED_NAME else MAP_PALETTE[k % len(MAP_PALETTE)]
        for is_example in (True, False):
            idx = [i for i in range(n) if groups[i] == g and bool(examples[i]) == is_example]
            if not idx:
                continue
            opac = [1.0 if is_example or conf[i] is None else 0.25 + 0.75 * float(conf[i]) for i in idx]
            symbols = ["x" if out[i] else ("circle" if is_example else "circle-open") for i in idx]
            hover = [f"{label_text(names[i])}<br>{'example of' if is_example else 'pool, predicted'} "
                     f"{label_text(g)}" + ("" if is_example or conf[i] is None else f" ({_pct(conf[i])})")
                     + ("<br><b>none of these classes?</b>" if out[i] else "") for i in idx]
            fig.add_trace(trace(
                x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=label_text(g) + ("" if is_example or g == UNPREDICTED_NAME else " (pool)"),
                legendgroup=str(g), customdata=[ids[i] for i in idx], text=hover, hovertemplate="%{text}<extra></extra>",
                marker=dict(color=[OUTLIER_COLOR if out[i] else color for i in idx], opacity=None,
                            size=10 if is_example else 8, symbol=symbols, line=dict(width=1.5, color=color)),
                selected=dict(marker=dict(size=13)), unselected=dict(marker=dict(opacity=0.35))))
            fig.data[-1].marker.opacity = opac
    fig.update_layout(**_base_layout(title, height=560, dragmode="lasso", clickmode="event+select",
                                     legend=dict(itemsizing="constant")))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return fig
