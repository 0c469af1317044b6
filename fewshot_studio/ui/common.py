"""Shared pieces of the page: the per-page context, error handling, owners, progress HTML, CSS."""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
from typing import Any, Callable, Iterator

import gradio as gr

from ..errors import FewShotError
from ..markup import html_text, no_paths
from ..jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED
from ..app.context import ProjectScope, Workspace
from .presenters import eta_text, md, method_label, model_result
from .uploads import discard

log = logging.getLogger("fewshot_studio.ui")


class UI:
    """Everything the builder functions share: the Workspace, session state and components.

    Builders add components as attributes; `views` collects functions that, given a project
    id and owner, return {component: value} to show that project (called whenever the
    current project changes), and `view_outputs` the components they update.
    """

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.views: list[Callable[[Any, Any], dict]] = []
        self.view_outputs: list[gr.components.Component] = []
        self.model_views: list[Callable[[Any, Any], dict]] = []
        self.model_view_outputs: list[gr.components.Component] = []

    def add_view(self, fn: Callable[[Any, Any], dict], outputs: list, model: bool = False) -> None:
        """Register what shows a project; `model`: it shows the current model too, so it is
        also called whenever the current model changes (training, import, the Model menu)."""
        self.views.append(fn)
        self.view_outputs.extend(o for o in outputs if o not in self.view_outputs)
        if model:
            self.model_views.append(fn)
            self.model_view_outputs.extend(o for o in outputs if o not in self.model_view_outputs)

    def scope(self, project_id, owner) -> ProjectScope:
        """The session's project, access checked (one sentence when there is none)."""
        return self.ws.scope(need_project(project_id), owner)

    def project_views(self, project_id, owner) -> dict:
        """{component: value} of everything that shows the project."""
        return self._views(self.views, project_id, owner)

    def current_model_views(self, project_id, owner) -> dict:
        """{component: value} of everything that shows the current model."""
        return self._views(self.model_views, project_id, owner)

    @staticmethod
    def _views(fns, project_id, owner) -> dict:
        # a view that breaks on bad luck (a damaged file, a vanished record) leaves its own
        # components as they were; it never turns the whole page into "Error"
        out: dict = {}
        for fn in fns:
            try:
                out.update(fn(project_id, owner))
            except Exception:  # noqa: BLE001
                log.exception("a view of project %s failed", project_id)
        return out


def unchanged(outputs: list) -> dict:
    """An update that leaves every output as it is (an empty dict would count as one value)."""
    return {o: gr.skip() for o in outputs}


def who(owner: str | None, request: gr.Request | None) -> str | None:
    """The session's owner token: remembered by the browser, else this connection's session."""
    if owner:
        return owner
    return getattr(request, "session_hash", None) if request is not None else None


