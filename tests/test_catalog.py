"""The method catalog: one place says what a method is, and the CLI, the app and the evaluation
all follow it; settings are checked by one strict rule everywhere.

A real small method defined here (a nearest-class-mean prototype classifier) is registered for
a test and shows up in the CLI's choices, trains through the CLI, lists and trains in the app,
and is evaluated; then it is removed again."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from fewshot_studio import cli, evaluation
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.data import SupportSet
from fewshot_studio.errors import DataError
from fewshot_studio.methods import Method, catalog, load_model, make_config, make_method
from fewshot_studio.methods.base import MethodConfig
from fewshot_studio.app import Workspace, modeling, projects
from fewshot_studio.app.projects import ASSETS

from helpers import accuracy

TINY_SPEC = BackboneSpec("tiny", None, device="cpu")


def workspace(root, tiny) -> Workspace:
    """A workspace that hands out the session's loaded tiny backbone (the loader is injected)."""
    return Workspace.at(root, TINY_SPEC, loader=lambda spec: tiny)

SHAPES = ASSETS / "shapes" / "train"  # 5 classes x 4 images, bundled
BUILTIN_DISPLAY = ["graph", "mma", "tip", "tip-f", "zeroshot"]
BUILTIN_COST = ["zeroshot", "tip", "graph", "tip-f", "mma"]


# ---- a real method, defined outside the package ------------------------------------------------

@dataclass
class NearestClassMeanConfig(MethodConfig):
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature"})
    views: int = field(default=0, metadata={"help": "augmented views averaged into each prototype"})


class NearestClassMean(Method):
    """Prototype classifier on the frozen image features: a class's prototype is the normalised
    mean of its normalised support features; probabilities = softmax(cos(f, prototype) / T)."""

    name = "ncm"
    label = "Nearest class mean"
    summary = "Nearest class mean: one prototype per class, the mean of its image features; nothing trains."
    cost = 0
    order = 9
    Config = NearestClassMeanConfig

    def __init__(self, backbone, classnames, descriptions=None, config=None):
        super().__init__(backbone, classnames, descriptions, config)
        self.register_buffer("prototypes", torch.zeros(len(self.classnames), backbone.embed_dim))

    def _fit(self, support, extractor, progress, cancel):
        self._check_support(support)
        views = range(1 + max(0, int(self.config.views)))
        feats = extractor.image_features(support.images, views=views, progress=progress, cancel=cancel)
        feats = F.normalize(feats.float().mean(1), dim=-1)
        proto = torch.zeros(self.num_classes, feats.shape[-1]).index_add_(0, support.labels_tensor(), feats)
        self.prototypes = F.normalize(proto, dim=-1).to(self._device())

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.prototypes.T / self.config.temperature


@pytest.fixture
def ncm():
    catalog.register(NearestClassMean)  # in a method module: `@register` on the class
    try:
        yield NearestClassMean
    finally:
        catalog.unregister("ncm")


@pytest.fixture(scope="module")
def shapes_support():
    support, errors = SupportSet.from_folder(SHAPES)
    assert errors == [] and support.num_classes == 5
    return support


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


# ---- the catalog itself ----------------------------------------------------------------------------

def test_the_builtin_methods_in_display_and_cost_order():
    assert catalog.method_ids() == BUILTIN_DISPLAY
    assert catalog.by_cost(catalog.method_ids()) == BUILTIN_COST
    assert catalog.by_cost(["mma", "nope", "zeroshot"]) == ["zeroshot", "mma", "nope"]
    assert list(evaluation.COST_ORDER) == BUILTIN_COST == list(evaluation.DEFAULT_METHODS)
    assert [catalog.label(m) for m in BUILTIN_DISPLAY] == [
        "GraphAdapter", "MMA", "Tip-Adapter", "Tip-Adapter-F", "Zero-shot CLIP"]
    assert dict(catalog.LABELS) == {m: catalog.label(m) for m in BUILTIN_DISPLAY} and list(catalog.ORDER) == BUILTIN_DISPLAY
    assert all(catalog.summary(m) for m in BUILTIN_DISPLAY)
    assert catalog.setting_help("graph", "alpha") == "α: textual vs visual sub-graph fusion"
    assert catalog.setting_help("tip-f", "alpha") == "α: weight of the cache logits"
    assert catalog.setting_help("mma", "seed") == "seed"
    graph = catalog.settings("graph")
    assert graph["steps"] == 300 and graph["alpha"] == 0.7 and "templates" not in graph
    assert catalog.settings("mma")["steps"] is None and catalog.settings("tip")["search"] is True
    with pytest.raises(DataError) as e:
        catalog.get_method_class("nope")
    assert str(e.value) == "Unknown method 'nope'; choose one of graph, mma, tip, tip-f, zeroshot."
    with pytest.raises(DataError, match="no setting 'gamma'"):
        catalog.setting_help("graph", "gamma")


