"""The one small interface every method shares, plus saving and loading of trained models.

A method is an `nn.Module` holding only its own trained parameters and buffers; the frozen
backbone is referenced, never registered, so it is neither saved nor trained.

    method = make_method("graph", backbone, classnames)
    method.fit(support, extractor, progress=print, cancel=event)
    probs = method.predict_proba(refs, extractor)
    method.save("model_dir"); same = load_model("model_dir")
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, BackboneSpec, load_backbone
from ..data import ImageRef, SupportSet
from ..errors import DataError, ModelFileError
from ..features import FeatureExtractor
from ..progress import CancelFlag, ProgressFn
from .catalog import REGISTRY, get_method_class, make_config, register  # noqa: F401  (re-exported)
from .knowledge_graph import KnowledgeGraph  # noqa: F401  (re-exported; lives in a numpy-only module)

MODEL_FORMAT = "fewshot-studio-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def cosine_matrix(x: torch.Tensor) -> np.ndarray:
    """C×C cosine similarities between the rows of x."""
    x = F.normalize(x.float(), dim=-1)
    return (x @ x.T).cpu().numpy()


@dataclass
class MethodConfig:
    """Settings every trained method shares; subclasses add their hyper-parameters."""

    # numpy's seed range (torch's generator refuses larger numbers)
    seed: int = field(default=0, metadata={"help": "seed", "min": 0, "max": 2**32 - 1})


class Method(nn.Module):
    """Base class. Subclasses set `name`, `label`, `summary`, `cost`, `order` and `Config` (see
    methods/catalog.py), implement `_fit` (wrapped by `fit`) and either `logits_from_features`
    (methods on frozen features) or `image_logits`, and are added with `@register`."""

    name: ClassVar[str] = ""  # the id the CLI, the app, saved models and the evaluation use
    label: ClassVar[str] = ""  # shown to people
    summary: ClassVar[str] = ""  # one line: the paper and its defaults (the app's note under the method)
    cost: ClassVar[int] = 0  # rank, cheapest first: ties in an evaluation go to the cheaper method
    order: ClassVar[int] = 0  # display order in the app's method list
    Config: ClassVar[type] = MethodConfig
    needs_images: ClassVar[bool] = True  # every class needs at least one support image
    # the fit is a closed form on cached features (no gradient steps): accepting or correcting a
    # pool label refits such a model at once (app.modeling.instant_refit), with `fixed_settings`
    closed_form: ClassVar[bool] = False
    # whether the `auto` choice cross-validates it: "always", "gpu" (only on a GPU or when asked)
    # or "never" (catalog.auto_candidates)
    auto_candidate: ClassVar[str] = "never"
    # tensors whose first dimension is the number of support images (may differ per model);
    # every other saved tensor must have exactly the shape the config and backbone imply
    data_sized: ClassVar[tuple[str, ...]] = ()
    # fitted in closed form on cached features (no gradient steps): a model is milliseconds once
    # the features are there, so a training shows a first model on plain views at once and
    # refits when the augmented views are encoded (jobs.JobRunner._train)
    closed_form: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, classnames: Sequence[str],
                 descriptions: Sequence[str] | None = None, config: Any = None):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: never saved or trained
        self.classnames = list(classnames)
        self.descriptions = list(descriptions) if descriptions is not None else None
        self.config = config if config is not None else self.Config()
        self.history: list[dict] = []
        self.metrics: dict = {}
        self.support_counts: list[int] | None = None

    @property
    def feature_views(self) -> int:
        """Cached views per support image the method reads from the FeatureExtractor: the plain
        view plus `augment_views` augmented ones where the config has them."""
        aug = getattr(self.config, "augment_views", None)
        return 1 + max(0, int(aug)) if aug is not None else 1

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def logit_scale(self) -> float:
        return self.backbone.logit_scale

    def _support_features(self, support: SupportSet, extractor: FeatureExtractor, augment_views: int,
                          progress: ProgressFn | None, cancel: CancelFlag | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached features of the support images, (N, 1 + augment_views, d) (view 0 plain, then
        augmented views; 0 augmented views: the plain view alone, nothing more encoded), and
        their labels, on this method's device."""
        from ..training import check_cancel

        dev = self._device()
        feats = extractor.image_features(support.images, views=range(max(0, int(augment_views)) + 1),
                                         progress=progress, cancel=cancel).to(dev)
        check_cancel(cancel)
        return feats, support.labels_tensor().to(dev)

    def _support_and_text(self, support: SupportSet, extractor: FeatureExtractor, progress: ProgressFn | None,
                          cancel: CancelFlag | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prologue of a fit on cached features (Tip-Adapter, GDA, ProKeR): check the support
        set, read its features over the config's `augment_views` (`_support_features`), and set
        `text_weights` to the class prompts' embeddings (the zero-shot classifier every one of
        them keeps beside its adapter)."""
        self._check_support(support)
        cfg = self.config
        feats, labels = self._support_features(support, extractor, max(0, int(cfg.augment_views)), progress, cancel)
        self.text_weights = extractor.class_text_features(self.classnames, self.descriptions,
                                                          cfg.templates).to(self._device()).clone()
        return feats, labels

    def _check_support(self, support: SupportSet) -> None:
        if support.classnames != self.classnames:
            raise ValueError("the support set's classes differ from the method's classes")
        if self.needs_images:
            support.require_images(self.label)
        self.support_counts = support.counts()

    # ---- the interface ---------------------------------------------------------
    def fit(self, support: SupportSet, extractor: FeatureExtractor, progress: ProgressFn | None = None,
            cancel: CancelFlag | None = None) -> "Method":
        """Train on `support`. Reports Progress, stops within one step when `cancel` is set
        (raising errors.Cancelled), and on any failure leaves the method exactly as before."""
        snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
        saved = (self.history, self.metrics, self.support_counts)
        try:
            self._fit(support, extractor, progress, cancel)
        except BaseException:
            self.load_tensors(snapshot)
            self.history, self.metrics, self.support_counts = saved
            raise
        self.eval()
        return self

    def _fit(self, support: SupportSet, extractor: FeatureExtractor, progress: ProgressFn | None,
             cancel: CancelFlag | None) -> None:
        raise NotImplementedError

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N,d) normalised frozen image features -> (N,C) logits."""
        raise NotImplementedError

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) normalised pixels (the plain view) -> (N,d) normalised features, the input of
        `logits_from_features`: the frozen encoder's (Backbone.image_embedding); a method that
        changes the image tower (MMA) overrides it. The ONNX export traces exactly this pair."""
        return self.backbone.image_embedding(pixels)

    def image_logits(self, refs: Sequence[ImageRef], extractor: FeatureExtractor,
                     progress: ProgressFn | None = None) -> torch.Tensor:
        feats = extractor.image_features(refs, views=(0,), progress=progress, stage="Predicting")[:, 0]
        with torch.no_grad():
            return self.logits_from_features(feats.to(self._device()))

    def predict_proba(self, refs: Sequence[ImageRef], extractor: FeatureExtractor,
                      progress: ProgressFn | None = None) -> torch.Tensor:
        """(N,C) class probabilities on the CPU; `progress` hears about the images done. One call
        for many images keeps the feature pipeline streaming (no restart per chunk)."""
        self.eval()
        return self.image_logits(refs, extractor, progress).float().softmax(-1).cpu()

    def knowledge_graph(self) -> KnowledgeGraph:
        raise NotImplementedError

    def fixed_settings(self) -> dict[str, Any]:
        """Settings that fit this trained model's method again with the hyper-parameters its
        search chose, without searching (an instant refit after a label is accepted: the
        search is what costs time, app.modeling.instant_refit). Closed-form methods override it."""
        return {}

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    # ---- persistence ---------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "method": self.name,
            "backbone": {**self.backbone.spec.to_dict(), "id": self.backbone.id},
            "classes": self.classnames,
            "descriptions": self.descriptions,
            "hyperparameters": asdict(self.config),
            "support_counts": self.support_counts,
            "metrics": self.metrics,
            "history": self.history[-2000:],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` atomically (temp dir, then rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{time.time_ns()}")
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load saved tensors; buffers and parameters sized by the data (e.g. Tip-Adapter's
        cache keys) take the saved shape."""
        buffers, params = dict(self.named_buffers()), dict(self.named_parameters())
        for k, v in tensors.items():
            old = buffers.get(k, params.get(k))
            if old is None or old.shape == v.shape:
                continue
            if k not in self.data_sized or v.shape[1:] != old.shape[1:]:
                raise ModelFileError(
                    f"The model weights do not match a {self.label} model for {self.num_classes} classes on "
                    f"this backbone ('{k}' has shape {tuple(v.shape)}, expected {tuple(old.shape)}).")
            mod_name, _, leaf = k.rpartition(".")
            mod = self.get_submodule(mod_name) if mod_name else self
            if k in params:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(v, device=old.device),
                                                     requires_grad=old.requires_grad)
            else:
                mod.register_buffer(leaf, torch.empty_like(v, device=old.device))
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ModelFileError(
                f"The model weights do not match a {self.label} model for these classes "
                f"(missing {len(missing)}, unexpected {len(unexpected)} tensors).")
        if any(not torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
            raise ModelFileError(f"The {self.label} model weights contain NaN or infinite values.")


def make_method(method: str, backbone: Backbone, classnames: Sequence[str],
                descriptions: Sequence[str] | None = None, **overrides) -> Method:
    """Build an untrained method by name with the papers' defaults plus `overrides` (checked by
    `catalog.coerce_settings`: an unknown or ill-typed setting is a DataError)."""
    return get_method_class(method)(backbone, classnames, descriptions, make_config(method, **overrides))


def read_model_config(directory: str | os.PathLike) -> dict:
    """A saved model's config. Errors name the model folder by its own name, never its full
    path (the app's data folder is nobody's business on a public server)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    shown = f"{directory.name}/{CONFIG_FILE}"
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ModelFileError(f"The model folder {directory.name!r} is not a saved model: "
                             f"it needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise ModelFileError(f"{shown} could not be read ({e.strerror or type(e).__name__}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{shown} is not valid JSON ({e}).") from None
    except RecursionError:  # e.g. 100,000 nested lists: json gives up; a model config is a few levels deep
        raise ModelFileError(f"The model's {CONFIG_FILE} nests lists or objects too deeply to be a "
                             "Few-Shot Studio model config.") from None
    if not isinstance(cfg, dict) or cfg.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{shown} is not a Few-Shot Studio model config.")
    if cfg.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{shown} was written by a newer Few-Shot Studio; upgrade to load it.")
    return cfg


def _first_lower(sentence: str) -> str:
    """"The GraphAdapter setting ..." -> "the GraphAdapter setting ..." (to follow a colon)."""
    return "t" + sentence[1:] if sentence.startswith("The ") else sentence


def check_model_config(cfg: dict) -> tuple[type[Method], Any]:
    """The method class and its Config of a saved model's config.json (as `read_model_config`
    returns it), checked before anything is built: the method must be registered, the
    hyper-parameters must pass the catalog's one rule (type and bounds; `coerce_settings`), the
    classes must be a non-empty list of names, the descriptions (if any) one text or null per
    class, and the backbone an object. Anything else is a ModelFileError of one sentence."""
    from .catalog import coerce_settings

    name = cfg.get("method")
    if not isinstance(name, str) or name not in REGISTRY:
        raise ModelFileError(f"The model's config.json names method {name!r}, which is not one of "
                             f"{', '.join(sorted(REGISTRY))}.")
    cls = REGISTRY[name]
    hp = cfg.get("hyperparameters")
    if hp is None:
        hp = {}
    if not isinstance(hp, dict):
        raise ModelFileError("The model's config.json has hyperparameters that are not an object of settings.")
    try:
        config = cls.Config(**coerce_settings(name, hp))
    except DataError as e:
        raise ModelFileError(f"The model's config.json has an invalid setting: {_first_lower(str(e))}") from None
    classes = cfg.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise ModelFileError("The model's config.json must list its classes as a non-empty list of non-empty names.")
    descriptions = cfg.get("descriptions")
    if descriptions is not None and (not isinstance(descriptions, list) or len(descriptions) != len(classes)
                                     or not all(d is None or isinstance(d, str) for d in descriptions)):
        raise ModelFileError(f"The model's config.json must give one text description (or null) for each of "
                             f"its {len(classes)} classes.")
    if not isinstance(cfg.get("backbone") or {}, dict):
        raise ModelFileError("The model's config.json has a backbone entry that is not an object.")
    for key, kind, words in (("metrics", dict, "an object"), ("history", list, "a list")):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise ModelFileError(f"The model's config.json has {key} that are not {words}.")
    counts = cfg.get("support_counts")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(classes) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)):
        raise ModelFileError("The model's config.json must give one image count for each class.")
    return cls, config


def load_model(directory: str | os.PathLike, backbone: Backbone | None = None,
               device: str | None = None) -> Method:
    """Load a saved model directory. Its config.json is checked first (`check_model_config`:
    the catalog's rule for the hyper-parameters), so nothing is built, and no backbone loaded,
    for a model that will be refused. Loads its backbone unless one is given; the backbone's
    id must match the one the model was trained on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_model_config(directory)
    cls, config = check_model_config(cfg)
    bb = cfg.get("backbone") or {}
    if backbone is None:
        spec = BackboneSpec(name=bb.get("name", ""), pretrained=bb.get("pretrained"),
                            checkpoint=bb.get("checkpoint"), device=device)
        backbone = load_backbone(spec)
    if bb.get("id") and backbone.id != bb["id"]:
        raise ModelFileError(f"This model was trained on backbone {bb['id']}, but {backbone.id} is loaded; "
                             "load the matching backbone.")
    method = cls(backbone, cfg["classes"], cfg.get("descriptions"), config)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{directory / WEIGHTS_FILE} is not a valid safetensors file ({e}).") from None
    method.to(backbone.device)
    method.load_tensors({k: v.to(backbone.device) for k, v in tensors.items()})
    method.history = cfg.get("history") or []
    method.metrics = cfg.get("metrics") or {}
    method.support_counts = cfg.get("support_counts")
    method.eval()
    return method
