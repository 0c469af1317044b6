"""What the page shows, from what the use cases (fewshot_studio.app) return: banners and
markdown lines, picker choices, gallery items and captions, model labels, id parsing.
Plain functions; only fewshot_studio.ui imports them."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..app import library, modeling
from ..app.context import ProjectScope, Workspace
from ..app.exports import MANIFEST, FolderExport, usage_snippet
from ..app.library import POOL
from ..app.modeling import PoolPage, PoolRow
from ..backbone import TINY, BackboneSpec
from ..errors import DataError
from ..markup import md
from ..methods import catalog
from ..store import ImageInfo, ModelInfo, NotFoundError

# (value, label) of the backbone picker's presets; any open_clip "name/pretrained" also works.
BACKBONE_PRESETS = (
    ("ViT-B-32/openai", "ViT-B-32 / openai"),
    ("ViT-B-16/openai", "ViT-B-16 / openai (MMA's paper setting)"),
    ("RN50/openai", "RN50 / openai (GraphAdapter's paper setting; not for MMA)"),
    ("ViT-L-14/openai", "ViT-L-14 / openai (large: slow on a CPU)"),
    ("ViT-B-32/laion2b_s34b_b79k", "ViT-B-32 / laion2b_s34b_b79k"),
    (TINY, "tiny — offline test backbone: it only knows coloured shapes"),
)

Gallery = list[tuple[str, str]]  # (thumbnail path, caption)


# ---- backbones and methods --------------------------------------------------------------------------
def backbone_status(ws: Workspace, spec: BackboneSpec | None = None) -> tuple[bool, str]:
    """(whether the backbone loads (the default one, or `spec`: the one last used), a
    one-line markdown banner naming the backbone and the device, or saying in one sentence
    why the weights are unavailable)."""
    st = modeling.backbone_status(ws, spec)
    if st.ok:
        return True, f"**Backbone:** {st.label} · **Device:** {st.device}"
    if ws.hosted:
        how = "Pick another backbone in the Train tab."
    else:
        how = ("Both are in the Train tab (Backbone, Local checkpoint); `tiny` only knows coloured shapes."
               if "tiny" in st.error else
               "In the Train tab pick `tiny` (it only knows coloured shapes) or fill in Local checkpoint.")
    return False, f"⚠️ **Backbone unavailable:** {st.error} {how} · **Device:** {st.device}"


def default_backbone_value(ws: Workspace) -> str:
    s = ws.default_spec
    if s.name == TINY:
        return TINY
    return f"{s.name}/{s.pretrained}" if s.pretrained else s.name


def backbone_choices(ws: Workspace) -> list[tuple[str, str]]:
    """(label, value) pairs for a backbone picker: the default first, then the presets (in
    hosted mode, the allowed backbones). A value is "name/pretrained" or "tiny"; on one's own
    machine any open_clip "name/pretrained" works too."""
    default = default_backbone_value(ws)
    out = [(label, value) for value, label in BACKBONE_PRESETS]
    if ws.hosted:  # only what this public app offers (Workspace.allowed_backbones)
        labels = {value: label for value, label in BACKBONE_PRESETS}
        out = [(labels.get(v, v), v) for v in ws.allowed_backbones()]
    if default not in {v for _, v in out}:
        out.insert(0, (f"{default} (default)", default))
    else:
        out.sort(key=lambda lv: lv[1] != default)
        out[0] = (out[0][0] + ("" if "(default" in out[0][0] else "  · default"), default)
    return out


def method_label(method: str) -> str:
    return catalog.LABELS.get(method, method)


def method_choices(with_auto: bool = False) -> list[tuple[str, str]]:
    """(label, id) of every method in display order; `with_auto` (the Train tab): Auto first."""
    return [(catalog.label(m), m) for m in (catalog.choices() if with_auto else catalog.method_ids())]


# ---- classes --------------------------------------------------------------------------------------
def class_choices(scope: ProjectScope) -> list[tuple[str, str]]:
    """(label with the image count, class name) per class, in class order."""
    counts = library.class_counts(scope)
    return [(f"{c.name} ({counts.get(c.id, 0)})", c.name) for c in library.classes(scope)]


# ---- galleries ------------------------------------------------------------------------------------
def gallery_items(scope: ProjectScope, class_name: str | None) -> tuple[Gallery, list[int]]:
    """Thumbnails of a class (or of the pool for POOL/None) with "#id name" captions, and the
    images' ids in the same order: what a selection in the gallery refers to (selections are
    data, never read back from captions)."""
    imgs = library.images(scope, class_name)
    return [(library.thumbnail(scope.ws, i), f"#{i.id} {i.original_name}") for i in imgs], [i.id for i in imgs]


def image_gallery(scope: ProjectScope, class_name: str | None) -> Gallery:
    return gallery_items(scope, class_name)[0]


def image_by_thumbnail(scope: ProjectScope, class_name: str | None, thumbnail: str) -> ImageInfo:
    """The image of a class (or of the pool, for POOL/None) shown by the gallery thumbnail
    file `thumbnail` (named by library.thumbnail_key of the image's content hash)."""
    key = Path(str(thumbnail or "")).stem
    for img in library.images(scope, class_name):
        if library.thumbnail_key(scope.ws, img.hash) == key:
            return img
    raise NotFoundError("That image is no longer here; the gallery now shows what is.")


def pool_gallery_items(scope: ProjectScope, rows: Sequence[PoolRow] | None = None) -> tuple[Gallery, list[int]]:
    """Pool thumbnails captioned "#id label 87%" in the rows' order (least confident first),
    then the pool images without a prediction; and the images' ids in the same order."""
    pool = {i.id: i for i in library.pool_images(scope)}
    out, ids = [], []
    for r in rows or []:
        if r.image_id in pool:
            out.append((library.thumbnail(scope.ws, pool[r.image_id]), f"#{r.image_id} {r.label} {r.confidence:.0%}"))
            ids.append(r.image_id)
    seen = set(ids)
    for i, img in pool.items():
        if i not in seen:
            out.append((library.thumbnail(scope.ws, img), f"#{i} {img.original_name}"))
            ids.append(i)
    return out, ids


#: Thumbnails a pool gallery shows at once: eight rows of six, a screenful; at about 4 KB a JPEG
#: thumbnail that is ~200 KB per view, where a whole 2,000-image pool fetched 66 MB of PNGs.
POOL_GALLERY_THUMBS = 48


def pool_page_gallery(scope: ProjectScope, page: PoolPage, limit: int = POOL_GALLERY_THUMBS
                      ) -> tuple[Gallery, list[int]]:
    """The first `limit` items of a pool page as thumbnails captioned "#id label 87%" (least
    confident first), then unscored pool images captioned "#id name"; and their ids in order.
    Only these thumbnails are made (a page, never the whole pool)."""
    out, ids = [], []
    for r in page.rows[:limit]:
        out.append((library.thumbnail(scope.ws, page.images[r.image_id]), f"#{r.image_id} {r.label} {r.confidence:.0%}"))
        ids.append(r.image_id)
    for img in page.unscored[:max(0, limit - len(out))]:
        out.append((library.thumbnail(scope.ws, img), f"#{img.id} {img.original_name}"))
        ids.append(img.id)
    return out, ids


def pool_page_note(page: PoolPage, rows: int, thumbs: int) -> str:
    """One sentence on what a paged pool view leaves out ("" when it shows everything): "Showing
    200 of 10,000 scored pool images (3,000 not scored yet); 48 of 13,000 thumbnails."."""
    parts = []
    if page.model_id is not None and (rows < page.scored or page.scored < page.pool):
        parts.append(f"Showing {rows:,} of {page.scored:,} scored pool images, least confident first"
                     + (f" ({page.pool - page.scored:,} not scored yet)" if page.scored < page.pool else ""))
    if thumbs < page.pool:
        parts.append(f"{thumbs:,} of {page.pool:,} thumbnails" if parts else
                     f"Showing {thumbs:,} of {page.pool:,} pool thumbnails")
    return "; ".join(parts) + "." if parts else ""


def pool_gallery(scope: ProjectScope, rows: Sequence[PoolRow] | None = None) -> Gallery:
    return pool_gallery_items(scope, rows)[0]


def top_text(top: Sequence[tuple[str, float]]) -> str:
    """"red circle 97%, blue square 2%, ..." from (class, probability) pairs (PoolRow.top)."""
    return ", ".join(f"{name} {p:.0%}" for name, p in top)


# ---- models ---------------------------------------------------------------------------------------
def model_result(method: str, metrics: dict | None, history: list | None = None) -> list[str]:
    """What a model's training measured, in words, the same wherever it is shown (the progress
    bar's last line, the model line, the model menu): the steps it trained (none for the
    training-free methods), its train accuracy on the plain views and final loss, or, for
    Tip-Adapter, the leave-one-out accuracy of its α/β search. A closed-form method's first
    model (jobs.JobRunner._train) says it was fitted on plain views; the model refining it, which one."""
    metrics = metrics or {}
    parts = []
    if metrics.get("views") == "plain":
        parts.append("first model, on plain views")
    if isinstance(metrics.get("refines"), int):
        parts.append(f"refines #{metrics['refines']} with augmented views")
    steps = metrics.get("steps") or (history[-1].get("step", len(history)) if history else 0)
    if steps:
        parts.append(f"{steps} steps")
    acc = metrics.get("train_accuracy")
    if isinstance(acc, (int, float)):
        parts.append(f"train accuracy {acc:.0%}")
    loo = metrics.get("loo_accuracy")
    if isinstance(loo, (int, float)):
        parts.append(f"leave-one-out accuracy {loo:.0%} "
                     f"(α {metrics.get('alpha', 0):.2f}, β {metrics.get('beta', 0):.2f})")
    loss = metrics.get("final_loss")
    if isinstance(loss, (int, float)):
        parts.append(f"final loss {loss:.4f}")
    auto = metrics.get("auto")
    if isinstance(auto, dict):
        cv = auto.get("cv_accuracy") or {}
        best = cv.get(method)
        parts.append("chosen by Auto" + (f" (cross-validated {best:.0%})" if isinstance(best, (int, float)) else ""))
    return parts


def auto_summary(metrics: dict | None) -> str:
    """What Auto measured, in one line: every candidate's cross-validated accuracy (best first),
    the folds, what it skipped and why; "" for a model Auto did not choose."""
    auto = (metrics or {}).get("auto")
    if not isinstance(auto, dict):
        return ""
    cv = auto.get("cv_accuracy") or {}
    correct = auto.get("correct") or {}
    scores = ", ".join(f"{method_label(m)} {a:.0%}" + (f" ({correct[m]})" if m in correct else "")
                       for m, a in cv.items() if isinstance(a, (int, float)))
    winner = method_label(str(auto.get("winner", "")))
    if scores:
        line = f"Auto cross-validated on {auto.get('folds', 'the examples')}: {scores}; it trained {winner}"
    else:
        line = f"Auto trained {winner}"
    if auto.get("why"):
        line += f" ({md(auto['why'])})"
    skipped = auto.get("skipped") or {}
    if skipped:  # a reason may quote a class name: user text, never markup
        line += ". Not compared: " + "; ".join(f"{method_label(m)} ({md(why)})" for m, why in skipped.items())
    return line + "."


def model_label(m: ModelInfo, with_id: bool = True) -> str:
    """"#5 GraphAdapter on tiny · 8 classes · 300 steps · train accuracy 95% · 2026-11-30 10:02"."""
    cfg = m.config if isinstance(m.config, dict) else {}
    bb = cfg.get("backbone") or {}
    bname = bb.get("name") or m.backbone_id
    if bb.get("pretrained"):
        bname += f"/{bb['pretrained']}"
    parts = [f"{method_label(m.method)} on {bname}", *refit_words(m), f"{len(cfg.get('classes', []))} classes",
             *model_result(m.method, m.metrics, cfg.get("history")),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))]
    return (f"#{m.id} " if with_id else "") + " · ".join(parts)