GRAPH_SETTINGS = "alpha, augment_views, beta, groups, lr, seed, steps, templates, weight_decay"


def test_coerce_settings_is_strict_with_one_sentence():
    c = catalog.coerce_settings
    with pytest.raises(DataError) as e:
        c("graph", {"gamma": 1})
    assert str(e.value) == f"GraphAdapter has no setting 'gamma'; its settings are {GRAPH_SETTINGS}."
    with pytest.raises(DataError) as e:
        c("mma", {"steps": "lots"})
    assert str(e.value) == "The MMA setting 'steps' must be a whole number, not 'lots'."
    with pytest.raises(DataError) as e:
        c("mma", {"steps": 2.5})
    assert str(e.value) == "The MMA setting 'steps' must be a whole number, not 2.5."
    with pytest.raises(DataError) as e:
        c("graph", {"lr": "fast"})
    assert str(e.value) == "The GraphAdapter setting 'lr' must be a number, not 'fast'."
    with pytest.raises(DataError) as e:
        c("mma", {"cache_lower": "maybe"})
    assert str(e.value) == "The MMA setting 'cache_lower' must be true or false, not 'maybe'."
    for bad in ({"cache_lower": 2}, {"steps": True}, {"lr": float("nan")}, {"steps": [3]}):
        with pytest.raises(DataError):
            c("mma", bad)
    # blanks mean "the default": left out, and the Config then has its default
    assert c("mma", {"steps": "", "start_block": None, "lr": "  "}) == {}
    assert make_config("mma", steps="", lr=None).steps is None and make_config("graph", steps=None).steps == 300
    assert c("graph", {"steps": 2.0, "lr": "0.01", "alpha": 1, "seed": "3"}) == {
        "steps": 2, "lr": 0.01, "alpha": 1.0, "seed": 3}
    assert c("mma", {"cache_lower": 0}) == {"cache_lower": False} and c("mma", {"cache_lower": True}) == {
        "cache_lower": True}
    # settings that are not numbers or switches pass through for code (a saved model's retraining)
    assert c("tip", {"search_scale": [7, 3], "templates": None}) == {"search_scale": (7, 3)}


def test_every_entry_point_refuses_an_unknown_setting_with_the_same_sentence(tiny, tmp_path, capsys, monkeypatch):
    ws = workspace(tmp_path / "data", tiny)
    with pytest.raises(DataError) as e:
        catalog.coerce_settings("tip", {"steps": 5})
    sentence = str(e.value)
    assert sentence.startswith("Tip-Adapter has no setting 'steps'; its settings are ") and sentence.count(". ") == 0
    with pytest.raises(DataError) as e:
        make_method("tip", tiny, ["a", "b"], steps=5)
    assert str(e.value) == sentence
    with pytest.raises(DataError) as e:  # the app's Train form
        modeling.start_training(ws.scope(projects.create_project(ws, "p").id), "tip", TINY_SPEC, {"steps": 5})
    assert str(e.value) == sentence
    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "cache"))
    code = cli.main(["train", "--data", str(SHAPES), "--method", "tip", "--backbone", "tiny", "--steps", "5",
                     "--out", str(tmp_path / "m"), "--quiet"])
    assert code == 2 and capsys.readouterr().err == f"error: {sentence}\n" and not (tmp_path / "m").exists()


# ---- a new method appears everywhere -------------------------------------------------------------

