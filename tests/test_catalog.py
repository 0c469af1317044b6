"""The method catalog: one place says what a method is, and the CLI, the app and the evaluation
all follow it; settings are checked by one strict rule everywhere.

A real small method defined here (a nearest-class-mean prototype classifier) is registered for
a test and shows up in the CLI's choices, trains through the CLI, lists and trains in the app,
and is evaluated; then it is removed again."""
from __future__ import annotations

import argparse
import time
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
BUILTIN_DISPLAY = ["graph", "mma", "tip", "tip-f", "gda", "proker", "zeroshot"]
BUILTIN_COST = ["zeroshot", "gda", "tip", "proker", "graph", "tip-f", "mma"]


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
        "GraphAdapter", "MMA", "Tip-Adapter", "Tip-Adapter-F", "GDA", "ProKeR", "Zero-shot CLIP"]
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
    assert str(e.value) == "Unknown method 'nope'; choose one of graph, mma, tip, tip-f, gda, proker, zeroshot."
    with pytest.raises(DataError, match="no setting 'gamma'"):
        catalog.setting_help("graph", "gamma")


def test_closed_form_methods_are_declared_once_and_refit_without_searching(tiny, shared_extractor, shapes_support):
    """Issue 14, item 5: `closed_form` on the class decides the instant refit; a fitted model's
    `fixed_settings` are valid settings that reproduce it without the search."""
    closed = [m for m in catalog.method_ids() if catalog.closed_form(m)]
    assert closed == ["tip", "gda", "proker"]  # display order; Tip-Adapter-F trains its keys
    assert all(catalog.closed_form(m) == catalog.get_method_class(m).closed_form for m in catalog.method_ids())
    feats = shared_extractor.image_features(shapes_support.images, views=(0,))[:, 0]
    for m in closed:
        fitted = make_method(m, tiny, shapes_support.classnames, augment_views=1).fit(shapes_support, shared_extractor)
        fixed = fitted.fixed_settings()
        assert fixed["search"] is False and catalog.coerce_settings(m, fixed) == fixed
        again = make_method(m, tiny, shapes_support.classnames, augment_views=1, **fixed)
        again.fit(shapes_support, shared_extractor)
        with torch.no_grad():
            torch.testing.assert_close(again.logits_from_features(feats), fitted.logits_from_features(feats),
                                       atol=1e-4, rtol=1e-4)
    assert make_method("graph", tiny, shapes_support.classnames).fixed_settings() == {}


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
    assert catalog.method_ids() == BUILTIN_DISPLAY + ["ncm"]
    assert option(subparser(parser, "train"), "--method").choices == catalog.choices() == ["auto", *catalog.method_ids()]
    methods = option(subparser(parser, "eval"), "--methods")
    assert methods.default == "zeroshot,ncm,gda,tip,proker,graph,tip-f,mma" and "ncm" in methods.help
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
    assert option(subparser(cli.build_parser(), "train"), "--method").choices == ["auto", *BUILTIN_DISPLAY]
    with pytest.raises(DataError, match="Unknown method 'ncm'"):
        make_method("ncm", None, ["a"])


def test_a_registered_method_appears_in_the_app(ncm, tiny, tmp_path):
    from fewshot_studio.ui import presenters
    from fewshot_studio.ui.presenters import label_for

    with workspace(tmp_path, tiny) as ws:
        assert presenters.method_choices(with_auto=True)[-1] == ("Nearest class mean", "ncm")  # the Train tab's radio
        assert [v for _, v in presenters.method_choices(with_auto=True)] == ["auto", *BUILTIN_DISPLAY, "ncm"]
        assert [v for _, v in presenters.method_choices()] == BUILTIN_DISPLAY + ["ncm"]  # the Evaluate tab's
        assert "ncm" not in catalog.auto_candidates(gpu=True)  # a plug-in joins Auto only when it says so
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


# ---- bounds: declared once, next to the help; enforced on every path (#13 findings 3 and 5) ------