def refit_words(m: ModelInfo) -> list[str]:
    """["refit 3 of #10 (its search's values reused)"] for an instant refit's model
    (app.modeling.instant_refit), [] for a model trained or imported."""
    lineage = modeling.refit_lineage(m)
    if not lineage:
        return []
    how = "hyper-parameters searched again" if lineage.get("searched") else "hyper-parameters reused"
    return [f"refit {lineage.get('count')} of #{lineage.get('of')} after new labels ({how})"]


def model_summary(scope: ProjectScope) -> str:
    """One markdown line about the current model, or how to get one."""
    m = modeling.current_model_info(scope)
    if m is None:
        return "No model yet: train one in the Train tab."
    line = f"**Model #{m.id}** (current): {model_label(m, with_id=False)}"
    auto = auto_summary(m.metrics)
    return f"{line}\n\n{auto}" if auto else line


def model_choices(scope: ProjectScope) -> tuple[list[tuple[str, int]], int | None]:
    """(label, id) of every model of the project, newest first, and the current model's id."""
    models = modeling.models(scope)
    current = modeling.current_model_info(scope)
    return [(model_label(m), m.id) for m in models], (current.id if current else None)


def usage(scope: ProjectScope) -> str:
    """The Python snippet for the current model."""
    _, method = modeling.current_model(scope)
    return usage_snippet(method)


