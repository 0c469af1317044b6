"""`python -m fewshot_studio label` on this machine (fewshot_studio/labeling.py, issue 18): a row
for every file, error rows for bad files, shards written atomically, --resume after a kill, the
inputs it takes and its one-sentence errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewshot_studio import labeling
from fewshot_studio.cli import main
from fewshot_studio.errors import DataError

from helpers import ROOT, labeling_set

N_IMAGES = 200


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return labeling_set(tmp_path_factory.mktemp("label"), N_IMAGES)


def run_cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fewshot_studio", "label", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def check_complete(out: Path, files: dict) -> pa.Table:
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(files["good"] + files["bad"])  # every file once: none lost, none twice
    errs = dict(zip(paths, table.column("error").to_pylist()))
    assert all(errs[b] for b in files["bad"]) and not any(errs[g] for g in files["good"])
    return table


@pytest.mark.slow
def test_label_writes_a_row_per_file_and_resumes_after_a_kill(files, tmp_path):
    out = tmp_path / "out.parquet"
    # small shards, so the kill lands between shards with some written and some not
    proc = run_cli("--model", files["model"], "--input", files["images"], "--output", str(out),
                   "--shard-rows", "32", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"))
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = pq.read_table(out)
    before, bad_before = first.num_rows, first.column("error").drop_null().length()
    assert 0 < before < N_IMAGES + 3
    again = run_cli("--model", files["model"], "--input", files["images"], "--output", str(out), "--resume",
                    "--shard-rows", "32", "--cache-dir", str(tmp_path / "cache"))
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert f"{before:,} done before" in stdout and f"{3 - bad_before} unreadable" in stdout
    assert "images/s" in stderr and "ETA" in stderr  # the progress line
    table = check_complete(out, files)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # the columns the issue names, and a full row
    assert {"path", "sha256", "label", "confidence", "topk", "probs", "error"} <= set(table.column_names)
    row = table.filter(pa.compute.equal(table["path"], files["good"][0])).to_pylist()[0]
    assert row["label"] == row["topk"][0]["class"] and row["confidence"] == pytest.approx(max(row["probs"]))
    assert len(row["sha256"]) == 64 and abs(sum(row["probs"]) - 1) < 1e-5
    # a finished run resumed again has nothing to do
    assert main(["label", "--model", files["model"], "--input", files["images"], "--output", str(out), "--resume",
                 "--quiet"]) == 0
    assert pq.read_table(out).num_rows == N_IMAGES + 3


@pytest.mark.slow
def test_label_in_process_top_k_embeddings_and_list_inputs(files, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    chosen = files["good"][:20] + files["bad"][:1] + [str(tmp_path / "gone.png")]
    listing.write_text("# a comment\n" + "\n".join(chosen) + "\n")
    out = tmp_path / "emb"
    assert main(["label", "--model", files["model"], "--input", str(listing), "--input", files["good"][0],
                 "--output", str(out), "--top-k", "2", "--embeddings", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == chosen  # listed order, the repeated file once
    assert table.schema.field("embedding").type.list_size > 0
    ok = table.filter(table["error"].is_null())
    assert all(len(t) == 2 for t in ok.column("topk").to_pylist())
    emb = ok.column("embedding").to_pylist()
    assert all(abs(sum(x * x for x in e) - 1) < 1e-4 for e in emb)  # L2-normalised features
    gone = table.filter(pa.compute.equal(table["path"], chosen[-1])).to_pylist()[0]
    assert "does not exist" in gone["error"] and gone["label"] is None
    assert "labeled 20 images (2 unreadable" in capsys.readouterr().out


def test_expand_inputs_folders_globs_lists_once(files, tmp_path):
    listing = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": files["good"][:3]}), listing)
    got = labeling.expand_inputs([str(listing), files["good"][0], os.path.join(files["images"], "sub", "*.png")])
    assert got[:3] == files["good"][:3]
    assert len(got) == len(set(got)) and all("/sub/" in p for p in got[3:])
    folder = labeling.expand_inputs([files["images"]])
    assert len(folder) == N_IMAGES + 3
    with pytest.raises(DataError, match="No file matches"):
        labeling.expand_inputs([str(tmp_path / "nothing-*.png")])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="'path' column"):
        labeling.expand_inputs([str(bad)])


def test_output_is_refused_without_resume_and_shards_are_atomic(tmp_path):
    table = pa.table({"path": ["a", "b"]})
    folder, done = labeling.prepare_output(tmp_path / "out", resume=False)
    assert done == set()
    labeling.write_shard(folder, 0, table)
    (folder / ".part-00001.abc.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    (folder / "part-00002.parquet").write_bytes(b"PAR1 cut")  # a writer that does not rename (Ray)
    assert pq.read_table(folder / "part-00000.parquet").num_rows == 2
    with pytest.raises(DataError, match="--resume"):
        labeling.prepare_output(folder, resume=False)
    folder, done = labeling.prepare_output(folder, resume=True)
    assert done == {"a", "b"} and [p.name for p in folder.iterdir()] != []
    assert sorted(p.name for p in folder.iterdir()) == [".broken-part-00002.parquet", "part-00000.parquet"]
    assert pq.read_table(folder).num_rows == 2  # hidden files are not part of the table
    assert labeling.next_shard_index(folder) == 1


def test_ray_flag_without_ray_says_how_to_install(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [scale] extra were not installed
    code = main(["label", "--model", files["model"], "--input", files["images"], "--output", str(tmp_path / "o"),
                 "--ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and 'pip install "fewshot-studio[scale]"' in err
    assert not (tmp_path / "o").exists()