def test_out_of_bounds_settings_are_refused_with_one_sentence():
    c = catalog.coerce_settings
    cases = [
        ("graph", {"steps": 10**7}, "The GraphAdapter setting 'steps' must be between 1 and 20000, not 10000000."),
        ("mma", {"rank": 8000}, "The MMA setting 'rank' must be between 1 and 256, not 8000."),
        ("graph", {"lr": 0}, "The GraphAdapter setting 'lr' must be between 1e-07 and 1, not 0."),
        ("graph", {"alpha": 2}, "The GraphAdapter setting 'alpha' must be between 0 and 1, not 2."),
        ("mma", {"seed": -1}, "The MMA setting 'seed' must be between 0 and 4294967295, not -1."),
        ("tip", {"search_steps": [5000, 20]},
         "The Tip-Adapter setting 'search_steps' must hold whole numbers between 1 and 500, not [5000, 20]."),
        ("tip", {"search_steps": [5, "a"]}, "The Tip-Adapter setting 'search_steps' must be a list of 2 whole numbers, "
                                            "not [5, 'a']."),
        ("zeroshot", {"templates": ["a {}", 3]},
         "The Zero-shot CLIP setting 'templates' must be a non-empty list of texts, not ['a {}', 3]."),
    ]
    for method, raw, sentence in cases:
        with pytest.raises(DataError) as e:
            c(method, raw)
        assert str(e.value) == sentence
    # the bounds themselves are inside (inclusive), from strings as the form sends them too
    assert c("graph", {"steps": 20000, "alpha": 0, "beta": 1, "lr": 1}) == {
        "steps": 20000, "alpha": 0.0, "beta": 1.0, "lr": 1.0}
    assert c("graph", {"steps": "1", "lr": "1e-7"}) == {"steps": 1, "lr": 1e-7}
    assert c("mma", {"rank": 256, "augment_views": 64, "batch_size": 512}) == {
        "rank": 256, "augment_views": 64, "batch_size": 512}
    assert c("tip", {"search_steps": [500, 1]}) == {"search_steps": (500, 1)}


def test_every_number_setting_has_bounds_and_every_default_lies_inside():
    assert catalog.bounds("graph")["steps"] == (1, 20000) and catalog.bounds("mma")["rank"] == (1, 256)
    for m in catalog.method_ids():
        cls, limits = catalog.get_method_class(m), catalog.bounds(m)
        for f in catalog.fields(cls.Config):
            d = catalog._default(f)
            numbers = d if isinstance(d, tuple) and all(isinstance(x, (int, float)) for x in d) else (
                (d,) if isinstance(d, (int, float)) and not isinstance(d, bool) else ())
            if numbers or f.name in ("start_block", "end_block", "steps"):
                assert f.name in limits, f"{m}.{f.name} has no bounds"
            lo, hi = limits.get(f.name, (None, None))
            assert all(lo <= x <= hi for x in numbers), f"{m}.{f.name}: {d} outside {lo}..{hi}"
        # the defaults pass the rule they declare
        assert catalog.coerce_settings(m, catalog.settings(m)) == {
            k: v for k, v in catalog.settings(m).items() if v is not None}


def test_a_method_whose_default_is_out_of_its_bounds_is_not_registered():
    @dataclass
    class BadConfig(MethodConfig):
        views: int = field(default=100, metadata={"help": "views", "min": 0, "max": 64})

    class Bad(NearestClassMean):
        name, label, Config = "bad", "Bad", BadConfig

    with pytest.raises(ValueError, match="outside its bounds"):
        catalog.register(Bad)
    assert "bad" not in catalog.REGISTRY


def test_make_method_refuses_a_huge_setting_before_building_anything(tiny, monkeypatch):
    from fewshot_studio.methods.graph_adapter import GraphAdapter

    built = []
    monkeypatch.setattr(GraphAdapter, "__init__", lambda self, *a, **k: built.append(a))
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        make_method("graph", tiny, ["a", "b"], steps=10**9)
    assert str(e.value) == "The GraphAdapter setting 'steps' must be between 1 and 20000, not 1000000000."
    assert built == [] and time.perf_counter() - t < 1.0


def test_the_cli_refuses_out_of_bounds_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "cache"))
    code = cli.main(["train", "--data", str(SHAPES), "--method", "graph", "--backbone", "tiny",
                     "--steps", "100000000", "--out", str(tmp_path / "m"), "--quiet"])
    assert code == 2 and not (tmp_path / "m").exists()
    assert capsys.readouterr().err == \
        "error: The GraphAdapter setting 'steps' must be between 1 and 20000, not 100000000.\n"