def friendly(fn: Callable) -> Callable:
    """Show a user-caused error as its one sentence (gr.Error), never a stack trace. A generator
    handler (one that follows a job) stays a generator, so Gradio streams its updates."""

    def translated(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, FewShotError):  # its sentence may quote user text (a name, a file)
            return gr.Error(toast_text(no_paths(str(e))), print_exception=False)
        log.exception("handler %s failed", getattr(fn, "__name__", fn))  # the page must keep working
        first = no_paths((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]  # no server paths
        return gr.Error(toast_text(f"Something went wrong: {first}"), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise translated(e) from None
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise translated(e) from None

    return wrapper


POLL_SECONDS = 0.5  # how often the page shows a job's progress (the training timer, followed jobs)


def follow(ws: Workspace, job_id: str, bar) -> Iterator[dict]:
    """Yield {bar: the job's progress bar} every POLL_SECONDS until the job finishes, then return
    its final JobState (`state = yield from follow(...)`). The bar is the one training uses:
    cross-validation and pool labeling show their progress the same way."""
    while True:
        state = ws.runner.wait(job_id, timeout=POLL_SECONDS)
        if state.status in FINISHED:
            return state
        yield {bar: progress_html(state)}


def need_project(project_id) -> int:
    if project_id in (None, ""):
        raise FewShotError("Create or open a project first (the Project bar at the top).")
    return int(project_id)


def picked(ids: list | None, evt: gr.SelectData) -> int | None:
    """The id of the item a select event picked, by its position in `ids` (the ids the view
    showed, in order): selections are data, never read back from captions."""
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    try:
        return int(ids[int(index)])
    except (TypeError, ValueError, IndexError):
        return None


_STATUS_TEXT = {QUEUED: "Queued", "running": "", DONE: "Finished", FAILED: "Failed", CANCELLED: "Cancelled"}


def progress_html(state=None, idle: str = "No training running.") -> str:
    """A progress bar with stage text (and the time left) for a JobState, or an idle line. A
    finished training says what the saved model measured (the same words as its model line)."""
    if state is None:
        return status_bar("idle", 0, "", idle)
    status = state.status
    pct = 100 if status == DONE else int(round(100 * max(0.0, min(1.0, state.fraction))))
    text = state.describe()
    if status == DONE:
        info = state.result
        parts = [f"in {state.elapsed:.1f} s"]
        if hasattr(info, "metrics"):  # a registered model (ModelInfo)
            cfg = info.config if isinstance(info.config, dict) else {}
            parts += model_result(info.method, info.metrics, cfg.get("history"))
            parts.append(f"model #{info.id} ({method_label(info.method)}) is now current")
        text = " · ".join([*parts, state.message] if state.message else parts)
    elif status in (FAILED, CANCELLED):
        text = state.message
    elif status == "running":
        text += eta_text(state)
    return status_bar(status, pct, _STATUS_TEXT.get(status, status.title()), text)


def status_bar(status: str, pct: int, head: str, text: str) -> str:
    """The bar's HTML; `data-status` names the state (the CSS and the tests read it)."""
    return (f'<div class="fs-progress fs-{status}" data-status="{status}">'
            f'<div class="fs-bar"><div class="fs-fill" style="width:{pct}%"></div></div>'
            f'<div class="fs-stage"><b>{html.escape(head)}</b> {html.escape(text.strip())}</div></div>')


def files_of(value) -> list[str]:
    """Paths from a gr.File value (None, one path, or a list of paths / file objects)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        path = getattr(v, "name", None) or getattr(v, "path", None) or v
        if isinstance(path, dict):
            path = path.get("path") or path.get("name")
        if path:
            out.append(str(path))
    return out


@contextlib.contextmanager
def consumed(value) -> Iterator[list[str]]:
    """The paths of a gr.File value, deleted from Gradio's upload folder when the block ends
    (accepted, refused or failed alike): the handler owns the upload, and what it stored lives
    in the data dir, so the temporary copy would only fill the disk (uploads.discard)."""
    paths = files_of(value)
    try:
        yield paths
    finally:
        discard(paths)


def toast_text(text: str) -> str:
    """User text for a toast (Gradio renders toasts as sanitized HTML): shown, never markup."""
    return html_text(text)


def added_text(added: int, duplicates: int, where: str) -> str:
    """"Added N images {where}." and, if any upload was a duplicate, how many were not stored
    again: the count is of what was stored, never of what was sent."""
    text = f"Added {added} image{'s' if added != 1 else ''} {where}."
    if duplicates:
        text += (f" {duplicates} duplicate{'s' if duplicates != 1 else ''} (the same bytes as an image already "
                 f"there) {'were' if duplicates != 1 else 'was'} not stored again.")
    return text


def refused_text(errors: list[str], limit: int = 20, escape: Callable[[str], str] = md) -> str:
    """" Refused N files: …" for a notice (Markdown, `md`) or a toast (`toast_text`); the
    sentences name uploaded files, which are user text."""
    if not errors:
        return ""
    shown = "; ".join(escape(e) for e in errors[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f" Refused {len(errors)} file{'s' if len(errors) != 1 else ''}: {shown}{more}"


CSS = """
/* every event's progress and error status goes to this hidden element (StudioBlocks), so a
   user error never turns the page's components into red "Error" badges */
.fs-sink { display: none !important; }
/* galleries: as many columns as fit (a fixed count cut thumbnails off in narrow boxes) */
#class-gallery .grid-container, #pool-gallery .grid-container {
    grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)) !important; grid-template-rows: none !important; }
#class-gallery .thumbnail-item, #pool-gallery .thumbnail-item { min-width: 0; }
/* the gallery's label sits above the thumbnails, never over them */
#class-gallery > label, #pool-gallery > label, #class-gallery .block-label, #pool-gallery .block-label {
    position: static !important; }