# ---- input parsing ---------------------------------------------------------------------------------
def parse_image_ids(text: str | Iterable | None) -> list[int]:
    """Image ids from a list of ids ("12, 15 16", "#12", or a list); order kept, duplicates
    dropped. Anything that is not an id is refused in one sentence, never mined for digits
    (a file name such as "oc_2.png" is not image 2)."""
    if text is None:
        return []
    tokens = re.split(r"[,\s]+", text.strip()) if isinstance(text, str) else [str(t).strip() for t in text]
    out: list[int] = []
    for tok in tokens:
        if not tok:
            continue
        m = re.fullmatch(r"#?(\d{1,18})", tok)
        if m is None:
            raise DataError(f"{tok[:40]!r} is not an image id; select images by clicking them.")
        if int(m.group(1)) not in out:
            out.append(int(m.group(1)))
    return out


def renamed_folders(export: FolderExport) -> str:
    """" 3 class names were changed to be safe folder names; see manifest.json." (nothing when
    every class kept its name): the ImageFolder export's notice."""
    n = export.renamed
    if not n:
        return ""
    what = "1 class name was changed to be a safe folder name" if n == 1 else \
        f"{n} class names were changed to be safe folder names"
    return f" {what}; see {MANIFEST} in the zip."


__all__ = ["BACKBONE_PRESETS", "POOL", "auto_summary", "backbone_choices", "backbone_status", "class_choices",
           "default_backbone_value", "gallery_items", "image_by_thumbnail", "image_gallery", "method_choices",
           "method_label", "model_choices", "model_label", "model_result", "model_summary", "parse_image_ids",
           "pool_gallery", "pool_gallery_items", "pool_page_gallery", "pool_page_note", "renamed_folders", "top_text", "usage", "usage_snippet"]


