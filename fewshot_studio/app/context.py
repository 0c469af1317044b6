"""The workspace every use case runs in, and the project scope that project-level use cases take.

One `Workspace` owns one ProjectStore, one JobRunner, the feature cache and the loaded backbones
(thread-safe for concurrent sessions). `ws.scope(project_id, owner)` checks once that the owner
may see the project (hosted mode: `AppConfig.hosted`) and hands back a `ProjectScope`.
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

from ..backbone import (TINY, Backbone, BackboneSpec, checkpoint_digest, load_backbone, release_memory,
                        resolve_device, split_backbone)
from ..cache import FeatureCache
from ..config import AppConfig
from ..errors import DataError, WeightsUnavailableError
from ..features import FeatureExtractor
from ..jobs import JobRunner
from ..methods import Method, load_model
from ..methods.base import read_model_config
from ..store import ModelInfo, NotFoundError, Project, ProjectStore

BackboneLoader = Callable[[BackboneSpec], Backbone]


class Workspace:
    """The app's state: store, job runner, feature cache, loaded backbones, extractors and models.

    `loader` loads a backbone from its spec (default `backbone.load_backbone`); tests pass one
    that returns an already loaded backbone."""

    def __init__(self, config: AppConfig | None = None, spec: BackboneSpec | None = None, *,
                 loader: BackboneLoader | None = None, max_cpu_jobs: int = 1):
        config = config or AppConfig.from_env()
        self.config = config
        self.root = config.data_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_spec = spec or BackboneSpec.from_config(config)
        self.hosted = config.hosted
        self.loader: BackboneLoader = loader or load_backbone
        # a damaged database is set aside (never deleted) and the app still starts: the page
        # says so in one sentence (storage_notice), instead of an empty list or no app at all
        self.store = ProjectStore(self.root, recover=True)
        self.storage_notice = self.store.recovery
        self.interrupted_jobs = self.store.mark_interrupted_jobs()
        self.store.clean_staging()  # what killed imports left (never a live one: see clean_staging)
        _OPEN.add(self)
        self.runner = JobRunner(self.store, max_cpu_jobs=max_cpu_jobs)
        self.cache = FeatureCache(config.cache_dir)
        self.exports_dir = self.root / "exports"
        self.thumbs_dir = self.root / "thumbs"
        self.lock = threading.RLock()
        # least recently used first; at most config.max_backbones (issue #13: memory stays bounded)
        self._backbones: OrderedDict[tuple, Backbone] = OrderedDict()
        self._extractors: dict[str, FeatureExtractor] = {}
        self._models: dict[int, Method] = {}
        # project id -> its queued or running hyper-parameter re-search after an instant refit
        # (app.modeling.instant_refit): a newer refit supersedes it
        self.researches: dict[int, str] = {}
        # project id -> its last instant refit: a newer one cancels it while it is still queued
        self.refits: dict[int, str] = {}
        self._secret: str | None = None

    @classmethod
    def at(cls, data_dir: str | os.PathLike, spec: BackboneSpec | None = None, *, hosted: bool | None = None,
           **kwargs) -> "Workspace":
        """A workspace over `data_dir` with the environment's other settings (`hosted`: None
        keeps the environment's)."""
        config = AppConfig.from_env().with_data_dir(data_dir)
        if hosted is not None:
            config = replace(config, hosted=hosted)
        return cls(config, spec, **kwargs)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- access ------------------------------------------------------------------------------
    def owner_of(self, owner: str | None) -> str | None:
        """The owner recorded on what a session creates: only hosted mode keeps owners apart."""
        return owner if self.hosted else None

    def scope(self, project_id: int | str | None, owner: str | None = None) -> "ProjectScope":
        """The project, if this owner may see it (hosted mode); one sentence otherwise."""
        if project_id is None:
            raise DataError("Create or open a project first.")
        p = self.store.get_project(int(project_id))
        if self.hosted and p.owner != owner and not self.store.is_member(p.id, owner):
            raise NotFoundError(f"There is no project with id {project_id}.")
        return ProjectScope(self, p, owner)

    # ---- loaded things -----------------------------------------------------------------------
    def allowed_backbones(self) -> list[str]:
        """Hosted mode: the backbones visitors may pick, as "name/pretrained" or "tiny"
        (AppConfig.backbones; by default the configured default backbone and tiny)."""
        if self.config.backbones:
            return list(dict.fromkeys(self.config.backbones))
        d = self.default_spec
        default = TINY if d.name == TINY else (f"{d.name}/{d.pretrained}" if d.pretrained else d.name)
        return list(dict.fromkeys([default, TINY]))

    def check_backbone(self, spec: BackboneSpec) -> None:
        """Hosted mode: refuse, in one sentence and before anything is read or built, a backbone
        off the allow-list or any checkpoint path but the operator's own. The sentence is the
        same for every path, so it says nothing about the server's files."""
        if not self.hosted:
            return
        d = self.default_spec
        if (spec.name, spec.pretrained, spec.checkpoint) == (d.name, d.pretrained, d.checkpoint):
            return  # the operator's own choice (its checkpoint included)
        choices = self.allowed_backbones()
        if spec.checkpoint:
            raise WeightsUnavailableError("This public app does not load checkpoints from the server's disk; "
                                          f"pick one of: {', '.join(choices)}.")
        if (spec.name, spec.pretrained or None) not in {split_backbone(c) for c in choices}:
            raise WeightsUnavailableError(f"This public app offers only these backbones: {', '.join(choices)}; "
                                          "pick one of them.")

    def _backbone_key(self, spec: BackboneSpec) -> tuple:
        """What a backbone is: a checkpoint by its content (any spelling of its path, any copy of
        the file, is one backbone), a named model by (name, pretrained); and the device."""
        device = str(resolve_device(spec.device))
        if spec.checkpoint:
            return spec.name, "checkpoint", checkpoint_digest(spec.checkpoint) or spec.checkpoint, device
        return spec.name, spec.pretrained, None, device

    def backbone(self, spec: BackboneSpec | None = None) -> Backbone:
        """The loaded backbone of `spec` (the default one when None): checked (hosted mode), then
        cached, the least recently used one freed when config.max_backbones are loaded."""
        spec = spec or self.default_spec
        self.check_backbone(spec)
        key = self._backbone_key(spec)
        with self.lock:
            if key in self._backbones:
                self._backbones.move_to_end(key)
                return self._backbones[key]
            while self._backbones and len(self._backbones) >= max(1, self.config.max_backbones):
                self._evict(next(iter(self._backbones)))
            try:
                b = self._backbones[key] = self.loader(spec)
            except BaseException:
                release_memory()  # whatever a failed load allocated goes back too
                raise
            return b

    def _evict(self, key: tuple) -> None:
        """Forget a backbone and what holds it (its extractor, the models loaded on it) so its
        memory really goes back; a job still running on it keeps it until it ends."""
        b = self._backbones.pop(key)
        for bid, ext in list(self._extractors.items()):
            if ext.backbone is b:
                del self._extractors[bid]
        for mid, m in list(self._models.items()):
            if getattr(m, "backbone", None) is b:
                del self._models[mid]
        del b
        release_memory()

    def extractor(self, backbone: Backbone) -> FeatureExtractor:
        with self.lock:
            if backbone.id not in self._extractors:
                self._extractors[backbone.id] = FeatureExtractor(backbone, self.cache)
            return self._extractors[backbone.id]

    def saved_spec(self, config: dict) -> BackboneSpec:
        """The backbone a saved model's config names, on this workspace's device."""
        bb = config.get("backbone")
        bb = bb if isinstance(bb, dict) else {}

        def text(key: str) -> str | None:  # an imported config is untrusted: strings or nothing
            v = bb.get(key)
            return v if isinstance(v, str) and v else None

        return BackboneSpec(text("name") or "", text("pretrained"), text("checkpoint"), self.default_spec.device)

    def load_method(self, model: ModelInfo) -> Method:
        """A stored model, loaded once (with its backbone)."""
        with self.lock:
            if model.id not in self._models:
                spec = self.saved_spec(read_model_config(model.path))
                self._models[model.id] = load_model(model.path, backbone=self.backbone(spec))
            return self._models[model.id]

    def forget_models(self, model_ids) -> None:
        with self.lock:
            for i in model_ids:
                self._models.pop(i, None)

    def browser_secret(self) -> str:
        """A per-installation random secret (kept in the data dir) for encrypting what a
        browser remembers, so that it survives restarts."""
        path = self.root / "browser.secret"
        with self.lock:
            if self._secret is not None:
                return self._secret
            try:
                s = path.read_text().strip()
                if len(s) >= 16:
                    self._secret = s
                    return s
            except OSError:
                pass
            import secrets

            s = secrets.token_urlsafe(24)
            try:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(s)
                os.replace(tmp, path)
            except OSError:
                pass
            self._secret = s
            return s

    def close(self) -> None:
        """Checkpoint and close the store (idempotent; also run at interpreter exit)."""
        _OPEN.discard(self)
        self.store.close()


# Workspaces still open when the interpreter exits (app.py turns SIGTERM into an exit) are
# closed then, so the database file holds everything and the log is empty.
_OPEN: "weakref.WeakSet[Workspace]" = weakref.WeakSet()


@atexit.register
def _close_open_workspaces() -> None:
    for ws in list(_OPEN):
        try:
            ws.close()
        except Exception:  # noqa: BLE001 - exiting anyway; the log keeps every committed change
            pass


@dataclass(frozen=True)
class ProjectScope:
    """A project that an owner may see: made by `Workspace.scope`, which checks access once.
    Every project-level use case takes one."""

    ws: Workspace
    project: Project
    owner: str | None = None

    @property
    def id(self) -> int:
        return self.project.id

    @property
    def store(self) -> ProjectStore:
        return self.ws.store
