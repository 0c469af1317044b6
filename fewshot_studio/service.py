"""The application service: every action of the app as a plain function over the core.

The Gradio UI (and tests, and any other front end) calls `Studio`; it holds no method
logic itself. One Studio owns one ProjectStore, one JobRunner and the loaded backbones.
Hosted mode (`FEWSHOT_STUDIO_HOSTED=1`) scopes projects to an owner token per session.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from . import imageio
from .backbone import TINY, Backbone, BackboneSpec, device_name, load_backbone, resolve_device
from .cache import FeatureCache
from .config import AppConfig
from .data import ImageRef
from .errors import DataError, FewShotError, ModelFileError
from .features import FeatureExtractor
from .methods import KnowledgeGraph, Method, catalog, get_method_class, load_model
from .methods.base import CONFIG_FILE, WEIGHTS_FILE, cosine_matrix, read_model_config
from .progress import Progress, ProgressFn
from .store import ImageInfo, ModelInfo, NotFoundError, Project, ProjectStore, ValidationError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "examples"

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

METHOD_LABELS = catalog.LABELS  # live views of the method catalog: {id: label}, ids in display order
METHOD_ORDER = catalog.ORDER

# (value, label) of the backbone picker's presets; any open_clip "name/pretrained" also works.
BACKBONE_PRESETS = (
    ("ViT-B-32/openai", "ViT-B-32 / openai"),
    ("ViT-B-16/openai", "ViT-B-16 / openai (MMA's paper setting)"),
    ("RN50/openai", "RN50 / openai (GraphAdapter's paper setting; not for MMA)"),
    ("ViT-L-14/openai", "ViT-L-14 / openai (large: slow on a CPU)"),
    ("ViT-B-32/laion2b_s34b_b79k", "ViT-B-32 / laion2b_s34b_b79k"),
    (TINY, "tiny — offline test backbone: it only knows coloured shapes"),
)
THUMB_SIZE = 160
MAX_UPLOAD_FILES = 1000  # loose files per upload; zips have their own limits (imageio.MAX_ZIP_*)
POOL = "(unlabeled pool)"  # the pseudo-class naming the unlabeled pool in pickers


@dataclass
class PoolRow:
    image_id: int
    name: str
    label: str
    confidence: float
    top: str


class Studio:
    """Everything the app does, UI-agnostic. Thread-safe for concurrent sessions."""

    def __init__(self, data_dir: str | os.PathLike | None = None, spec: BackboneSpec | None = None,
                 hosted: bool | None = None, max_cpu_jobs: int = 1, config: AppConfig | None = None):
        from .jobs import JobRunner

        config = config or AppConfig.from_env()
        if data_dir is not None:
            config = config.with_data_dir(data_dir)
        if hosted is not None:
            config = replace(config, hosted=hosted)
        self.config = config
        self.root = config.data_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_spec = spec or BackboneSpec.from_config(config)
        self.hosted = config.hosted
        self.store = ProjectStore(self.root)
        self.interrupted_jobs = self.store.mark_interrupted_jobs()
        self.runner = JobRunner(self.store, max_cpu_jobs=max_cpu_jobs)
        self.cache = FeatureCache(config.cache_dir)
        self._backbones: dict[tuple, Backbone] = {}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._models: dict[int, Method] = {}
        self._lock = threading.RLock()
        self.exports_dir = self.root / "exports"
        self.thumbs_dir = self.root / "thumbs"

    # ---- backbones -------------------------------------------------------------------
    def spec_for(self, name: str | None = None, pretrained: str | None = None,
                 checkpoint: str | None = None) -> BackboneSpec:
        """The backbone a form asks for. A blank checkpoint means the configured one
        (FEWSHOT_STUDIO_CHECKPOINT) when the form names the default backbone, so the documented
        setting is honoured without typing the path again."""
        d = self.default_spec
        name = (name or "").strip() or d.name
        if name == "tiny":
            pretrained = None
        elif "/" in name and not name.startswith(("hf-hub:", "local-dir:")) and not pretrained:
            name, pretrained = name.split("/", 1)
        pretrained = (pretrained or "").strip() or (None if name == "tiny" else d.pretrained or None)
        checkpoint = (checkpoint or "").strip() or None
        if checkpoint is None and d.checkpoint and (name, pretrained) == (d.name, d.pretrained or None):
            checkpoint = d.checkpoint
        return BackboneSpec(name, pretrained, checkpoint, d.device)

    def backbone(self, spec: BackboneSpec | None = None) -> Backbone:
        spec = spec or self.default_spec
        key = (spec.name, spec.pretrained, spec.checkpoint, spec.device)
        with self._lock:
            if key not in self._backbones:
                self._backbones[key] = load_backbone(spec)
            return self._backbones[key]

    def extractor(self, backbone: Backbone) -> FeatureExtractor:
        with self._lock:
            if backbone.id not in self._extractors:
                self._extractors[backbone.id] = FeatureExtractor(backbone, self.cache)
            return self._extractors[backbone.id]

    def backbone_status(self, spec: BackboneSpec | None = None) -> tuple[bool, str]:
        """(whether the backbone loads (the default one, or `spec`: the one last used), a
        one-line markdown banner naming the backbone and the device, or saying in one sentence
        why the weights are unavailable)."""
        try:
            b = self.backbone(spec)
            return True, f"**Backbone:** {b.spec.label} · **Device:** {b.device_label}"
        except FewShotError as e:
            dev = device_name(resolve_device(self.default_spec.device))
            how = ("Both are in the Train tab (Backbone, Local checkpoint); `tiny` only knows coloured shapes."
                   if "tiny" in str(e) else
                   "In the Train tab pick `tiny` (it only knows coloured shapes) or fill in Local checkpoint.")
            return False, f"⚠️ **Backbone unavailable:** {e} {how} · **Device:** {dev}"

    def backbone_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a backbone picker: the default first, then the presets.
        A value is "name/pretrained" or "tiny"; any open_clip "name/pretrained" works too."""
        default = self.default_backbone_value()
        out = [(label, value) for value, label in BACKBONE_PRESETS]
        if default not in {v for _, v in out}:
            out.insert(0, (f"{default} (default)", default))
        else:
            out.sort(key=lambda lv: lv[1] != default)
            out[0] = (out[0][0] + ("" if "(default" in out[0][0] else "  · default"), default)
        return out

    def default_backbone_value(self) -> str:
        s = self.default_spec
        if s.name == TINY:
            return TINY
        return f"{s.name}/{s.pretrained}" if s.pretrained else s.name

    # ---- projects ----------------------------------------------------------------------
    def _owner(self, owner: str | None) -> str | None:
        return owner if self.hosted else None

    def project(self, project_id: int, owner: str | None = None) -> Project:
        """The project, if this owner may see it (hosted mode); one sentence otherwise."""
        if project_id is None:
            raise DataError("Create or open a project first.")
        p = self.store.get_project(int(project_id))
        if self.hosted and p.owner != owner and not self.store.is_member(p.id, owner):
            raise NotFoundError(f"There is no project with id {project_id}.")
        return p

    def project_link(self, project_id: int, owner: str | None = None, renew: bool = False) -> str:
        """The token of the project's link (`?project=<token>` on the app's address): whoever
        opens it sees the project next to their own (hosted mode). `renew`: a new token, and
        the old link stops working (who already opened it keeps the project)."""
        self.project(project_id, owner)
        return self.store.project_link(int(project_id), renew=renew)

    def open_link(self, token: str, owner: str | None = None) -> Project:
        """The project a link opens; in hosted mode this session may see it from now on."""
        p = self.store.project_by_link(token)
        if self.hosted and owner and p.owner != owner:
            self.store.add_member(p.id, owner)
        return p

    def create_project(self, name: str, owner: str | None = None) -> Project:
        return self.store.create_project(name, owner=self._owner(owner))

    def list_projects(self, owner: str | None = None) -> list[Project]:
        if self.hosted:
            return self.store.list_projects(owner=owner) if owner else []
        return self.store.list_projects()

    def rename_project(self, project_id: int, name: str, owner: str | None = None) -> Project:
        self.project(project_id, owner)
        return self.store.rename_project(int(project_id), name)

    def delete_project(self, project_id: int, owner: str | None = None) -> None:
        p = self.project(project_id, owner)
        if self.hosted and p.owner != owner:
            raise ValidationError("Only the session that created this project can delete it; "
                                  "you opened it through its link.")
        for m in self.store.list_models(int(project_id)):
            self._models.pop(m.id, None)
        self.store.delete_project(int(project_id))

    @staticmethod
    def _example(name: str) -> dict:
        if name not in EXAMPLES:
            raise DataError(f"There is no example called {name!r}; choose {', '.join(EXAMPLES)}.")
        return EXAMPLES[name]

    def example_project(self, name: str, owner: str | None = None) -> Project | None:
        """This owner's existing copy of a bundled example (the most recent), if any."""
        title = self._example(name)["project"]
        return next((p for p in self.list_projects(owner)
                     if p.name == title or (p.name.startswith(title + " (") and p.name.endswith(")"))), None)

    def load_example(self, name: str, owner: str | None = None) -> Project:
        """Create a project from a bundled example: classes from `train/`, unlabeled pool from `pool/`
        (a fresh copy, named "(2)", "(3)"... when one exists; see `example_project`)."""
        ex = self._example(name)
        base = ASSETS / name
        existing = {p.name for p in self.list_projects(owner)}
        title = ex["project"]
        k = 2
        while title in existing:
            title, k = f"{ex['project']} ({k})", k + 1
        p = self.create_project(title, owner)
        for d in sorted(x for x in (base / "train").iterdir() if x.is_dir()):
            c = self.store.add_class(p.id, d.name, ex["descriptions"].get(d.name, ""))
            self.store.add_images(p.id, [(f.name, f) for f in sorted(d.iterdir()) if f.is_file()], class_id=c.id)
        pool = base / "pool"
        if pool.is_dir():
            self.store.add_images(p.id, [(f.name, f) for f in sorted(pool.iterdir()) if f.is_file()], class_id=None)
        return p

    # ---- classes and images --------------------------------------------------------------
    def add_class(self, project_id: int, name: str, description: str = "", owner: str | None = None):
        self.project(project_id, owner)
        _not_reserved(name)
        return self.store.add_class(int(project_id), name, description or "")

    def _class(self, project_id: int, class_id: int, owner: str | None):
        self.project(project_id, owner)
        c = self.store.get_class(int(class_id))
        if c.project_id != int(project_id):
            raise NotFoundError(f"There is no class with id {class_id} in this project.")
        return c

    def class_by_name(self, project_id: int, name: str, owner: str | None = None):
        self.project(project_id, owner)
        for c in self.store.list_classes(int(project_id)):
            if c.name == name:
                return c
        raise NotFoundError(f"There is no class called {name!r} in this project.")

    def rename_class(self, project_id: int, class_id: int, name: str, owner: str | None = None):
        self._class(project_id, class_id, owner)
        _not_reserved(name)
        return self.store.rename_class(int(class_id), name)

    def set_description(self, project_id: int, class_id: int, description: str, owner: str | None = None):
        self._class(project_id, class_id, owner)
        return self.store.set_class_description(int(class_id), description or "")

    def delete_class(self, project_id: int, class_id: int, owner: str | None = None) -> int:
        """Delete a class; its images move to the unlabeled pool (nothing is lost)."""
        self._class(project_id, class_id, owner)
        return self.store.delete_class(int(class_id), delete_images=False)

    def add_images(self, project_id: int, files: Iterable[str | os.PathLike | tuple[str, bytes]],
                   class_id: int | None = None, owner: str | None = None) -> tuple[list[ImageInfo], list[str]]:
        """Upload files into a class (or the pool when class_id is None); bad files are reported."""
        if class_id is not None:
            self._class(project_id, class_id, owner)
        else:
            self.project(project_id, owner)
        items = []
        for f in files or []:
            if isinstance(f, tuple):
                items.append(f)
            else:
                items.append((Path(f).name, Path(f)))
        if not items:
            raise DataError("Choose at least one image to upload.")
        if len(items) > MAX_UPLOAD_FILES:
            raise DataError(f"That is {len(items)} files at once; upload at most {MAX_UPLOAD_FILES} per batch "
                            "(or a zip).")
        return self.store.add_images(int(project_id), items, class_id=class_id,
                                     labeled_by="user" if class_id is not None else None)

    def add_zip(self, project_id: int, source: str | os.PathLike | bytes, owner: str | None = None,
                pool: bool = False, class_id: int | None = None) -> tuple[int, list[str]]:
        """A zip of `class_name/image` folders: classes are created as needed. Files at the top
        level (or everything, with pool=True) go to the unlabeled pool; with `class_id`, every
        image joins that class whatever its folder."""
        self.project(project_id, owner)
        members, errors = imageio.read_zip(source)
        errors = [str(e) for e in errors]
        if class_id is not None:
            infos, errs = self.store.add_images(int(project_id), [("/".join(m.path), m.data) for m in members],
                                                class_id=class_id, labeled_by="user")
            return len(infos), errors + list(errs)
        by_class: dict[str | None, list[tuple[str, bytes]]] = {}
        for m in members:
            cls = None if pool or len(m.path) < 2 else m.path[0]
            by_class.setdefault(cls, []).append(("/".join(m.path), m.data))
        added = 0
        existing = {c.name.casefold(): c for c in self.store.list_classes(int(project_id))}
        for cls, items in by_class.items():
            class_id = None
            if cls is not None:
                c = existing.get(cls.strip().casefold())
                if c is None:
                    try:
                        c = self.store.add_class(int(project_id), cls)
                    except FewShotError as e:
                        errors.append(f"{cls}/: {e}")
                        continue
                    existing[c.name.casefold()] = c
                class_id = c.id
            infos, errs = self.store.add_images(int(project_id), items, class_id=class_id,
                                                labeled_by="user" if class_id else None)
            added += len(infos)
            errors += errs
        return added, errors

    def remove_image(self, project_id: int, image_id: int, owner: str | None = None) -> None:
        self.image(project_id, image_id, owner)
        self.store.remove_image(int(image_id))

    def image(self, project_id: int, image_id: int, owner: str | None = None) -> ImageInfo:
        """One image of the project (one sentence if it is not there or not this owner's)."""
        self.project(project_id, owner)
        img = self.store.get_image(int(image_id))
        if img.project_id != int(project_id):
            raise NotFoundError(f"There is no image with id {image_id} in this project.")
        return img

    def class_rows(self, project_id: int, owner: str | None = None) -> list[list]:
        """[class, description, images] per class, then the unlabeled pool."""
        self.project(project_id, owner)
        counts = self.store.class_counts(int(project_id))
        rows = [[c.name, c.description, counts.get(c.id, 0)] for c in self.store.list_classes(int(project_id))]
        return rows + [[POOL, "", counts.get(None, 0)]]

    def thumbnail(self, img: ImageInfo) -> str:
        """A small PNG for galleries, generated once per image content."""
        path = self.thumbs_dir / img.hash[:2] / f"{img.hash}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            im = imageio.decode_image(img.path.read_bytes(), img.original_name, draft_size=THUMB_SIZE)
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            im.save(tmp, "PNG")
            os.replace(tmp, path)
        return str(path)

    # ---- training -------------------------------------------------------------------------
    def start_training(self, project_id: int, method: str, spec: BackboneSpec | None = None,
                       settings: dict | None = None, owner: str | None = None) -> str:
        self.project(project_id, owner)
        backbone = self.backbone(spec)
        cls = get_method_class(method)
        settings = catalog.coerce_settings(method, settings)  # strict: an unknown setting is refused
        support = self.store.support_set(int(project_id))
        if not support.images and cls.needs_images:
            support.require_images(cls.label)
        return self.runner.submit_training(int(project_id), method, backbone, self.extractor(backbone),
                                           support=support, **settings)

    def retrain(self, project_id: int, owner: str | None = None) -> str:
        """Train again with the current model's method, backbone and settings (cached features)."""
        info, method = self.current_model(project_id, owner)
        from dataclasses import asdict

        return self.start_training(project_id, info.method, method.backbone.spec,
                                   asdict(method.config), owner)

    def interrupted_training(self, project_id: int, owner: str | None = None):
        """The project's last training job (a JobInfo) when the app stopped while it ran and
        nothing was trained since, so the page can say so; else None."""
        from .store import INTERRUPTED

        self.project(project_id, owner)
        jobs = [j for j in self.store.list_jobs(int(project_id)) if j.kind == "train"]
        if not jobs or jobs[0].status != "failed" or not jobs[0].message.casefold().startswith(INTERRUPTED):
            return None
        return jobs[0]

    def job(self, job_id: str):
        return self.runner.get(job_id)

    def cancel(self, job_id: str) -> bool:
        return self.runner.cancel(job_id)

    # ---- models ---------------------------------------------------------------------------
    def load_method(self, model: ModelInfo) -> Method:
        with self._lock:
            if model.id not in self._models:
                cfg = read_model_config(model.path)
                bb = cfg.get("backbone") or {}
                spec = BackboneSpec(bb.get("name", ""), bb.get("pretrained"), bb.get("checkpoint"),
                                    self.default_spec.device)
                self._models[model.id] = load_model(model.path, backbone=self.backbone(spec))
            return self._models[model.id]

    def models(self, project_id: int, owner: str | None = None) -> list[ModelInfo]:
        self.project(project_id, owner)
        return self.store.list_models(int(project_id))

    def model(self, project_id: int, model_id: int | None = None, owner: str | None = None
              ) -> tuple[ModelInfo, Method]:
        if model_id in (None, ""):
            return self.current_model(project_id, owner)
        self.project(project_id, owner)
        info = self.store.get_model(int(model_id))
        if info.project_id != int(project_id):
            raise NotFoundError(f"There is no model with id {model_id} in this project.")
        return info, self.load_method(info)

    def current_model_info(self, project_id: int, owner: str | None = None) -> ModelInfo | None:
        """The model the project uses (chosen in the Model menu, else the last trained or
        imported one), or None."""
        self.project(project_id, owner)
        return self.store.current_model(int(project_id))

    def current_model(self, project_id: int, owner: str | None = None) -> tuple[ModelInfo, Method]:
        info = self.current_model_info(project_id, owner)
        if info is None:
            raise DataError("Train a model first (Train tab).")
        return info, self.load_method(info)

    def set_current_model(self, project_id: int, model_id: int, owner: str | None = None) -> ModelInfo:
        """Use this model for the graph, predictions, labeling, retraining and export."""
        self.project(project_id, owner)
        try:
            return self.store.set_current_model(int(project_id), int(model_id))
        except (TypeError, ValueError):
            raise DataError("Pick a model from the list.") from None

    # ---- knowledge graph ----------------------------------------------------------------------
    def knowledge_graph(self, project_id: int, model_id: int | None = None, owner: str | None = None
                        ) -> KnowledgeGraph:
        """The model's class graph, with current example counts; when the method has no visual
        sub-graph, visual edges come from the class prototypes of the current support set."""
        info, method = self.model(project_id, model_id, owner)
        g = method.knowledge_graph()
        support = self.store.support_set(int(project_id))
        counts = {n: c for n, c in zip(support.classnames, support.counts())}
        g.counts = [counts.get(c, 0) for c in g.classes]
        if g.visual_edges is None and support.images:
            feats = self.extractor(method.backbone).image_features(support.images)[:, 0]
            labels = support.labels_tensor()
            proto = torch.zeros(len(support.classnames), feats.shape[1]).index_add_(0, labels, feats)
            order = [support.classnames.index(c) if c in support.classnames else -1 for c in g.classes]
            if all(i >= 0 for i in order):
                g.visual_edges = cosine_matrix(proto[order])
        return g

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, project_id: int, methods: Sequence[str], spec: BackboneSpec | None = None,
                 owner: str | None = None, progress: ProgressFn | None = None, cancel=None,
                 settings: dict[str, dict] | None = None):
        from .evaluation import cross_validate

        self.project(project_id, owner)
        support = self.store.support_set(int(project_id))
        if not methods:
            raise DataError("Pick at least one method to compare.")
        support.require_images("Cross-validation")  # classes with one image stay in training
        backbone = self.backbone(spec)
        return cross_validate(support, list(methods), backbone, self.extractor(backbone), seed=0,
                              overrides=settings, progress=progress, cancel=cancel)

    # ---- prediction and labeling --------------------------------------------------------------
    def predict(self, project_id: int, image: str | os.PathLike | bytes | Image.Image, k: int = 5,
                owner: str | None = None, model_id: int | None = None) -> dict[str, float]:
        """Top-k class probabilities for one image with the latest (or given) model."""
        info, method = self.model(project_id, model_id, owner)
        if image is None:
            raise DataError("Upload an image to classify.")
        if isinstance(image, Image.Image):
            ref = ImageRef.from_pil(image)
        elif isinstance(image, (bytes, bytearray)):
            ref = ImageRef.from_bytes(bytes(image))
        else:
            ref = ImageRef.from_path(image)
        ref.open(draft_size=method.backbone.image_size)  # one clear sentence for a bad file
        probs = method.predict_proba([ref], self.extractor(method.backbone))[0]
        top = torch.topk(probs, min(k, len(probs)))
        return {method.classnames[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}

    def label_pool(self, project_id: int, owner: str | None = None, progress: ProgressFn | None = None,
                   model_id: int | None = None) -> list[PoolRow]:
        """Predict every unlabeled image with the latest model, store the predictions and return
        rows sorted least confident first (active learning)."""
        info, method = self.model(project_id, model_id, owner)
        pool = self.store.list_images(int(project_id), pool=True)
        if not pool:
            return []
        classes = {c.name: c.id for c in self.store.list_classes(int(project_id))}
        missing = [c for c in method.classnames if c not in classes]
        if missing:
            raise DataError(f"The model's class {missing[0]!r} is no longer in the project; retrain first.")
        extractor = self.extractor(method.backbone)
        report = (lambda p: progress(Progress("Labeling the pool", p.step, p.total))) if progress else None
        P = method.predict_proba([p.ref() for p in pool], extractor, report)  # one streaming pass
        conf, idx = P.max(1)
        self.store.save_predictions(info.id, [
            (img.id, classes[method.classnames[j]], float(c), P[n].tolist())
            for n, (img, c, j) in enumerate(zip(pool, conf.tolist(), idx.tolist()))])
        rows = [PoolRow(img.id, img.original_name, method.classnames[int(idx[n])], float(conf[n]),
                        top_text(method.classnames, P[n].tolist()))
                for n, img in enumerate(pool)]
        rows.sort(key=lambda r: r.confidence)
        return rows

    def accept(self, project_id: int, image_ids: Sequence[int], owner: str | None = None) -> int:
        """Accept the stored predictions of these pool images: they join the predicted class."""
        info, _ = self.current_model(project_id, owner)
        preds = {p.image_id: p for p in self.store.list_predictions(info.id)}
        moves = []
        for i in image_ids:
            img = self.image(project_id, i, owner)
            if img.class_id is not None:
                continue
            if int(i) not in preds:
                raise DataError(f"Image #{i} has no prediction yet; run 'Label the pool' first.")
            moves.append((int(i), preds[int(i)].label))
        if moves:
            self.store.move_images(moves, labeled_by="accepted")
        return len(moves)

    def correct(self, project_id: int, image_ids: Sequence[int], class_name: str, owner: str | None = None) -> int:
        """Label these images with `class_name` (a correction of the prediction)."""
        c = self.class_by_name(project_id, class_name, owner)
        ids = [int(i) for i in image_ids]
        for i in ids:
            self.image(project_id, i, owner)
        if ids:
            self.store.move_images([(i, c.id) for i in ids], labeled_by="corrected")
        return len(ids)

    # ---- export and import ---------------------------------------------------------------------
    EXPORT_TTL = 3600.0  # seconds an export stays on disk for downloading

    def _export_path(self, project_id: int, filename: str) -> Path:
        """A fresh, unguessable folder per export (exports are served for download, so another
        session must not be able to guess a path), named exports/<project>-<random>/filename;
        the project's exports older than EXPORT_TTL are removed."""
        import secrets

        self.exports_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in self.exports_dir.glob(f"{int(project_id)}-*"):
            try:
                if now - old.stat().st_mtime > self.EXPORT_TTL:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        d = self.exports_dir / f"{int(project_id)}-{secrets.token_urlsafe(12)}"
        d.mkdir(parents=True)
        return d / filename

    def label_records(self, project_id: int, owner: str | None = None) -> list[dict]:
        self.project(project_id, owner)
        names = {c.id: c.name for c in self.store.list_classes(int(project_id))}
        return [{"image_id": i.id, "file": i.original_name, "sha256": i.hash,
                 "label": names.get(i.class_id) if i.class_id is not None else None,
                 "labeled_by": i.labeled_by}
                for i in self.store.list_images(int(project_id))]

    def export_labels_csv(self, project_id: int, owner: str | None = None) -> Path:
        rows = self.label_records(project_id, owner)
        path = self._export_path(project_id, "labels.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image_id", "file", "sha256", "label", "labeled_by"])
            w.writeheader()
            w.writerows(rows)
        return path

    def export_labels_json(self, project_id: int, owner: str | None = None) -> Path:
        p = self.project(project_id, owner)
        path = self._export_path(project_id, "labels.json")
        classes = [{"name": c.name, "description": c.description} for c in self.store.list_classes(p.id)]
        path.write_text(json.dumps({"project": p.name, "classes": classes,
                                    "images": self.label_records(project_id, owner)}, indent=1, ensure_ascii=False),
                        encoding="utf-8")
        return path

    def export_imagefolder(self, project_id: int, owner: str | None = None) -> Path:
        """A zip of the labeled set as class_name/file folders."""
        self.project(project_id, owner)
        names = {c.id: c.name for c in self.store.list_classes(int(project_id))}
        path = self._export_path(project_id, "imagefolder.zip")
        used: set[str] = set()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for img in self.store.list_images(int(project_id)):
                if img.class_id is None:
                    continue
                fmt = imageio.probe_image(img.path.read_bytes(), img.original_name)[0].lower()
                ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
                stem = Path(img.original_name).stem.replace("/", "_") or f"image_{img.id}"
                arc = f"{_safe_part(names[img.class_id])}/{_safe_part(stem)}.{ext}"
                if arc in used:
                    arc = f"{_safe_part(names[img.class_id])}/{_safe_part(stem)}_{img.id}.{ext}"
                used.add(arc)
                z.write(img.path, arc)
        return path

    def export_model(self, project_id: int, model_id: int | None = None, owner: str | None = None) -> Path:
        """The trained model directory (config.json + model.safetensors + USAGE.md) as a zip."""
        info, method = self.model(project_id, model_id, owner)
        path = self._export_path(project_id, f"model-{info.id}-{info.method}.zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(info.path / CONFIG_FILE, f"model/{CONFIG_FILE}")
            z.write(info.path / WEIGHTS_FILE, f"model/{WEIGHTS_FILE}")
            z.writestr("model/USAGE.md", "```python\n" + usage_snippet(method) + "```\n")
        return path

    def import_model(self, project_id: int, source: str | os.PathLike | bytes, owner: str | None = None) -> ModelInfo:
        """Import a model zip (safetensors + config.json only; never unpickles). Its backbone must
        load and its classes must be this project's classes."""
        self.project(project_id, owner)
        members, errors = imageio.read_zip(source)
        if errors:
            first = str(errors[0]).rstrip(".")
            raise ModelFileError(f"The model zip has an unsafe or unreadable entry ({first}); nothing was imported.")
        files = {m.path[-1]: m.data for m in members if m.path[-1] in (CONFIG_FILE, WEIGHTS_FILE)}
        if set(files) != {CONFIG_FILE, WEIGHTS_FILE}:
            raise ModelFileError("The zip must contain a model folder with config.json and model.safetensors.")
        staging = Path(tempfile.mkdtemp(prefix="import-", dir=self.store.staging_dir()))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            cfg = read_model_config(staging)
            bb = cfg.get("backbone") or {}
            spec = BackboneSpec(bb.get("name", ""), bb.get("pretrained"), bb.get("checkpoint"),
                                self.default_spec.device)
            method = load_model(staging, backbone=self.backbone(spec))
            ours = [c.name for c in self.store.list_classes(int(project_id))]
            if sorted(method.classnames) != sorted(ours):
                raise ModelFileError(f"The model's classes ({', '.join(method.classnames)}) differ from this "
                                     f"project's classes ({', '.join(ours) or 'none'}).")
            info = self.store.register_model(int(project_id), method.name, method.backbone.id, cfg,
                                             cfg.get("metrics") or {}, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return info

    # ---- helpers for front ends (UI-agnostic) --------------------------------------------------
    def last_project(self, owner: str | None = None, preferred: int | str | None = None) -> Project | None:
        """The project to reopen: `preferred` (e.g. remembered by the browser) when this owner may
        see it, else the most recently changed one, else None."""
        if preferred not in (None, ""):
            try:
                return self.project(int(preferred), owner)
            except (FewShotError, ValueError, TypeError):
                pass
        projects = self.list_projects(owner)
        return projects[0] if projects else None

    def class_choices(self, project_id: int, owner: str | None = None) -> list[tuple[str, str]]:
        """(label with the image count, class name) per class, in class order."""
        self.project(project_id, owner)
        counts = self.store.class_counts(int(project_id))
        return [(f"{c.name} ({counts.get(c.id, 0)})", c.name) for c in self.store.list_classes(int(project_id))]

    def class_id_for(self, project_id: int, name: str | None, owner: str | None = None) -> int | None:
        """A class's id from its name; None (the unlabeled pool) for an empty name or POOL."""
        if name in (None, "", POOL):
            self.project(project_id, owner)
            return None
        return self.class_by_name(project_id, name, owner).id

    def add_uploads(self, project_id: int, files: Iterable[str | os.PathLike], class_name: str | None = None,
                    owner: str | None = None) -> tuple[int, list[str]]:
        """Add uploaded files. `class_name`: a class (every image, zipped or not, joins it), POOL
        (everything goes to the unlabeled pool) or None (a zip's `class_name/image` folders make
        classes as needed; loose files go to the pool). Zip archives are judged by content.
        Returns (images added, one sentence per refused file)."""
        class_id = self.class_id_for(project_id, class_name, owner)
        paths = [Path(f) for f in files or []]
        if not paths:
            raise DataError("Choose at least one image to upload.")
        added, errors, plain = 0, [], []
        for path in paths:
            if zipfile.is_zipfile(path):
                n, errs = self.add_zip(project_id, path, owner, pool=class_name == POOL, class_id=class_id)
                added += n
                errors += errs
            else:
                plain.append(path)
        if plain:
            infos, errs = self.add_images(project_id, plain, class_id=class_id, owner=owner)
            added += len(infos)
            errors += errs
        return added, [str(e) for e in errors]

    def image_gallery(self, project_id: int, class_name: str | None, owner: str | None = None
                      ) -> list[tuple[str, str]]:
        """Thumbnails of a class (or of the pool for POOL/None) with "#id name" captions."""
        return self.gallery_items(project_id, class_name, owner)[0]

    def gallery_items(self, project_id: int, class_name: str | None, owner: str | None = None
                      ) -> tuple[list[tuple[str, str]], list[int]]:
        """`image_gallery`, and the images' ids in the same order: what a selection in the
        gallery refers to (selections are data, never read back from captions)."""
        class_id = self.class_id_for(project_id, class_name, owner)
        imgs = self.store.list_images(int(project_id), class_id=class_id, pool=class_id is None)
        return [(self.thumbnail(i), f"#{i.id} {i.original_name}") for i in imgs], [i.id for i in imgs]

    def image_by_thumbnail(self, project_id: int, class_name: str | None, thumbnail: str,
                           owner: str | None = None) -> ImageInfo:
        """The image of a class (or of the pool, for POOL/None) shown by the gallery thumbnail
        file `thumbnail` (thumbnails are named by the image's content hash, see `thumbnail`)."""
        digest = Path(str(thumbnail or "")).stem
        class_id = self.class_id_for(project_id, class_name, owner)
        for img in self.store.list_images(int(project_id), class_id=class_id, pool=class_id is None):
            if img.hash == digest:
                return img
        raise NotFoundError("That image is no longer here; the gallery now shows what is.")

    def remove_images(self, project_id: int, image_ids: Sequence[int], owner: str | None = None) -> int:
        ids = [int(i) for i in image_ids]
        if not ids:
            raise DataError("Select an image first (click its thumbnail).")
        for i in ids:
            self.image(project_id, i, owner)
        return self.store.remove_images(ids)

    def pool_predictions(self, project_id: int, owner: str | None = None) -> list[PoolRow]:
        """The current model's stored predictions for the images still in the pool, least
        confident first (no recomputation); empty when there is no model or no prediction."""
        current = self.current_model_info(project_id, owner)
        if current is None:
            return []
        names = {c.id: c.name for c in self.store.list_classes(int(project_id))}
        pool = {i.id: i for i in self.store.list_images(int(project_id), pool=True)}
        rows = []
        for p in self.store.list_predictions(current.id, pool_only=True):
            img = pool.get(p.image_id)
            if img is None or p.label not in names:
                continue
            top = ""
            if isinstance(p.probs, list) and len(p.probs) == len(current.config.get("classes", [])):
                top = top_text(current.config["classes"], p.probs)
            rows.append(PoolRow(img.id, img.original_name, names[p.label], p.confidence, top))
        return rows

    def pool_gallery(self, project_id: int, rows: Sequence[PoolRow] | None = None, owner: str | None = None
                     ) -> list[tuple[str, str]]:
        """Pool thumbnails captioned "#id label 87%" in the rows' order (least confident first),
        then the pool images without a prediction."""
        return self.pool_gallery_items(project_id, rows, owner)[0]

    def pool_gallery_items(self, project_id: int, rows: Sequence[PoolRow] | None = None,
                           owner: str | None = None) -> tuple[list[tuple[str, str]], list[int]]:
        """`pool_gallery`, and the images' ids in the same order (what a click selects)."""
        self.project(project_id, owner)
        pool = {i.id: i for i in self.store.list_images(int(project_id), pool=True)}
        out, ids = [], []
        for r in rows or []:
            if r.image_id in pool:
                out.append((self.thumbnail(pool[r.image_id]), f"#{r.image_id} {r.label} {r.confidence:.0%}"))
                ids.append(r.image_id)
        seen = set(ids)
        for i, img in pool.items():
            if i not in seen:
                out.append((self.thumbnail(img), f"#{i} {img.original_name}"))
                ids.append(i)
        return out, ids

    def accept_confident(self, project_id: int, threshold: float, owner: str | None = None) -> int:
        """Accept every stored pool prediction of the current model with confidence ≥ threshold."""
        rows = self.pool_predictions(project_id, owner)
        if not rows:
            raise DataError("Label the pool first; there are no predictions to accept.")
        ids = [r.image_id for r in rows if r.confidence >= float(threshold)]
        if not ids:
            return 0
        return self.accept(project_id, ids, owner)

    def model_summary(self, project_id: int, owner: str | None = None) -> str:
        """One markdown line about the current model, or how to get one."""
        m = self.current_model_info(project_id, owner)
        if m is None:
            return "No model yet: train one in the Train tab."
        return f"**Model #{m.id}** (current): {model_label(m, with_id=False)}"

    def model_choices(self, project_id: int, owner: str | None = None) -> tuple[list[tuple[str, int]], int | None]:
        """(label, id) of every model of the project, newest first, and the current model's id."""
        models = self.models(project_id, owner)
        current = self.store.current_model(int(project_id))
        return [(model_label(m), m.id) for m in models], (current.id if current else None)

    def usage(self, project_id: int, owner: str | None = None) -> str:
        """The Python snippet for the current model."""
        _, method = self.current_model(project_id, owner)
        return usage_snippet(method)

    def model_history(self, project_id: int, owner: str | None = None) -> list[dict]:
        """The current model's training curve (step, loss, accuracy), or []."""
        m = self.current_model_info(project_id, owner)
        return [] if m is None else list((m.config or {}).get("history") or [])

    def active_job(self, project_id: int | None) -> Any:
        """The newest unfinished training job of this project (to resume showing its progress)."""
        from .jobs import FINISHED

        if project_id in (None, ""):
            return None
        jobs = [j for j in self.runner.jobs(int(project_id)) if j.status not in FINISHED]
        return max(jobs, key=lambda j: j.created) if jobs else None

    def method_choices(self) -> list[tuple[str, str]]:
        return [(catalog.label(m), m) for m in catalog.method_ids()]

    @staticmethod
    def method_settings(method: str) -> dict[str, Any]:
        """A method's editable settings with the papers' defaults (catalog.settings)."""
        return catalog.settings(method)

    @staticmethod
    def coerce_settings(method: str, raw: dict[str, Any]) -> dict[str, Any]:
        """Form values to a method's settings by the catalog's one strict rule (catalog.coerce_settings)."""
        return catalog.coerce_settings(method, raw)

    def browser_secret(self) -> str:
        """A per-installation random secret (kept in the data dir) for encrypting what a
        browser remembers, so that it survives restarts."""
        path = self.root / "browser.secret"
        with self._lock:
            try:
                s = path.read_text().strip()
                if len(s) >= 16:
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
            return s

    def close(self) -> None:
        self.store.close()


def _not_reserved(name) -> None:
    if isinstance(name, str) and name.strip().casefold() == POOL.casefold():
        raise DataError(f"{POOL!r} names the pool of unlabeled images; choose another class name.")


def model_result(method: str, metrics: dict | None, history: list | None = None) -> list[str]:
    """What a model's training measured, in words, the same wherever it is shown (the progress
    bar's last line, the model line, the model menu): the steps it trained (none for the
    training-free methods), its train accuracy on the plain views and final loss, or, for
    Tip-Adapter, the leave-one-out accuracy of its α/β search."""
    metrics = metrics or {}
    parts = []
    steps = metrics.get("steps") or (history[-1].get("step", len(history)) if history else 0)
    if steps:
        parts.append(f"{steps} steps")
    acc = metrics.get("train_accuracy")
    if isinstance(acc, (int, float)):
        parts.append(f"train accuracy {acc:.0%}")
    loo = metrics.get("loo_accuracy")
    if isinstance(loo, (int, float)):
        parts.append(f"leave-one-out accuracy {loo:.0%} (α {metrics.get('alpha', 0):.2f}, β {metrics.get('beta', 0):.2f})")
    loss = metrics.get("final_loss")
    if isinstance(loss, (int, float)):
        parts.append(f"final loss {loss:.4f}")
    return parts


def model_label(m: ModelInfo, with_id: bool = True) -> str:
    """"#5 GraphAdapter on tiny · 8 classes · 300 steps · train accuracy 95% · 2026-11-30 10:02"."""
    label = METHOD_LABELS.get(m.method, m.method)
    cfg = m.config if isinstance(m.config, dict) else {}
    bb = cfg.get("backbone") or {}
    bname = bb.get("name") or m.backbone_id
    if bb.get("pretrained"):
        bname += f"/{bb['pretrained']}"
    parts = [f"{label} on {bname}", f"{len(cfg.get('classes', []))} classes",
             *model_result(m.method, m.metrics, cfg.get("history")),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))]
    return (f"#{m.id} " if with_id else "") + " · ".join(parts)


