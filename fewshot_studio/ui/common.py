"""Shared pieces of the page: the per-page context, error handling, owners, progress HTML, CSS."""
from __future__ import annotations

import functools
import html
import logging
import re
from typing import Any, Callable

import gradio as gr

from ..errors import FewShotError
from ..jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED
from ..service import Studio

log = logging.getLogger("fewshot_studio.ui")


class UI:
    """Everything the builder functions share: the Studio, session state and components.

    Builders add components as attributes; `views` collects functions that, given a project
    id and owner, return {component: value} to show that project (called whenever the
    current project changes), and `view_outputs` the components they update.
    """

    def __init__(self, studio: Studio):
        self.studio = studio
        self.views: list[Callable[[Any, Any], dict]] = []
        self.view_outputs: list[gr.components.Component] = []

    def add_view(self, fn: Callable[[Any, Any], dict], outputs: list) -> None:
        self.views.append(fn)
        self.view_outputs.extend(o for o in outputs if o not in self.view_outputs)

    def project_views(self, project_id, owner) -> dict:
        out: dict = {}
        for fn in self.views:
            out.update(fn(project_id, owner))
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
    """Show a user-caused error as its one sentence (gr.Error), never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except FewShotError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page must keep working
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise gr.Error(f"Something went wrong: {first}", print_exception=False) from None

    return wrapper


def need_project(project_id) -> int:
    if project_id in (None, ""):
        raise FewShotError("Create or open a project first (the Project bar at the top).")
    return int(project_id)


def ids_from_caption(caption: str | None) -> int | None:
    m = re.match(r"\s*#(\d+)", caption or "")
    return int(m.group(1)) if m else None


def selected_caption(evt: gr.SelectData) -> str | None:
    v = evt.value
    if isinstance(v, dict):
        return v.get("caption")
    return v if isinstance(v, str) else None


_STATUS_TEXT = {QUEUED: "Queued", "running": "Training", DONE: "Finished", FAILED: "Failed",
                CANCELLED: "Cancelled"}


def progress_html(state=None, idle: str = "No training running.") -> str:
    """A progress bar with stage text for a JobState (or an idle line)."""
    if state is None:
        return (f'<div class="fs-progress" data-status="idle"><div class="fs-bar"><div class="fs-fill" '
                f'style="width:0%"></div></div><div class="fs-stage">{html.escape(idle)}</div></div>')
    status = state.status
    pct = 100 if status == DONE else int(round(100 * max(0.0, min(1.0, state.fraction))))
    head = "" if status == "running" else _STATUS_TEXT.get(status, status.title())  # the stage says it
    text = state.describe()
    if status == DONE:
        steps = f"{state.total} steps" if state.total else ""
        text = " · ".join(x for x in (f"in {state.elapsed:.1f} s", steps, _metrics(state), state.message) if x)
    elif status in (FAILED, CANCELLED):
        text = state.message
    return (f'<div class="fs-progress fs-{status}" data-status="{status}">'
            f'<div class="fs-bar"><div class="fs-fill" style="width:{pct}%"></div></div>'
            f'<div class="fs-stage"><b>{html.escape(head)}</b> {html.escape(text.strip())}</div></div>')


def _metrics(state) -> str:
    parts = []
    if state.loss is not None:
        parts.append(f"final loss {state.loss:.4f}")
    if state.accuracy is not None:
        parts.append(f"train accuracy {state.accuracy:.0%}")
    return " · ".join(parts)


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


def refused_text(errors: list[str], limit: int = 20) -> str:
    if not errors:
        return ""
    shown = "; ".join(errors[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f" Refused {len(errors)} file{'s' if len(errors) != 1 else ''}: {shown}{more}"


CSS = """
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
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate")


__all__ = ["CSS", "FINISHED", "UI", "files_of", "friendly", "ids_from_caption", "need_project", "progress_html",
           "refused_text", "selected_caption", "theme", "who"]
