"""The workspace every use case runs in, and the project scope that project-level use cases take.

One `Workspace` owns one ProjectStore, one JobRunner, the feature cache and the loaded backbones
(thread-safe for concurrent sessions). `ws.scope(project_id, owner)` checks once that the owner
may see the project (hosted mode: `AppConfig.hosted`) and hands back a `ProjectScope`.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Callable

from ..backbone import Backbone, BackboneSpec, load_backbone
from ..cache import FeatureCache
from ..config import AppConfig
from ..errors import DataError
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
        self.store = ProjectStore(self.root)
        self.interrupted_jobs = self.store.mark_interrupted_jobs()
        self.runner = JobRunner(self.store, max_cpu_jobs=max_cpu_jobs)
        self.cache = FeatureCache(config.cache_dir)
        self.exports_dir = self.root / "exports"
        self.thumbs_dir = self.root / "thumbs"
        self.lock = threading.RLock()
        self._backbones: dict[tuple, Backbone] = {}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._models: dict[int, Method] = {}
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
    def backbone(self, spec: BackboneSpec | None = None) -> Backbone:
        spec = spec or self.default_spec
        key = (spec.name, spec.pretrained, spec.checkpoint, spec.device)
        with self.lock:
            if key not in self._backbones:
                self._backbones[key] = self.loader(spec)
            return self._backbones[key]

    def extractor(self, backbone: Backbone) -> FeatureExtractor:
        with self.lock:
            if backbone.id not in self._extractors:
                self._extractors[backbone.id] = FeatureExtractor(backbone, self.cache)
            return self._extractors[backbone.id]

    def saved_spec(self, config: dict) -> BackboneSpec:
        """The backbone a saved model's config names, on this workspace's device."""
        bb = config.get("backbone") or {}
        return BackboneSpec(bb.get("name", ""), bb.get("pretrained"), bb.get("checkpoint"), self.default_spec.device)

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
        self.store.close()


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
