"""User text (project, class and file names) inside Markdown or HTML: shown exactly as typed,
never as markup. One definition for the notices (`ui`), the evaluation tables (`evaluation`),
the toasts (`ui`) and the plot labels (`viz`)."""
from __future__ import annotations

import re

# the punctuation Markdown or HTML could act on (CommonMark lets a backslash escape every ASCII
# punctuation mark; ':' and '.' too, so no bare URL or www. address becomes a link)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&:])")


def md(text) -> str:
    """`text` for a Markdown document: backslash-escaped, so it cannot become a link, an image,
    HTML or emphasis; newlines become spaces (a name never starts a block)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def html_text(text) -> str:
    """`text` for HTML (Gradio toasts render sanitized HTML; plotly renders <a>, <span>, <b>
    in labels and turns entities back into characters): & < > escaped."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# an absolute path (POSIX /a/b... with at least one folder, or Windows C:\a...) that is not part
# of a URL or of a relative path
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])(?:/(?:[^\s/'\"`<>|]+/)+[^\s/'\"`<>|]*"
                       r"|[A-Za-z]:\\(?:[^\s\\'\"`<>|]+\\)*[^\s\\'\"`<>|]*)")


def no_paths(text) -> str:
    """`text` with every absolute path cut to its last part (a file's or folder's name): a
    sentence a visitor sees never shows where the server keeps its data."""
    def name(m: re.Match) -> str:
        parts = [p for p in re.split(r"[/\\]", m.group(0)) if p]
        return parts[-1] if parts else m.group(0)

    return _ABS_PATH.sub(name, str(text))
