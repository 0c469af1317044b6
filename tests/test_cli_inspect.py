"""`python -m fewshot_studio inspect`: the JSON schema of the issue, planted faults first in each
list, paths as given on the command line, one-line user errors."""
from __future__ import annotations

import json

import pytest

from fewshot_studio.cli import main

from test_insight import plant


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return plant(tmp_path_factory.mktemp("cli_planted"))


def run(planted, tmp_path, *extra):
    data, pool = planted
    out = tmp_path / "report.json"
    rc = main(["inspect", "--data", str(data), "--pool", str(pool), "--backbone", "tiny", "--quiet",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(out), *extra])
    return rc, out


def test_inspect_json_schema_and_planted_faults(planted, tmp_path, capsys):
    rc, out = run(planted, tmp_path)
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == {"duplicates", "label_issues", "outliers"}
    data, pool = planted
    d = report["duplicates"][0]
    assert set(d) == {"a", "b", "similarity"}
    assert {d["a"], d["b"]} == {str(data / "red star" / "000.png"), str(data / "red star" / "copy.jpg")}
    sims = [x["similarity"] for x in report["duplicates"]]
    assert sims == sorted(sims, reverse=True)
    issue = report["label_issues"][0]
    assert issue == {"path": str(data / "blue square" / "wrong.png"), "given": "blue square",
                     "suggested": "green triangle", "score": issue["score"]}
    assert [x["score"] for x in report["label_issues"]] == sorted((x["score"] for x in report["label_issues"]),
                                                                  reverse=True)
    o = report["outliers"][0]
    assert set(o) == {"path", "score"} and o["path"] == str(pool / "odd.png")
    assert "near-duplicate pairs" in capsys.readouterr().out


def test_inspect_user_errors(tmp_path, capsys):
    assert main(["inspect", "--data", str(tmp_path / "missing"), "--backbone", "tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d" / "a").mkdir(parents=True)
    assert main(["inspect", "--data", str(tmp_path / "d"), "--backbone", "tiny", "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threshold" in err


@pytest.mark.slow  # the map runs UMAP: numba compiles its kernels on first use
def test_inspect_writes_a_standalone_map(planted, tmp_path):
    page = tmp_path / "map.html"
    rc, _ = run(planted, tmp_path, "--map", str(page))
    assert rc == 0
    html = page.read_text()
    assert "plotly" in html.lower() and "odd.png" in html and "copy.jpg" in html