def top_text(classnames: Sequence[str], probs: Sequence[float], k: int = 3) -> str:
    """"red circle 97%, blue square 2%, ..." for the k most probable classes."""
    order = sorted(range(len(probs)), key=lambda j: -probs[j])[:k]
    return ", ".join(f"{classnames[j]} {probs[j]:.0%}" for j in order)


def _safe_part(name: str) -> str:
    bad = '<>:"/\\|?*\x00'
    s = "".join("_" if ch in bad or ord(ch) < 32 else ch for ch in name).strip(" .")
    return s[:100] or "_"


def usage_snippet(method: Method) -> str:
    return (
        "# pip install -r requirements.txt  (Few-Shot Studio)\n"
        "from fewshot_studio.methods import load_model\n"
        "from fewshot_studio.features import FeatureExtractor\n"
        "from fewshot_studio.data import ImageRef\n\n"
        "model = load_model(\"model\")  # the unzipped folder; loads its backbone "
        f"({method.backbone.spec.label.split(' (')[0]})\n"
        "extractor = FeatureExtractor(model.backbone)\n"
        "probs = model.predict_proba([ImageRef.from_path(\"photo.jpg\")], extractor)[0]\n"
        "print(dict(zip(model.classnames, probs.tolist())))\n"
        f"# classes: {', '.join(method.classnames)}; method: {method.label}\n"
    )


def parse_image_ids(text: str | Iterable | None) -> list[int]:
    """Image ids from a list of ids ("12, 15 16", "#12", or a list); order kept, duplicates
    dropped. Anything that is not an id is refused in one sentence, never mined for digits
    (a file name such as "oc_2.png" is not image 2)."""
    import re

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
