"""Auto (the `auto` method choice, evaluation/auto.py): it cross-validates the cheap methods on the
support set within a time budget, trains the best on all of it, records the winner and every
candidate's cross-validated accuracy in the model's config, and is deterministic for a seed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import NATO, CancelAfter, accuracy, make_task, same_state, state_of
from fewshot_studio.data import SupportSet
from fewshot_studio.errors import Cancelled, DataError
from fewshot_studio.evaluation import choose, choose_and_fit, cross_validate, run_protocol
from fewshot_studio.methods import catalog, load_model, read_model_config

CHEAP = ["zeroshot", "gda", "tip", "proker", "graph"]  # cheapest first (catalog.by_cost)
# one augmented view instead of 10, no Tip-Adapter grid search, 10 GraphAdapter steps: quick folds
QUICK = {"tip": {"augment_views": 1, "search": False}, "gda": {"augment_views": 1}, "proker": {"augment_views": 1},
         "graph": {"augment_views": 1, "steps": 10}}


@pytest.fixture(scope="module")
def task():
    """3 classes with uninformative names, 3 shots each (LOO: 9 folds), 10 test images each."""
    return make_task({k: NATO[k] for k in ("alpha", "bravo", "charlie")}, shots=3, test_per_class=10, seed=3)


@pytest.fixture(scope="module")
def fitted(task, shared_extractor, tiny):
    support, _, _ = task
    return choose_and_fit(support, tiny, shared_extractor, budget_s=None, seed=5, overrides=QUICK)


# ---- the catalog's one declaration ---------------------------------------------------------------
def test_catalog_offers_auto_once():
    assert catalog.choices() == [catalog.AUTO, *catalog.method_ids()]
    assert catalog.DEFAULT_CHOICE == catalog.AUTO and catalog.AUTO not in catalog.REGISTRY
    assert catalog.LABELS[catalog.AUTO] == catalog.label("auto") == "Auto"
    # the cheap methods; MMA (minutes of CPU steps per fit) only on a GPU or when asked
    assert catalog.auto_candidates() == CHEAP
    assert catalog.auto_candidates(gpu=True) == catalog.auto_candidates(with_mma=True) == CHEAP + ["mma"]
    assert catalog.settings("auto") == {"budget_s": catalog.AUTO_BUDGET_S, "with_mma": False, "seed": 0}
    with pytest.raises(DataError, match="The Auto setting 'budget_s' must be between 1 and 3600, not 0"):
        catalog.coerce_settings("auto", {"budget_s": 0})
    with pytest.raises(DataError, match="Auto has no setting 'steps'"):
        catalog.coerce_settings("auto", {"steps": 3})

    class Fake:  # no method may take the choice's id
        name, label, Config = "auto", "Fake", catalog.AutoConfig
    with pytest.raises(ValueError, match="Auto choice"):
        catalog.register(Fake)


# ---- choosing --------------------------------------------------------------------------------------
def test_auto_picks_the_best_cross_validated_and_records_every_score(fitted, task, shared_extractor, tiny):
    support, test, labels = task
    info = fitted.metrics["auto"]
    assert info["winner"] == fitted.name and fitted.name in CHEAP
    assert set(info["cv_accuracy"]) == set(CHEAP) and info["skipped"] == {}
    assert info["folds"] == "leave-one-out over 9 images (9 folds)" and info["seed"] == 5
    best = max(info["cv_accuracy"].values())
    assert info["cv_accuracy"][fitted.name] == best
    # ties go to the cheaper method
    assert all(catalog.by_cost([m, fitted.name])[0] == fitted.name
               for m, a in info["cv_accuracy"].items() if a == best)
    # uninformative names: zero-shot cannot win, and the winner generalises
    assert info["cv_accuracy"]["zeroshot"] < best and fitted.name != "zeroshot"
    assert accuracy(fitted, test, labels, shared_extractor) >= 0.8


def test_auto_is_deterministic_for_a_seed(fitted, task, shared_extractor, tiny):
    support, test, _ = task
    again = choose_and_fit(support, tiny, shared_extractor, budget_s=None, seed=5, overrides=QUICK)
    a, b = dict(fitted.metrics["auto"]), dict(again.metrics["auto"])
    a.pop("cv_seconds"), b.pop("cv_seconds")
    assert a == b and again.name == fitted.name
    assert same_state(state_of(again), state_of(fitted))
    assert torch.equal(again.predict_proba(test[:5], shared_extractor), fitted.predict_proba(test[:5], shared_extractor))


def test_the_saved_model_is_the_winners_with_autos_record(fitted, tmp_path, shared_extractor, task):
    _, test, _ = task
    fitted.save(tmp_path / "m")
    cfg = read_model_config(tmp_path / "m")
    assert cfg["method"] == fitted.name and cfg["metrics"]["auto"]["winner"] == fitted.name
    assert json.loads(json.dumps(cfg["metrics"]["auto"])) == cfg["metrics"]["auto"]
    back = load_model(tmp_path / "m", backbone=fitted.backbone)
    assert back.metrics["auto"]["cv_accuracy"] == fitted.metrics["auto"]["cv_accuracy"]
    assert torch.allclose(back.predict_proba(test, shared_extractor), fitted.predict_proba(test, shared_extractor))


def test_the_time_budget_drops_the_expensive_candidates(task, shared_extractor, tiny):
    """Once the budget is spent nothing more starts, but the cheapest candidate always finishes."""
    support, _, _ = task
    choice = choose(support, tiny, shared_extractor, budget_s=1e-9, seed=0, overrides=QUICK)
    assert choice.winner == "zeroshot" and list(choice.cv_accuracy) == ["zeroshot"]
    assert list(choice.skipped) == CHEAP[1:]
    assert all("time budget of 1e-09 s" in why for why in choice.skipped.values())


def test_a_candidate_whose_folds_would_overrun_the_budget_is_stopped(task, shared_extractor, tiny, monkeypatch):
    """A method whose remaining folds, at its fastest fold's pace, would pass the budget stops
    there (a partial score would be on other images than the rest's)."""
    from fewshot_studio.evaluation import runs

    support, _, _ = task
    now = [0.0]
    monkeypatch.setattr(runs, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    real = runs._fit_predict

    def slow(name, *a, **k):  # each fold of GDA "takes" 10 s; the others take no time
        now[0] += 10.0 if name == "gda" else 0.0
        return real(name, *a, **k)
    monkeypatch.setattr(runs, "_fit_predict", slow)
    comp = cross_validate(support, ["zeroshot", "gda", "tip"], tiny, shared_extractor, overrides=QUICK, budget_s=50)
    assert set(comp.results) == {"zeroshot", "tip"}
    assert comp.skipped["gda"].startswith("stopped after 1 of 9 folds: the rest would take about 80 s more")


def test_progress_stages_and_cancel(task, shared_extractor, tiny):
    """One job's stages say which candidate and fold Auto is at; cancel stops it within a fold."""
    support, _, _ = task
    flag = CancelAfter("Auto: Evaluating GDA", 0)
    with pytest.raises(Cancelled):
        choose_and_fit(support, tiny, shared_extractor, budget_s=None, seed=0, overrides=QUICK,
                       progress=flag, cancel=flag)
    stages = [p.stage for p in flag.seen]
    assert "Auto: Evaluating Zero-shot CLIP, fold 1/9" in stages
    assert not any(s.startswith(("Auto: Evaluating Tip-Adapter", "Auto chose")) for s in stages)


def test_auto_folds_are_five_above_ten_images(tiny, shared_extractor):
    """Leave-one-out up to 10 testable images, stratified 5-fold above (GraphAdapter's steps × 20
    folds would spend the budget at 4 shots); the names here are informative, so zero-shot ties
    at the top and, being cheapest, wins."""
    support, _, _ = make_task({"red circle": "red circle", "blue square": "blue square",
                               "green triangle": "green triangle"}, shots=4, test_per_class=0, seed=1)
    choice = choose(support, tiny, shared_extractor, budget_s=None, seed=0, overrides=QUICK)
    assert choice.folds == "stratified 5-fold over 12 images"
    assert choice.winner == "zeroshot" and choice.cv_accuracy["zeroshot"] == 1.0 and "cheaper" in choice.why


def test_one_shot_and_empty_classes(tiny, shared_extractor, task):
    support, _, _ = task
    one = support.subset([0, 3, 6])  # one image per class: nothing to hold out
    assert one.counts() == [1, 1, 1]
    # uninformative names: zero-shot CLIP gets the examples wrong, so the images decide (GDA)
    m = choose_and_fit(one, tiny, shared_extractor, seed=0)
    assert m.name == "gda" and m.metrics["auto"]["cv_accuracy"] == {}
    why = m.metrics["auto"]["why"]
    assert "no class has two images" in why and "names say little" in why, why
    # informative names: zero-shot CLIP names them right, so ProKeR stays close to it
    named, _, _ = make_task({"red circle": "red circle", "blue square": "blue square",
                             "green triangle": "green triangle"}, shots=1, test_per_class=0, seed=1)
    m = choose_and_fit(named, tiny, shared_extractor, seed=0)
    assert m.name == "proker" and "named 3 of the 3 examples right" in m.metrics["auto"]["why"]
    names = SupportSet(["alpha", "bravo"], [], [])  # no images at all: the method that needs none
    m = choose_and_fit(names, tiny, shared_extractor, seed=0)
    assert m.name == "zeroshot" and "needs no images" in m.metrics["auto"]["why"]


def test_cross_validation_refuses_auto_and_the_protocol_scores_it(fitted, task, tiny, shared_extractor):
    support, test, labels = task
    with pytest.raises(DataError, match="Auto is not cross-validated itself"):
        cross_validate(support, ["zeroshot", "auto"], tiny, shared_extractor)
    rep = run_protocol(support, (test, labels), [3], [5], ["zeroshot", "auto"], tiny, shared_extractor,
                       overrides=QUICK)
    assert rep.methods == ["zeroshot", "auto"] and rep.labels["auto"] == "Auto"
    # the 3-shot set is the whole support set: Auto trains what `fitted` did, tested on the same images
    assert rep.mean("auto", 3) == pytest.approx(accuracy(fitted, test, labels, shared_extractor))
    assert rep.mean("auto", 3) > rep.mean("zeroshot", 3)  # uninformative names


# ---- the app ------------------------------------------------------------------------------------------
def test_auto_summary_words():
    from fewshot_studio.ui import presenters

    metrics = {"auto": {"winner": "gda", "why": "the best cross-validated accuracy (9/9)",
                        "cv_accuracy": {"gda": 1.0, "tip": 0.889, "zeroshot": 0.333},
                        "correct": {"gda": "9/9", "tip": "8/9", "zeroshot": "3/9"},
                        "folds": "leave-one-out over 9 images (9 folds)",
                        "skipped": {"graph": "the time budget of 60 s was spent before it could start"}}}
    assert "chosen by Auto (cross-validated 100%)" in presenters.model_result("gda", metrics)
    line = presenters.auto_summary(metrics).replace("\\", "")  # (markdown escapes)
    assert "GDA 100% (9/9), Tip-Adapter 89% (8/9), Zero-shot CLIP 33% (3/9)" in line
    assert "it trained GDA" in line and "Not compared: GraphAdapter (the time budget" in line
    assert presenters.auto_summary({"train_accuracy": 1.0}) == ""
    assert [v for _, v in presenters.method_choices(with_auto=True)] == catalog.choices()
    assert "auto" not in [v for _, v in presenters.method_choices()]  # the Evaluate tab's choices


@pytest.mark.slow  # a training job end to end through the app's use cases
def test_app_trains_auto_and_retrains_it(tiny, tmp_path):
    from fewshot_studio.app import library, modeling, projects
    from fewshot_studio.ui import presenters
    from test_service import make_ws, png, wait_done

    ws = make_ws(tmp_path / "studio", tiny)
    try:
        p = projects.create_project(ws, "auto")
        sc = ws.scope(p.id)
        for n, label in enumerate(["red circle", "blue square"]):
            c = library.add_class(sc, label)
            library.add_images(sc, [png(tmp_path / f"{n}-{i}.png", label, 10 * n + i) for i in range(3)], c.id)
        with pytest.raises(DataError, match="The Auto setting 'budget_s'"):
            modeling.start_training(sc, "auto", settings={"budget_s": 0})
        wait_done(ws, modeling.start_training(sc, "auto", settings={"budget_s": 120, "seed": 2}))
        info = modeling.current_model_info(sc)
        assert info.method in CHEAP and info.metrics["auto"]["winner"] == info.method
        assert info.metrics["auto"]["budget_s"] == 120 and info.metrics["auto"]["seed"] == 2
        summary = presenters.model_summary(sc)
        assert "chosen by Auto" in summary and "Auto cross-validated on leave-one-out over 6 images" in summary
        # retraining a model Auto chose chooses again, with the same settings
        wait_done(ws, modeling.retrain(sc))
        again = modeling.current_model_info(sc)
        assert again.id != info.id and again.metrics["auto"]["seed"] == 2 and again.metrics["auto"]["budget_s"] == 120
    finally:
        ws.close()


@pytest.mark.slow  # trains end to end through the CLI (in-process)
def test_cli_train_predict_and_eval_with_auto(tmp_path, capsys, monkeypatch):
    from fewshot_studio import shapes
    from fewshot_studio.cli import main

    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "cache"))
    mapping = {k: NATO[k] for k in ("alpha", "bravo", "charlie")}
    shapes.write_image_folder(tmp_path / "train", mapping, per_class=3, seed=11)
    shapes.write_image_folder(tmp_path / "test", mapping, per_class=3, seed=12)
    assert main(["train", "--data", str(tmp_path / "train"), "--method", "auto", "--backbone", "tiny",
                 "--steps", "10", "--seed", "4", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    auto = cfg["metrics"]["auto"]
    assert cfg["method"] == auto["winner"] and set(auto["cv_accuracy"]) == set(CHEAP) and auto["seed"] == 4
    assert f"chose {cfg['method']}" in out and "cross-validated on leave-one-out over 9 images" in out
    assert main(["predict", "--model", str(tmp_path / "m"), "--json", str(tmp_path / "test")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(r["path"].split("/")[-2] == r["label"] for r in rows) >= 7
    # Auto's own settings belong to it alone
    assert main(["train", "--data", str(tmp_path / "train"), "--method", "tip", "--backbone", "tiny",
                 "--budget", "5", "--out", str(tmp_path / "m2")]) == 2
    assert "--budget and --with-mma are settings of --method auto" in capsys.readouterr().err
    # eval lists it and scores it like any method
    assert main(["eval", "--data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
                 "--methods", "zeroshot,auto", "--shots", "2", "--seeds", "1", "--backbone", "tiny",
                 "--steps", "10", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| Auto |" in table and "| Zero-shot CLIP |" in table
