"""Backbone and checkpoint requests cannot exhaust memory or probe the server's files (issue #13,
finding 1): through the real HTTP endpoints (gradio_client), measuring this process's RSS (the
app runs in-process)."""
from __future__ import annotations

import gc

import pytest

from fewshot_studio import tiny as tiny_mod
from fewshot_studio.app import Workspace
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.config import AppConfig
from helpers import Endpoint, launch

pytestmark = pytest.mark.slow  # launches the app and builds (random-weight) ViT-B-32 models

MB = 2**20
#: What the requests may add to the process, all together. One ViT-B-32 (151 M fp32 weights) is
#: 580 MB, so a single one built and kept would break it.
GROWTH_LIMIT_MB = 250


def rss_mb() -> float:
    """This process's resident memory (the app runs inside it)."""
    gc.collect()
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def spellings(n: int) -> list[str]:
    """n different spellings of the shipped tiny weights' path (weights/./././…)."""
    d, f = tiny_mod.WEIGHTS_PATH.parent, tiny_mod.WEIGHTS_PATH.name
    return [str(d) + "/." * (i + 1) + "/" + f for i in range(n)]


def train_error(train: Endpoint, backbone: str, checkpoint: str = "") -> str:
    """The one sentence a /train request ends with ('' when it started a job)."""
    from gradio_client.exceptions import AppError

    try:
        train(Method="graph", Backbone=backbone, checkpoint=checkpoint)
    except AppError as e:
        return str(e)
    return ""


@pytest.fixture
def junk(tmp_path):
    p = tmp_path / "not-a-checkpoint.safetensors"
    p.write_bytes(b"\0" * 4096 + b"this is not a checkpoint" * 1000)
    return p


def start(tmp_path, hosted: bool, **config):
    from gradio_client import Client

    cfg = AppConfig.from_env(data_dir=tmp_path / "data", hosted=hosted, backbone="tiny", pretrained=None,
                             device="cpu", **config)
    ws = Workspace(cfg, BackboneSpec("tiny", None, device="cpu"))
    demo = launch(ws)
    client = Client(demo.local_url, verbose=False)
    client.predict("p", api_name="/create_project")
    client.predict("red circle", "", api_name="/add_class")
    return ws, demo, Endpoint(client, "/train")


def test_hosted_backbone_requests_keep_memory_bounded(tmp_path, junk):
    """20 hostile backbone/checkpoint requests to a public app: each refused in one sentence
    that does not say whether a server path exists, and memory stays bounded."""
    ws, demo, train = start(tmp_path, hosted=True)
    try:
        assert "add images" in train_error(train, "tiny")  # the default loads; warm-up
        base = peak = rss_mb()
        requests = ([("ViT-B-32", str(junk))] * 4 + [("ViT-B-32/openai", "")] * 2 + [("ViT-L-14", "")]
                    + [("tiny", p) for p in spellings(9)]
                    + [("tiny", "/etc/passwd"), ("tiny", "/no/such/file"), ("ViT-B-32", "/etc/passwd"),
                       ("RN50/openai", "")])
        assert len(requests) == 20
        errors = {}
        for backbone, ckpt in requests:
            errors[backbone, ckpt] = train_error(train, backbone, ckpt)
            peak = max(peak, rss_mb())
        print(f"hosted: RSS {base:.0f} MB before, peak {peak:.0f} MB, after {rss_mb():.0f} MB")
        for (backbone, ckpt), msg in errors.items():
            assert msg and "\n" not in msg, (backbone, ckpt, msg)
            if ckpt:  # the same sentence for any path: no oracle for the server's files
                assert msg == errors["tiny", "/no/such/file"], (ckpt, msg)
                assert ckpt not in msg and "exist" not in msg
        assert "tiny" in errors["ViT-L-14", ""]  # names what may be picked
        assert peak - base < GROWTH_LIMIT_MB, f"RSS grew {peak - base:.0f} MB"
        assert len(ws._backbones) <= 1
    finally:
        demo.close()
        ws.close()


def test_local_checkpoints_are_validated_first_and_cached_by_content(tmp_path, junk):
    """On one's own machine any path works, but a file that is not a checkpoint of the named
    model is refused before the model is built, and 40 spellings of one file are one backbone."""
    ws, demo, train = start(tmp_path, hosted=False)
    try:
        assert "add images" in train_error(train, "tiny")
        base = peak = rss_mb()
        for _ in range(6):
            msg = train_error(train, "ViT-B-32", str(junk))
            assert "Could not load the checkpoint" in msg and "\n" not in msg, msg
            peak = max(peak, rss_mb())
        print(f"local junk x6: RSS {base:.0f} MB before, peak {peak:.0f} MB")
        assert peak - base < GROWTH_LIMIT_MB, f"RSS grew {peak - base:.0f} MB"
        base = rss_mb()
        for p in spellings(40):
            assert "add images" in train_error(train, "tiny", p)
        grown = rss_mb() - base
        print(f"local 40 spellings: RSS grew {grown:.0f} MB; {len(ws._backbones)} backbones cached")
        assert len(ws._backbones) == 2  # the default tiny and the one checkpoint file
        assert grown < 100, f"RSS grew {grown:.0f} MB"
    finally:
        demo.close()
        ws.close()