def label_for(method: str, key: str) -> str:
    """An advanced setting's label: "GraphAdapter · optimizer steps" (the catalog's help text)."""
    return f"{catalog.label(method)} · {catalog.setting_help(method, key)}"


def eta_text(state, now: float | None = None) -> str:
    """" · about 1 min 20 s left" for the current stage, from its pace so far (nothing until
    the pace is known: a few seconds and a few percent in)."""
    started = getattr(state, "stage_started", None)
    f = state.fraction
    if started is None or not 0.03 <= f < 1.0:
        return ""
    spent = (now or time.time()) - started
    if spent < 2.0:
        return ""
    left = spent * (1.0 - f) / f
    return f" · about {duration_text(left)} left"


def duration_text(seconds: float) -> str:
    seconds = max(1, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s} s" if s else f"{m} min"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def missing_notice(scope: ProjectScope) -> str:
    """One sentence when some of the project's image files are gone (they show as placeholders)."""
    gone = library.missing_images(scope)
    if not gone:
        return ""
    names = ", ".join(f"#{i.id} {md(i.original_name)}" for i in gone[:3]) + (", …" if len(gone) > 3 else "")
    files = "image file is" if len(gone) == 1 else "image files are"
    return (f"{len(gone)} {files} missing from the data folder ({names}), shown as grey placeholders; "
            "remove them here, or run `python -m fewshot_studio doctor` to check the folder.")



# ---- the labeling station (ui/station.py) ------------------------------------------------------------
#: How the station's strategy picker names acquisition.STRATEGIES (unknown ones show as they are).
STRATEGY_LABELS = {"least-confident": "Least confident first", "margin": "Smallest margin first",
                   "entropy": "Highest entropy first", "diverse": "Diverse batch of the uncertain",
                   "outliers-first": "Unlike every class first (after Inspect)",
                   "outliers-last": "Unlike every class last (after Inspect)"}
