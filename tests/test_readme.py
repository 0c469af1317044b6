"""The README's set-up commands, Python examples and command lines run exactly as written."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Subcommands the command-line test leaves out: minutes long (pretrain-tiny rewrites the packaged
# weights in place; bench measures the machine). Their arguments are still checked with --help.
SKIPPED = {"pretrain-tiny", "bench"}


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks tagged `lang` ("" for untagged ones), in order."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if tag == lang]


def _commands(block: str) -> list[list[str]]:
    """The block's shell commands as argument lists (continuations joined, comments dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def _env(tmp_path: Path) -> dict[str, str]:
    """A fresh environment: offline, its own data folder, the checkout importable from anywhere
    (what `pip install -e .` gives; the README's test command installs it as well)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEWSHOT_STUDIO_")}
    pythonpath = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return {**env, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": pythonpath,
            "FEWSHOT_STUDIO_DATA": str(tmp_path / "data")}


def _requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip()]


# ---- set-up (fast, static) -----------------------------------------------------------------------

def test_readme_first_command_installs_the_project():
    first = _blocks(README[:README.index("\n## ")], "bash")[0]
    assert re.search(r"pip install (-e )?\.( |$)", first), first  # not just requirements.txt
    assert "python app.py" in first
    assert "--index-url https://download.pytorch.org/whl/cpu" in README  # the CPU-only hint
    assert "~/.local/share/fewshot-studio" in README[:README.index("## The app")]  # the data folder, up top


def test_test_command_installs_the_project_and_matches_ci():
    command = "pip install -r requirements-dev.txt && python -m pytest -q"
    top = _blocks(README[:README.index("\n## ")], "bash")
    assert any(command in block for block in top), "the README's test command changed: update .ci/run too"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements-dev.txt" in ci and "\npython -m pytest -q\n" in ci
    dev = _requirements(ROOT / "requirements-dev.txt")
    assert any(re.fullmatch(r"-e \.(\[dev\])?", line) for line in dev), dev


def test_requirements_match_pyproject_and_suit_a_space():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirements(ROOT / "requirements.txt")
    # a Hugging Face Space installs requirements.txt before the repository is copied in
    assert not [r for r in runtime if r.startswith(("-e", ".", "-r"))], runtime
    assert sorted(runtime) == sorted(project["dependencies"])
    dev = _requirements(ROOT / "requirements-dev.txt")
    if "-e .[dev]" not in dev:
        assert set(project["optional-dependencies"]["dev"]) <= set(dev)


def test_readme_paths_exist():
    """Every repository path the README's commands name is there (they run from the root)."""
    for block in _blocks(README, "bash") + _blocks(README, ""):
        for argv in _commands(block):
            for arg in argv:
                if arg.startswith(("assets/", "fewshot_studio/", "docs/")):
                    assert (ROOT / arg).exists(), arg


# ---- the Python API blocks, each on its own in a fresh folder -------------------------------------

PY_BLOCKS = _blocks(_section("Python API"), "python")


def test_readme_has_the_python_blocks():
    assert len(PY_BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs_on_its_own(tmp_path, index):
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(PY_BLOCKS[index])
    r = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
    if "JobRunner" in PY_BLOCKS[index]:
        assert r.stdout.splitlines()[-1].startswith("done "), r.stdout


# ---- the command-line block, with the bundled example data ----------------------------------------

def _cli_commands() -> list[list[str]]:
    blocks = _blocks(_section("Command line"), "bash")
    assert len(blocks) == 1
    return [argv for argv in _commands(blocks[0])]


def test_readme_cli_commands_parse():
    """Every line is `python -m fewshot_studio ...` with arguments the parser accepts."""
    from fewshot_studio.cli import build_parser

    parser = build_parser()
    commands = _cli_commands()
    assert {argv[3] for argv in commands} >= {"train", "predict", "graph", "eval", "pretrain-tiny", "bench"}
    for argv in commands:
        assert argv[:3] == ["python", "-m", "fewshot_studio"], argv
        parser.parse_args(argv[3:])  # exits (SystemExit) on a bad option


def _quick(argv: list[str]) -> list[str]:
    """eval at 1 shot and 1 seed (the README's run takes minutes); everything else as written."""
    out = list(argv)
    if out[3] == "eval":
        for flag in ("--shots", "--seeds"):
            if flag in out:
                out[out.index(flag) + 1] = "1"
            else:
                out += [flag, "1"]
    return out


@pytest.mark.slow
def test_readme_cli_commands_run(tmp_path):
    """The block's commands, in order, in a copy of the repository's example data (the README says
    to run them in the repository root): each exits 0 and prints what the README says."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "assets", work / "assets")
    env = _env(tmp_path)
    ran = []
    for argv in _cli_commands():
        if argv[3] in SKIPPED:
            continue
        argv = _quick(argv)
        r = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stderr[-3000:]}"
        if argv[3] == "predict":
            model = "--model" if "--model" in argv else "--onnx"  # a saved model or its ONNX export
            n_images = sum(len(list((work / p).rglob("*.png"))) if (work / p).is_dir() else 1
                           for p in argv[argv.index(model) + 2:] if p != "--json")
            if "--json" in argv:
                rows = json.loads(r.stdout)
                assert len(rows) == n_images and all("label" in row for row in rows)
            else:
                assert len(r.stdout.splitlines()) == n_images
        elif argv[3] == "graph" and "--json" in argv:
            assert json.loads(r.stdout)["classes"]
        elif argv[3] == "inspect":
            found = json.loads((work / argv[argv.index("--json") + 1]).read_text())
            assert set(found) == {"duplicates", "label_issues", "outliers"}
        elif argv[3] == "export-onnx":
            assert (work / argv[argv.index("--out") + 1]).stat().st_size > 0
        elif argv[3] == "label":
            import pyarrow.parquet as pq

            table = pq.read_table(work / argv[argv.index("--output") + 1])
            assert table.num_rows == len(list((work / argv[argv.index("--input") + 1]).rglob("*.png")))
        elif argv[3] == "eval":
            assert "| Method |" in r.stdout
            for flag in ("--json", "--plot"):
                if flag in argv:
                    assert (work / argv[argv.index(flag) + 1]).is_file()
        ran.append(argv[3])
    assert ran[0] == "train" and {"predict", "graph", "eval", "inspect", "export-onnx", "label"} <= set(ran)