/* what is selected shows: the clicked thumbnail, and pool items marked ✓ */
.thumbnail-item.selected { outline: 3px solid var(--color-accent) !important; outline-offset: 1px; }
#example-select { min-width: 260px; }
/* the class gallery removes images one by one (✕ per thumbnail); its clear-all would only empty the view */
#class-gallery button[aria-label="Clear"] { display: none; }
#fs-header { align-items: center; gap: 12px; }
#fs-header h1 { margin: 0; font-size: 1.7rem; }
#fs-header .fs-tagline { color: var(--body-text-color-subdued); margin: 0; }
#status-banner { padding: 6px 12px; border-radius: 8px; background: var(--background-fill-secondary); }
#status-banner p { margin: 0; }
#notice { min-height: 1.6em; }
#notice p { margin: 2px 0; }
.fs-progress { width: 100%; }
.fs-bar { width: 100%; height: 14px; border-radius: 7px; background: var(--background-fill-secondary);
          overflow: hidden; border: 1px solid var(--border-color-primary); }
.fs-fill { height: 100%; background: linear-gradient(90deg, #6366f1, #22c55e); transition: width .4s ease; }
.fs-failed .fs-fill { background: #dc2626; }
.fs-cancelled .fs-fill { background: #9ca3af; }
.fs-stage { margin-top: 6px; font-size: 0.95rem; }
.fs-inline { align-items: flex-end !important; }
.fs-inline > button { flex: 0 0 auto !important; width: auto !important; min-width: 110px !important;
                      white-space: nowrap; align-self: flex-end; margin: 0 4px 6px 4px; }
.fs-hint { color: var(--body-text-color-subdued); font-size: 0.9rem; }
/* the labeling station (ui/station.py, ui/station.js) */
#station { padding: 8px; }
.fs-counters { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 0.95rem; }
.fs-review { margin: 0; text-align: center; }
.fs-review img { width: 100%; max-width: 420px; aspect-ratio: 1; object-fit: contain; border-radius: 8px;
                 background: var(--background-fill-secondary); }
.fs-review figcaption { margin-top: 4px; font-size: 1.05rem; overflow-wrap: anywhere; }
.fs-review.fs-empty, .fs-grid.fs-empty { padding: 24px; color: var(--body-text-color-subdued); }
.fs-class-btn { font-size: 1.1rem !important; min-height: 48px; justify-content: flex-start !important;
                text-align: left; white-space: normal; overflow-wrap: anywhere; }
.fs-strip { display: flex; gap: 6px; overflow-x: auto; padding: 4px 0; }
.fs-strip img { width: 64px; height: 64px; object-fit: contain; flex: 0 0 auto; border-radius: 4px;
                background: var(--background-fill-secondary); }
.fs-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(110px, 1fr)); gap: 6px;
           user-select: none; }
.fs-tile { position: relative; border: 2px solid transparent; border-radius: 6px; cursor: pointer;
           background: var(--background-fill-secondary); padding: 2px; text-align: center; }
.fs-tile img { width: 100%; aspect-ratio: 1; object-fit: contain; display: block; pointer-events: none; }
.fs-tile span { display: block; font-size: 0.8rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.fs-tile[aria-selected="true"] { border-color: var(--color-accent); background: var(--color-accent-soft); }
.fs-tile[aria-selected="true"]::after { content: "✓"; position: absolute; top: 2px; right: 6px; font-weight: bold;
                                        color: var(--color-accent); }
/* focus shows, always (keyboard users see where they are) */
.fs-class-btn:focus-visible, .fs-tile:focus-visible, #station button:focus-visible {
    outline: 3px solid var(--color-accent) !important; outline-offset: 2px; }
.fs-keys { padding: 8px; border-radius: 6px; background: var(--background-fill-secondary); }
kbd { border: 1px solid var(--border-color-primary); border-radius: 4px; padding: 0 4px; font-family: monospace; }
.fs-history { margin: 0; padding-left: 1.4em; font-size: 0.9rem; }
/* a phone-width page (400 px): one column, buttons full width, smaller tiles */
@media (max-width: 480px) {
  #station .row { flex-direction: column !important; }
  #station .row > * { width: 100% !important; min-width: 0 !important; }
  .fs-grid { grid-template-columns: repeat(auto-fill, minmax(84px, 1fr)); }
  .fs-review img { max-width: 100%; }
}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate")


__all__ = ["CSS", "FINISHED", "UI", "consumed", "files_of", "friendly", "need_project", "picked", "progress_html",
           "refused_text", "theme", "who"]