#: Grid sorts (app.station.queue's `sort`); "" keeps the queue's order.
GRID_SORTS = (("Queue order", ""), ("Confidence, lowest first", "confidence"),
              ("Margin, smallest first", "margin"), ("Entropy, highest first", "entropy"))


def file_url(path: str | Path) -> str:
    """The URL Gradio serves an allowed file at (the thumbnails folder is allowed: StudioBlocks.launch),
    relative to the page so the app also works under a proxy's sub-path."""
    from urllib.parse import quote

    return "gradio_api/file=" + quote(str(path))


def percent(p: float) -> str:
    """A probability as a whole percent, never "100%" or "0%" for what is not certain: 0.996 -> "99.6%",
    0.0004 -> "<0.1%", 0.9996 -> ">99.9%"."""
    p = float(p)
    if 0.0 < p < 0.001:
        return "<0.1%"
    if 0.999 < p < 1.0:
        return ">99.9%"
    if 0.0 < p < 0.01 or 0.99 < p < 1.0:
        return f"{100 * p:.1f}%"
    return f"{p:.0%}"


def station_classes(class_names: Sequence[str], top: Sequence[tuple[str, float]], keys: int = 9
                    ) -> list[tuple[str, float | None]]:
    """The classes the review's numbered buttons show, in key order, with their probability when
    the model gave it (the top classes it stored). Up to `keys` classes: all of them in class
    order, so a key always means the same class (muscle memory beats re-reading buttons); with more
    classes than keys, the model's top classes first, then the others in class order."""
    probs = dict(top)
    names = list(class_names)
    if len(names) > keys:
        names = [n for n, _ in top if n in names] + [n for n in names if n not in probs]
    return [(n, probs.get(n)) for n in names[:keys]]


def class_button_text(key: int, name: str, p: float | None) -> str:
    """"1 · red circle · 87%": the key that presses it, the class, the model's probability."""
    return f"{key} · {name}" + (f" · {percent(p)}" if p is not None else "")


def counters_html(c, shown_model_label: str | None = None, note: str = "") -> str:
    """The station's counters line from app.station.Counters; `shown_model_label` names the model
    whose predictions are on screen (it can lag the current model until the refresh); `note`: the
    queue's one sentence (QueuePage.note), if any."""
    import html

    per = " · ".join(f"{html.escape(n)} {k}" for n, k in c.per_class.items()) or "no classes"
    cv = f"{c.cv_accuracy:.0%}" if isinstance(c.cv_accuracy, (int, float)) else "not measured"
    model = shown_model_label if shown_model_label is not None else c.model_label
    return (f'<div class="fs-counters"><span><b>{c.labeled_today}</b> labeled today</span>'
            f'<span><b>{c.pool_left}</b> left in the pool</span><span>{per}</span>'
            f'<span>cross-validated accuracy <b>{cv}</b></span>'
            f'<span class="fs-model">predictions by <b>{html.escape(model or "no model")}</b></span>'
            + (f'<span class="fs-hint">{html.escape(note)}</span>' if note else "") + "</div>")


def history_html(actions: Sequence, now: float | None = None) -> str:
    """The session's last actions (app.station.Action), newest first, with how long ago."""
    import html

    if not actions:
        return '<ol class="fs-history"><li class="fs-hint">No labeling actions yet.</li></ol>'
    now = time.time() if now is None else now
    rows = []
    for a in actions:
        ago = duration_text(now - a.created) + " ago" if now - a.created >= 1 else "just now"
        note = f" {html.escape(a.note)}" if a.note else ""
        rows.append(f'<li data-kind="{html.escape(a.kind)}">{html.escape(a.summary)}{note} '
                    f'<span class="fs-hint">{ago}</span></li>')
    return '<ol class="fs-history">' + "".join(rows) + "</ol>"


def review_html(item, thumb: str | None, position: int, total: int) -> str:
    """The image under review (a QueueItem and its thumbnail), large, with what the model says; or
    why there is nothing to review. `data-image-id` tells station.js which image is on screen."""
    import html

    if item is None:
        why = "The pool is empty, or it has no predictions yet: add pool images and press Label the pool."
        return f'<div class="fs-review fs-empty" data-image-id="">{why}</div>'
    return (f'<figure class="fs-review" data-image-id="{int(item.image_id)}">'
            f'<img src="{html.escape(file_url(thumb))}" alt="{html.escape(item.name)}">'
            f'<figcaption aria-live="polite"><b>{html.escape(item.label)}</b> {percent(item.confidence)} · '
            f'{html.escape(item.name)} · {position + 1} of {total}</figcaption></figure>')


