"""Uploads cannot fill the disk: a per-visitor (and overall) budget on the bytes Gradio's upload
routes accept in hosted mode, and handlers delete an upload's temporary file once they have
read it (accepted or refused), since nothing else would before Gradio's age-based sweep."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("fewshot_studio.ui")

#: Bytes one visitor (one client address) may upload per UPLOAD_WINDOW_S in hosted mode.
UPLOAD_BYTES_PER_VISITOR = 1 * 2**30
#: Bytes all visitors together may upload per UPLOAD_WINDOW_S in hosted mode (bounds the disk
#: even when many addresses share the work, or one proxy address hides every visitor).
UPLOAD_BYTES_TOTAL = 4 * 2**30
UPLOAD_WINDOW_S = 3600.0
#: Gradio's own routes that write a request's body to disk.
UPLOAD_ROUTES = ("/upload", "/process_recording")


def _gib(n: float) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


class UploadBudget:
    """Sliding-window byte counts per visitor and in total; `charge` says why an upload is
    refused (one sentence) or records it and returns None."""

    def __init__(self, per_visitor: int = UPLOAD_BYTES_PER_VISITOR, total: int = UPLOAD_BYTES_TOTAL,
                 window: float = UPLOAD_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.per_visitor, self.total, self.window, self.clock = per_visitor, total, window, clock
        self._lock = threading.Lock()
        self._spent: dict[str, collections.deque] = {}
        self._all: collections.deque = collections.deque()

    @staticmethod
    def _used(q: collections.deque, since: float) -> int:
        while q and q[0][0] < since:
            q.popleft()
        return sum(n for _, n in q)

    def charge(self, visitor: str, nbytes: int) -> str | None:
        minutes = f"{self.window / 60:g} minutes"
        with self._lock:
            now = self.clock()
            since = now - self.window
            mine = self._spent.setdefault(visitor, collections.deque())
            if self._used(mine, since) + nbytes > self.per_visitor:
                return (f"You have uploaded the most this server accepts from one visitor "
                        f"({_gib(self.per_visitor)} per {minutes}); try again later.")
            if self._used(self._all, since) + nbytes > self.total:
                return (f"The server has taken in all the uploads it accepts for now "
                        f"({_gib(self.total)} per {minutes} from all visitors); try again later.")
            mine.append((now, nbytes))
            self._all.append((now, nbytes))
            for key in [k for k, q in self._spent.items() if not q]:  # forget quiet visitors
                del self._spent[key]
            return None


def visitor_of(scope: dict) -> str:
    """The visitor's address: the last X-Forwarded-For entry (the one the nearest proxy, e.g. a
    Space's, wrote; earlier entries are whatever the client claimed), else the peer's address."""
    for name, value in scope.get("headers") or []:
        if name == b"x-forwarded-for":
            last = value.decode("latin-1").split(",")[-1].strip()
            if last:
                return last
    client = scope.get("client")
    return client[0] if client else "?"


class UploadBudgetMiddleware:
    """ASGI middleware in front of Gradio's upload routes: an upload must declare its size
    (Content-Length; the server then reads no more than that) and fit the visitor's budget, or
    it is refused with one sentence before a byte of it reaches the disk."""

    def __init__(self, app, budget: UploadBudget | None = None):
        self.app = app
        self.budget = budget or UploadBudget()

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("method") == "POST" \
                and scope.get("path", "").rstrip("/").endswith(UPLOAD_ROUTES):
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if not length.strip().isdigit():
                return await _refuse(send, 411, "An upload must say its size (a Content-Length header).")
            refusal = self.budget.charge(visitor_of(scope), int(length))
            if refusal is not None:
                return await _refuse(send, 413, refusal)
        await self.app(scope, receive, send)


async def _refuse(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def upload_folder() -> Path:
    """Where Gradio keeps uploads (GRADIO_TEMP_DIR, else <tmp>/gradio)."""
    import tempfile

    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def discard(paths: Iterable[str | os.PathLike | None]) -> int:
    """Delete uploaded files (and their now-empty folder) once a handler has read them; only
    files inside Gradio's upload folder, never anything else. Returns how many went."""
    base = upload_folder()
    n = 0
    for p in paths:
        if not p:
            continue
        try:
            path = Path(p).resolve()
            if base not in path.parents:
                continue
            path.unlink()
            n += 1
            if path.parent != base:
                path.parent.rmdir()  # Gradio's per-upload folder; kept when another file is in it
        except OSError:
            pass
    return n


def served_copy(path: str | os.PathLike) -> str:
    """Where Gradio will keep the copy of an output file it serves (its cache folder, a folder
    named by the seeded hash of the content, the file's name), so a handler can delete the
    copy of its previous output when it makes a new one. A guess at Gradio's layout: if it is
    wrong, `discard` finds nothing and the copy goes with Gradio's age-based sweep."""
    from gradio import processing_utils

    # the name as Gradio cleans it (its own helper, through the module that uses it)
    name = processing_utils.client_utils.strip_invalid_filename_characters(Path(path).name)
    return str(upload_folder() / processing_utils.hash_file(path) / name)