def test_a_registered_method_appears_in_the_cli(ncm, tiny, tmp_path, monkeypatch, capsys):
    parser = cli.build_parser()
    assert option(subparser(parser, "train"), "--method").choices == catalog.method_ids() == BUILTIN_DISPLAY + ["ncm"]
    methods = option(subparser(parser, "eval"), "--methods")
    assert methods.default == "zeroshot,ncm,tip,graph,tip-f,mma" and "ncm" in methods.help
    assert parser.parse_args(["eval", "--data", "x"]).methods.split(",") == list(evaluation.DEFAULT_METHODS)

    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ncm-model"
    code = cli.main(["train", "--data", str(SHAPES), "--method", "ncm", "--backbone", "tiny", "--out", str(out),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("saved Nearest class mean (20 images, 5 classes)")
    model = load_model(out, backbone=tiny)
    assert isinstance(model, NearestClassMean) and model.config.temperature == 0.05
    support, _ = SupportSet.from_folder(SHAPES)
    from fewshot_studio.cache import FeatureCache
    from fewshot_studio.features import FeatureExtractor

    extractor = FeatureExtractor(tiny, FeatureCache(tmp_path / "cache"))
    assert accuracy(model, support.images, support.labels_tensor(), extractor) == 1.0  # its own prototypes

    code = cli.main(["train", "--data", str(SHAPES), "--method", "ncm", "--backbone", "tiny", "--out", str(out),
                     "--steps", "3", "--quiet"])
    assert code == 2 and "Nearest class mean has no setting 'steps'; its settings are seed, temperature, views." \
        in capsys.readouterr().err


def test_an_unregistered_method_is_gone_again():
    assert "ncm" not in catalog.REGISTRY
    assert option(subparser(cli.build_parser(), "train"), "--method").choices == BUILTIN_DISPLAY
    with pytest.raises(DataError, match="Unknown method 'ncm'"):
        make_method("ncm", None, ["a"])


def test_a_registered_method_appears_in_the_app(ncm, tiny, tmp_path):
    from fewshot_studio.ui import presenters
    from fewshot_studio.ui.presenters import label_for

    with workspace(tmp_path, tiny) as ws:
        assert presenters.method_choices()[-1] == ("Nearest class mean", "ncm")  # the Train tab's radio
        assert [v for _, v in presenters.method_choices()] == BUILTIN_DISPLAY + ["ncm"]
        assert catalog.settings("ncm") == {"seed": 0, "temperature": 0.05, "views": 0}
        assert catalog.coerce_settings("ncm", {"temperature": "0.1", "views": "", "seed": 2.0}) == {
            "temperature": 0.1, "seed": 2}
        assert label_for("ncm", "temperature") == "Nearest class mean · softmax temperature"
        scope = ws.scope(projects.load_example(ws, "shapes").id)
        job = ws.runner.wait(modeling.start_training(scope, "ncm", TINY_SPEC, {"temperature": "0.1", "views": ""}),
                             timeout=300)
        assert job.status == "done", job.message
        info, method = modeling.current_model(scope)
        assert info.method == "ncm" and method.config.temperature == 0.1 and method.label == "Nearest class mean"
        with pytest.raises(DataError, match="Nearest class mean has no setting 'steps'"):
            modeling.start_training(scope, "ncm", TINY_SPEC, {"steps": 3})


def test_a_registered_method_is_evaluated(ncm, tiny, shared_extractor, shapes_support):
    cmp = evaluation.cross_validate(shapes_support, ["ncm", "zeroshot"], tiny, shared_extractor, seed=0)
    assert cmp.n_folds == 20 and set(cmp.results) == {"ncm", "zeroshot"}
    r = cmp.results["ncm"]
    assert r.label == "Nearest class mean" and r.n == 20
    assert r.accuracy >= 0.8  # chance is 0.2 with 5 classes
    assert "Nearest class mean" in cmp.to_markdown()
    # the evaluation's overrides follow the same strict rule
    cmp = evaluation.cross_validate(shapes_support, ["ncm", "zeroshot"], tiny, shared_extractor,
                                    overrides={"ncm": {"temperature": "0.2", "steps": 5}})
    assert cmp.skipped["ncm"].startswith("Nearest class mean has no setting 'steps'")