def strip_html(items: Sequence, thumbs: dict, previews: dict | None = None) -> str:
    """The next images of the queue as small thumbnails, and the large review images of the
    next few (`previews`, hidden): loaded now, so the next review image is already in the
    browser's cache when it comes (prefetch)."""
    import html

    tiles = "".join(f'<img src="{html.escape(file_url(thumbs[i.image_id]))}" alt="next: {html.escape(i.name)}" '
                    f'title="{html.escape(i.label)} {percent(i.confidence)}" loading="eager">'
                    for i in items if i.image_id in thumbs)
    ahead = "".join(f'<img src="{html.escape(file_url(p))}" alt="" hidden loading="eager">'
                    for p in (previews or {}).values())
    return f'<div class="fs-strip" aria-label="next in the queue">{tiles}{ahead}</div>'


def grid_html(items: Sequence, thumbs: dict) -> str:
    """A page of pool thumbnails, each a focusable tile carrying its image id (`data-image-id`)
    and the prediction; station.js keeps the selection (click, shift-click, drag, Space)."""
    import html

    if not items:
        return '<div class="fs-grid fs-empty">No pool images match: widen the filter, or label the pool.</div>'
    tiles = "".join(
        f'<div class="fs-tile" role="option" tabindex="0" aria-selected="false" data-image-id="{int(i.image_id)}"'
        f' title="{html.escape(i.name)}"><img src="{html.escape(file_url(thumbs[i.image_id]))}" alt="" '
        f'draggable="false"><span>{html.escape(i.label)} {percent(i.confidence)}</span></div>'
        for i in items if i.image_id in thumbs)
    return ('<p id="fs-grid-count" class="fs-hint" aria-live="polite"></p>'
            f'<div class="fs-grid" role="listbox" aria-multiselectable="true" aria-label="pool images">{tiles}</div>')


def page_text(offset: int, shown: int, total: int) -> str:
    """"Images 49–96 of 310" for the grid's pager."""
    if not total or not shown:
        return f"No images (of {total})." if total else "No images."
    return f"Images {offset + 1}–{offset + shown} of {total}"


def class_names(scope: ProjectScope) -> list[str]:
    """The project's class names in class order (the station's numbered buttons follow it)."""
    return [c.name for c in library.classes(scope)]


def thumbnails(scope: ProjectScope, image_ids: Iterable[int], size: int = library.THUMB_SIZE) -> dict[int, str]:
    """{image id: thumbnail path} of these images of the project at `size` px (an image gone
    meanwhile is left out)."""
    out = {}
    for i in image_ids:
        try:
            out[int(i)] = library.thumbnail(scope.ws, library.image(scope, i), size)
        except NotFoundError:
            continue
    return out


def label_import(result) -> str:
    """The notice after importing Label Studio labels (app.exports.LabelImport)."""
    parts = [f"Imported {result.labeled} label{'s' if result.labeled != 1 else ''} from Label Studio"]
    if result.unchanged:
        parts.append(f"{result.unchanged} already so")
    if result.unlabeled:
        parts.append(f"{result.unlabeled} task{'s' if result.unlabeled != 1 else ''} without a label")
    if result.unmatched:
        parts.append(f"{result.unmatched} whose image is not in this project")
    return "; ".join(parts) + "." + (" Undo takes the import back." if result.labeled else "")


def imported_text(r) -> str:
    """The notice after importing labeled Parquet predictions (app.pool_import.PredictionImport)."""
    text = (f"Imported predictions for {r.matched:,} pool image{'s' if r.matched != 1 else ''} as those of "
            f"{r.model}, least confident first below.")
    if r.not_in_pool:
        text += (f" {r.not_in_pool:,} row{'s' if r.not_in_pool != 1 else ''} named images that are not in this "
                 "project's pool (add the images themselves, e.g. as a zip, then import again).")
    if r.errors:
        text += f" {r.errors:,} row{'s' if r.errors != 1 else ''} were files the labeling job could not read."
    return text
