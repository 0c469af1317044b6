"""Projects: create, list, rename, delete; links that share a project (hosted mode); the project
to reopen; the bundled example projects."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError, FewShotError
from ..store import Project, ValidationError
from .context import ProjectScope, Workspace

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "examples"

EXAMPLES: dict[str, dict] = {
    "shapes": {
        "title": "Coloured shapes (offline)",  # what each needs: the menu's info line
        "project": "Example: coloured shapes",
        "descriptions": {},
    },
    "textile": {
        "title": "Textile defects (photos)",
        "project": "Example: textile defects",
        "descriptions": {
            "nominal": "a fabric surface with no defect.",
            "local defect": "a fabric surface with a small local flaw.",
            "global defect": "a fabric surface with a defect across the whole texture.",
        },
    },
}


def create_project(ws: Workspace, name: str, owner: str | None = None) -> Project:
    return ws.store.create_project(name, owner=ws.owner_of(owner))


def list_projects(ws: Workspace, owner: str | None = None) -> list[Project]:
    """The projects this owner sees, most recently changed first (hosted mode: none without an owner)."""
    if ws.hosted:
        return ws.store.list_projects(owner=owner) if owner else []
    return ws.store.list_projects()


def is_owner(scope: ProjectScope) -> bool:
    """Whether the scope's session created the project (always, outside hosted mode)."""
    return not scope.ws.hosted or scope.project.owner == scope.owner


def need_owner(scope: ProjectScope, action: str) -> None:
    """Members (sessions that joined by the link) view and label; only the creator may `action`."""
    if not is_owner(scope):
        raise ValidationError(f"Only the session that created this project can {action}; "
                              "you opened it through its link.")


def rename_project(scope: ProjectScope, name: str) -> Project:
    need_owner(scope, "rename it")
    return scope.store.rename_project(scope.id, name)


def delete_project(scope: ProjectScope) -> None:
    """Delete the project with its images and models (only its creator may, in hosted mode)."""
    need_owner(scope, "delete it")
    ws = scope.ws
    ws.forget_models(m.id for m in ws.store.list_models(scope.id))
    ws.store.delete_project(scope.id)


def project_link(scope: ProjectScope, renew: bool = False) -> str:
    """The token of the project's link (`?project=<token>` on the app's address): whoever
    opens it sees the project next to their own (hosted mode). `renew`: a new token, and
    the old link stops working (who already opened it keeps the project; only the creator
    may renew)."""
    if renew:
        need_owner(scope, "replace its link")
    return scope.store.project_link(scope.id, renew=renew)


def stop_sharing(scope: ProjectScope) -> int:
    """The creator revokes the project's link and every member it let in (they no longer see
    the project; what they labeled stays). Returns how many members lost access."""
    need_owner(scope, "stop sharing it")
    return scope.store.stop_sharing(scope.id)


def open_link(ws: Workspace, token: str, owner: str | None = None) -> Project:
    """The project a link opens; in hosted mode this session may see it from now on."""
    p = ws.store.project_by_link(token)
    if ws.hosted and owner and p.owner != owner:
        ws.store.add_member(p.id, owner)
    return p


def last_project(ws: Workspace, owner: str | None = None, preferred: int | str | None = None) -> Project | None:
    """The project to reopen: `preferred` (e.g. remembered by the browser) when this owner may
    see it, else the most recently changed one, else None."""
    if preferred not in (None, ""):
        try:
            return ws.scope(int(preferred), owner).project
        except (FewShotError, ValueError, TypeError):
            pass
    projects = list_projects(ws, owner)
    return projects[0] if projects else None


def example(name: str) -> dict:
    """A bundled example's description (one sentence for an unknown name)."""
    if name not in EXAMPLES:
        raise DataError(f"There is no example called {name!r}; choose {', '.join(EXAMPLES)}.")
    return EXAMPLES[name]


def example_project(ws: Workspace, name: str, owner: str | None = None) -> Project | None:
    """This owner's existing copy of a bundled example (the most recent), if any."""
    title = example(name)["project"]
    return next((p for p in list_projects(ws, owner)
                 if p.name == title or (p.name.startswith(title + " (") and p.name.endswith(")"))), None)


def load_example(ws: Workspace, name: str, owner: str | None = None) -> Project:
    """Create a project from a bundled example: classes from `train/`, unlabeled pool from `pool/`
    (a fresh copy, named "(2)", "(3)"... when one exists; see `example_project`)."""
    ex = example(name)
    base = ASSETS / name
    existing = {p.name for p in list_projects(ws, owner)}
    title = ex["project"]
    k = 2
    while title in existing:
        title, k = f"{ex['project']} ({k})", k + 1
    p = create_project(ws, title, owner)
    store = ws.store
    for d in sorted(x for x in (base / "train").iterdir() if x.is_dir()):
        c = store.add_class(p.id, d.name, ex["descriptions"].get(d.name, ""))
        store.add_images(p.id, [(f.name, f) for f in sorted(d.iterdir()) if f.is_file()], class_id=c.id)
    pool = base / "pool"
    if pool.is_dir():
        store.add_images(p.id, [(f.name, f) for f in sorted(pool.iterdir()) if f.is_file()], class_id=None)
    return p
