"""Evaluation: splits, folds, cross-validation, the K-shot protocol and the `eval` command."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from fewshot_studio import cli, shapes, viz
from fewshot_studio.data import SupportSet
from fewshot_studio.errors import Cancelled, DataError
from fewshot_studio.evaluation import (Comparison, EvalResult, ProtocolReport, confusion_matrix, cross_validate,
                                       cv_folds, few_shot_split, run_protocol, usable_shots)
from fewshot_studio.methods import make_method

from helpers import NATO, make_task

THREE = {k: NATO[k] for k in ("alpha", "bravo", "charlie")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Fits here are on a few dozen feature vectors: a second OpenMP thread buys nothing, and on a
    shared, busy 2-core machine it makes each small op wait on a descheduled thread (10-30× slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cv_task():
    support, _, _ = make_task(THREE, shots=4, test_per_class=0, seed=5)
    return support


def _check_partition(folds, labels):
    n = len(labels)
    tested = np.concatenate([te for _, te in folds])
    for tr, te in folds:
        assert len(np.intersect1d(tr, te)) == 0
        assert np.array_equal(np.union1d(tr, te), np.arange(n))
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
        # every class keeps at least one training image
        assert set(labels[tr]) == set(labels)
    return tested


# ---- folds and splits ---------------------------------------------------------------------------------

def test_cv_folds_leave_one_out_for_tiny_sets():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    folds = cv_folds(labels, seed=3)
    assert len(folds) == len(labels)
    assert all(len(te) == 1 for _, te in folds)
    tested = _check_partition(folds, labels)
    assert sorted(tested.tolist()) == list(range(len(labels)))
    # LOO does not depend on the seed
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, cv_folds(labels, seed=99)))


def test_cv_folds_stratified_k_fold_disjoint_and_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [2, 3, 8, 10, 12]))  # 35 images > LOO limit
    folds = cv_folds(labels, seed=1)
    assert len(folds) == 5
    tested = _check_partition(folds, labels)
    assert sorted(tested.tolist()) == list(range(len(labels)))  # every index tested exactly once
    sizes = [len(te) for _, te in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in range(5):  # stratified: each class spread as evenly as possible over the folds
        per_fold = [int((labels[te] == c).sum()) for _, te in folds]
        assert max(per_fold) - min(per_fold) <= 1
    again = cv_folds(labels.tolist(), seed=1)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = cv_folds(labels, seed=2)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    assert len(cv_folds(labels, max_folds=3)) == 3


def test_cv_folds_single_image_classes_stay_in_training():
    labels = np.array([0, 1, 1, 2, 2, 2])
    folds = cv_folds(labels)
    tested = _check_partition(folds, labels)
    assert sorted(tested.tolist()) == [1, 2, 3, 4, 5]
    assert all(0 in tr for tr, _ in folds)
    assert cv_folds([0, 1, 2]) == [] and cv_folds([]) == []


def test_few_shot_split_samples_k_per_class_nested_and_deterministic():
    support, _, _ = make_task(THREE, shots=5, test_per_class=0, seed=1)
    labels = np.array(support.labels)
    prev = None
    for k in (1, 2, 4):
        tr, te = few_shot_split(support, k, seed=7)
        assert np.bincount(labels[tr]).tolist() == [k] * 3
        assert np.bincount(labels[te]).tolist() == [5 - k] * 3
        assert np.array_equal(np.union1d(tr, te), np.arange(15)) and len(np.intersect1d(tr, te)) == 0
        if prev is not None:
            assert set(prev) <= set(tr)  # the K-shot sets of one seed are nested
        prev = tr
        assert np.array_equal(tr, few_shot_split(support, k, seed=7)[0])
    assert any(not np.array_equal(few_shot_split(support, 2, s)[0], few_shot_split(support, 2, 7)[0])
               for s in range(3))
    tr, te = few_shot_split(support, 5, seed=0)  # exactly K: all to training
    assert len(tr) == 15 and len(te) == 0
    with pytest.raises(DataError, match="fewer than the 6 shots"):
        few_shot_split(support, 6, seed=0)


def test_usable_shots_skips_with_a_message():
    ok, skipped = usable_shots([5, 3, 9], ["a", "b", "c"], [1, 2, 3, 4], holdout=True)
    assert ok == [1, 2] and len(skipped) == 2 and "'b' has only 3 images" in skipped[0]
    ok, skipped = usable_shots([5, 3, 9], ["a", "b", "c"], [1, 2, 3, 4], holdout=False)
    assert ok == [1, 2, 3] and skipped == ["skipping 4 shots: class 'b' has only 3 images"]


def test_eval_result_metrics_from_predictions():
    r = EvalResult.from_predictions("tip", ["a", "b", "c"], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 0.5)
    assert r.confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert r.accuracy == pytest.approx(3 / 5) and r.n == 5 and r.correct == 3
    assert r.per_class_accuracy == {"a": 0.5, "b": pytest.approx(2 / 3), "c": None}
    assert confusion_matrix([2], [0], 3).tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    json.dumps(r.to_dict())


def test_best_breaks_ties_towards_the_cheaper_method():
    def res(m, pred):
        return EvalResult.from_predictions(m, ["a", "b"], [0, 1, 1], pred, 1.0)
    cmp = Comparison({"mma": res("mma", [0, 1, 1]), "graph": res("graph", [0, 1, 1]),
                      "zeroshot": res("zeroshot", [0, 0, 1]), "tip-f": res("tip-f", [0, 1, 1])}, "x", ["a", "b"])
    assert cmp.best == "graph"
    assert cmp.ranking() == ["graph", "tip-f", "mma", "zeroshot"]


# ---- cross-validation ---------------------------------------------------------------------------------

@pytest.mark.slow  # end to end: trains every method on every fold
def test_cross_validate_ranks_trained_methods_above_zero_shot(tiny, shared_extractor, cv_task):
    stages = []
    cmp = cross_validate(cv_task, ["zeroshot", "tip", "graph"], tiny, shared_extractor, seed=0,
                         progress=lambda p: stages.append(p))
    assert "leave-one-out over 12 images" in cmp.folds and cmp.n_folds == 12
    assert set(cmp.results) == {"zeroshot", "tip", "graph"}
    zs = cmp.results["zeroshot"].accuracy
    assert max(cmp.results["tip"].accuracy, cmp.results["graph"].accuracy) > zs + 0.2
    assert cmp.best != "zeroshot" and cmp.ranking()[-1] == "zeroshot"
    first = cmp.results["zeroshot"]
    for r in cmp.results.values():
        assert r.n == 12 and int(r.confusion.sum()) == r.n and r.confusion.shape == (3, 3)
        assert np.array_equal(r.indices, first.indices)  # the same folds for every method
        assert np.array_equal(r.y_true, np.array(cv_task.labels)[r.indices])
        for i, c in enumerate(cmp.classnames):
            assert r.per_class_accuracy[c] == pytest.approx(r.confusion[i, i] / r.confusion[i].sum())
        assert r.accuracy == pytest.approx(np.trace(r.confusion) / r.n)
        assert r.seconds > 0
    assert any(str(p).startswith("Evaluating GraphAdapter, fold 2/12") for p in stages)
    assert stages[-1].step == stages[-1].total == 36
    md = cmp.to_markdown().splitlines()
    assert md[0].startswith("Cross-validation: leave-one-out") and md[2].startswith("| Method | Accuracy (%)")
    assert len(md) == 4 + 3 and "(best)" in md[4]
    d = json.loads(json.dumps(cmp.to_dict()))
    assert d["best"] == cmp.best and d["results"]["tip"]["confusion"] == cmp.results["tip"].confusion.tolist()
    assert np.shape(viz.confusion_figure(cmp.results[cmp.best].confusion, cmp.classnames).data[0].z) == (3, 3)


def test_cross_validate_skips_methods_an_empty_class_rules_out(tiny, shared_extractor, cv_task):
    support = SupportSet(cv_task.classnames + ["delta"], cv_task.images, cv_task.labels)
    cmp = cross_validate(support, ["zeroshot", "graph"], tiny, shared_extractor)
    assert list(cmp.results) == ["zeroshot"] and "'delta'" in cmp.skipped["graph"]
    assert cmp.results["zeroshot"].per_class_accuracy["delta"] is None
    assert cmp.best == "zeroshot" and "graph: not evaluated" in cmp.to_markdown()


def test_cross_validate_errors_and_cancel(tiny, shared_extractor, cv_task):
    with pytest.raises(DataError, match="at least two images"):
        cross_validate(cv_task.subset([0, 4, 8]), ["zeroshot"], tiny, shared_extractor)
    with pytest.raises(DataError, match="Unknown method"):
        cross_validate(cv_task, ["nope"], tiny, shared_extractor)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        cross_validate(cv_task, ["tip"], tiny, shared_extractor, cancel=cancel)


# ---- the K-shot protocol ----------------------------------------------------------------------------

def test_run_protocol_mean_and_std_over_seeds(tiny, shared_extractor):
    pool, _, _ = make_task(THREE, shots=4, test_per_class=0, seed=21)
    report = run_protocol(pool, None, [2, 1, 9], [1, 2], ["zeroshot", "tip"], tiny, shared_extractor)
    assert isinstance(report, ProtocolReport)
    assert report.shots == [1, 2] and report.seeds == [1, 2] and len(report.runs) == 8
    assert report.skipped == ["skipping 9 shots: class 'alpha' has only 4 images (one must stay for testing)"]
    labels = np.array(pool.labels)
    for m in ("zeroshot", "tip"):
        for k in (1, 2):
            manual = []
            for seed in (1, 2):  # recompute each run by hand
                tr, te = few_shot_split(pool, k, seed)
                method = make_method(m, tiny, pool.classnames, seed=seed)
                method.fit(pool.subset(tr), shared_extractor)
                pred = method.predict_proba([pool.images[i] for i in te], shared_extractor).argmax(1).numpy()
                manual.append(float((pred == labels[te]).mean()))
                run = next(r for r in report.runs if (r["method"], r["shots"], r["seed"]) == (m, k, seed))
                assert run["n_test"] == 3 * (4 - k)
            assert report.accuracies(m, k).tolist() == pytest.approx(manual)
            assert report.mean(m, k) == pytest.approx(np.mean(manual))
            assert report.std(m, k) == pytest.approx(np.std(manual))  # population std over seeds
    md = report.to_markdown().splitlines()
    assert md[0] == "| Method | 1 shot | 2 shots |" and md[1] == "|---|---:|---:|"
    assert [row.split(" | ")[0] for row in md[2:]] == ["| Zero-shot CLIP", "| Tip-Adapter"]
    cell = md[3].split(" | ")[1]
    assert cell == f"{100 * report.mean('tip', 1):.1f} ± {100 * report.std('tip', 1):.1f}"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["summary"]["tip"]["2"]["mean"] == pytest.approx(report.mean("tip", 2), abs=1e-6)
    assert d["summary"]["tip"]["2"]["seeds"] == 2
    fig = viz.accuracy_plot(report)
    assert [t.name for t in fig.data] == ["Zero-shot CLIP", "Tip-Adapter"]
    assert list(fig.data[1].x) == [1, 2] and list(fig.data[1].error_y.array) == pytest.approx(
        [100 * report.std("tip", 1), 100 * report.std("tip", 2)])


def test_run_protocol_with_a_test_set_and_unusable_shots(tiny, shared_extractor):
    pool, test_refs, test_labels = make_task(THREE, shots=2, test_per_class=2, seed=22)
    report = run_protocol(pool, (test_refs, test_labels), [1, 2, 3], [0], ["zeroshot"], tiny, shared_extractor)
    assert report.shots == [1, 2] and all(r["n_test"] == 6 for r in report.runs)
    assert report.std("zeroshot", 1) == 0.0 and "6 held-out images" in report.test
    with pytest.raises(DataError, match="No requested shot count fits"):
        run_protocol(pool, None, [2, 4], [0], ["zeroshot"], tiny, shared_extractor)


# ---- the eval command ---------------------------------------------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fewshot_studio", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    classes = {"alpha": "red circle", "bravo": "blue square", "charlie": "green triangle"}
    shapes.write_image_folder(root / "train", classes, per_class=4, seed=31, size=48)
    shapes.write_image_folder(root / "test", classes, per_class=2, seed=32, size=48)
    return root


@pytest.mark.slow  # runs the CLI in a subprocess
def test_eval_command_end_to_end(shapes_folder, tmp_path):
    out_json, out_html = tmp_path / "out.json", tmp_path / "out.html"
    r = run_cli("eval", "--data", str(shapes_folder / "train"), "--backbone", "tiny", "--shots", "1,2",
                "--seeds", "1,2", "--methods", "zeroshot,tip", "--json", str(out_json), "--plot", str(out_html),
                env={"FEWSHOT_STUDIO_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| Method | 1 shot | 2 shots |" and len(table) == 4
    assert all(row.count(" ± ") == 2 for row in table[2:])
    d = json.loads(out_json.read_text())
    assert {"backbone", "classes", "methods", "shots", "seeds", "summary", "runs", "best"} <= set(d)
    assert d["shots"] == [1, 2] and d["seeds"] == [1, 2] and d["methods"] == ["zeroshot", "tip"]
    assert d["classes"] == ["alpha", "bravo", "charlie"] and len(d["runs"]) == 8
    assert set(d["summary"]["tip"]) == {"1", "2"} and set(d["summary"]["tip"]["1"]) == {"mean", "std", "seeds"}
    html = out_html.read_text()
    assert "plotly" in html.lower() and "Tip-Adapter" in html


@pytest.mark.slow  # runs the CLI in a subprocess
def test_eval_command_bad_shots_is_one_line_exit_2(shapes_folder):
    r = run_cli("eval", "--data", str(shapes_folder / "train"), "--backbone", "tiny", "--shots", "1,two")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--shots" in r.stderr and "'two'" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--shots", "0"], "at least 1"),
    (["--methods", "zeroshot,nope"], "Unknown method 'nope'"),
    (["--shots", "4,8"], "No requested shot count fits"),
])
def test_eval_command_user_errors(shapes_folder, capsys, args, needle):
    code = cli.main(["eval", "--data", str(shapes_folder / "train"), "--backbone", "tiny", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.strip().splitlines()[-1].startswith("error:")


def test_eval_command_with_test_folder_and_png_fallback(shapes_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec  # behave as if kaleido were missing, wherever the test runs
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "kaleido" else real(name, *a, **k))
    code = cli.main(["eval", "--data", str(shapes_folder / "train"), "--test-data", str(shapes_folder / "test"),
                     "--backbone", "tiny", "--shots", "2,4,8", "--seeds", "3", "--methods", "zeroshot,graph",
                     "--steps", "20", "--quiet", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "skipping 8 shots: class 'alpha' has only 4 images" in err
    assert "kaleido is not installed" in err and (tmp_path / "c.html").exists() and not (tmp_path / "c.png").exists()
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["shots"] == [2, 4] and all(r["n_test"] == 6 for r in d["runs"])
    assert "| GraphAdapter |" in out