def test_the_train_form_refuses_out_of_bounds_before_loading_a_backbone(tiny, tmp_path):
    loads = []
    ws = Workspace.at(tmp_path / "data", TINY_SPEC, loader=lambda spec: loads.append(spec) or tiny)
    scope = ws.scope(projects.load_example(ws, "shapes").id)
    with pytest.raises(DataError) as e:
        modeling.start_training(scope, "mma", TINY_SPEC, {"rank": 8000})
    assert str(e.value) == "The MMA setting 'rank' must be between 1 and 256, not 8000."
    assert loads == [] and ws.runner.jobs(scope.id) == []
    ws.close()


POISONS = [  # (method, change to the saved hyper-parameters, the sentence)
    ("graph", {"alpha": "lots"}, "The model's config.json has an invalid setting: the GraphAdapter setting "
                                 "'alpha' must be a number, not 'lots'."),
    ("graph", {"steps": [1, 2]}, "The model's config.json has an invalid setting: the GraphAdapter setting "
                                 "'steps' must be a whole number, not [1, 2]."),
    ("graph", {"steps": 10**9}, "The model's config.json has an invalid setting: the GraphAdapter setting "
                                "'steps' must be between 1 and 20000, not 1000000000."),
    ("graph", {"gamma": 1}, f"The model's config.json has an invalid setting: GraphAdapter has no setting "
                            f"'gamma'; its settings are {GRAPH_SETTINGS}."),
    ("mma", {"rank": 8000}, "The model's config.json has an invalid setting: the MMA setting 'rank' must be "
                            "between 1 and 256, not 8000."),
]


def test_load_model_checks_the_saved_config_before_building_anything(tiny, tmp_path, monkeypatch):
    import json

    from fewshot_studio.errors import ModelFileError
    from fewshot_studio.methods import base
    from fewshot_studio.methods.mma import MMA

    saved = {m: make_method(m, tiny, ["red circle", "blue square"]).save(tmp_path / m) for m in ("graph", "mma")}
    for m, d in saved.items():  # a clean saved model loads
        assert load_model(d, backbone=tiny).name == m

    def refused(*a, **k):
        raise AssertionError("built or loaded something for a config that is refused")

    monkeypatch.setattr(base, "load_backbone", refused)
    monkeypatch.setattr(MMA, "__init__", refused)
    from fewshot_studio.methods.graph_adapter import GraphAdapter
    monkeypatch.setattr(GraphAdapter, "__init__", refused)

    def poisoned(which, change=None, top=None):
        d = tmp_path / f"p-{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        cfg = json.loads((saved[which] / "config.json").read_text())
        cfg["hyperparameters"].update(change or {})
        cfg.update(top or {})
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").write_bytes((saved[which] / "model.safetensors").read_bytes())
        return d

    for method, change, sentence in POISONS:
        with pytest.raises(ModelFileError) as e:
            load_model(poisoned(method, change))  # no backbone given: it would load one
        assert str(e.value) == sentence
    for top, sentence in [
        ({"classes": []}, "The model's config.json must list its classes as a non-empty list of non-empty names."),
        ({"classes": ["a", 3]}, "The model's config.json must list its classes as a non-empty list of non-empty names."),
        ({"classes": ["a", " "]}, "The model's config.json must list its classes as a non-empty list of non-empty names."),
        ({"descriptions": ["x"]}, "The model's config.json must give one text description (or null) for each of "
                                  "its 2 classes."),
        ({"descriptions": [None, 7]}, "The model's config.json must give one text description (or null) for each "
                                      "of its 2 classes."),
        ({"method": "nope"}, "The model's config.json names method 'nope', which is not one of "
                             "gda, graph, mma, proker, tip, tip-f, zeroshot."),
        ({"hyperparameters": [1]}, "The model's config.json has hyperparameters that are not an object of settings."),
    ]:
        with pytest.raises(ModelFileError) as e:
            load_model(poisoned("graph", top=top))
        assert str(e.value) == sentence


def test_every_choice_has_its_settings_described():
    """The Train tab builds one settings group per choice (auto included) from these."""
    for m in catalog.choices():
        assert isinstance(catalog.settings(m), dict) and isinstance(catalog.bounds(m), dict)
        assert isinstance(catalog.setting_choices(m), dict)
    assert catalog.setting_choices("mma") == {"recipe": ("default", "official")}
