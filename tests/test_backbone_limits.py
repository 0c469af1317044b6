"""Backbone and checkpoint requests cannot exhaust memory or probe the server's files (issue #13,
finding 1): the core's allow-list, content-keyed LRU and check-before-build, then the real HTTP
endpoints (gradio_client), measuring this process's RSS (the app runs in-process)."""
from __future__ import annotations

import gc
import io
import json
import time
import types
import weakref
import zipfile

import pytest
import torch

from fewshot_studio import backbone as bb, tiny as tiny_mod
from fewshot_studio.app import Workspace, exports, modeling, projects
from fewshot_studio.backbone import BackboneSpec, load_backbone
from fewshot_studio.config import AppConfig
from fewshot_studio.errors import WeightsUnavailableError
from helpers import Endpoint, launch

MB = 2**20
#: What the requests may add to the process, all together. One ViT-B-32 (151 M fp32 weights) is
#: 580 MB, so a single one built and kept would break it.
GROWTH_LIMIT_MB = 250


def _status(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    """This process's resident memory (the app runs inside it)."""
    gc.collect()
    return _status("VmRSS")


def reset_peak() -> float:
    """Start measuring the peak RSS afresh (Linux: clear_refs 5 resets VmHWM); the RSS now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss_mb()


def peak_mb() -> float:
    """The highest RSS since reset_peak, between samples too (a model built and freed counts)."""
    return _status("VmHWM")


def spellings(n: int) -> list[str]:
    """n different spellings of the shipped tiny weights' path (weights/./././…)."""
    d, f = tiny_mod.WEIGHTS_PATH.parent, tiny_mod.WEIGHTS_PATH.name
    return [str(d) + "/." * (i + 1) + "/" + f for i in range(n)]


def config(tmp_path, hosted: bool, **kw) -> AppConfig:
    return AppConfig.from_env(data_dir=tmp_path / "data", hosted=hosted, device="cpu", **kw)


# ---- the core ------------------------------------------------------------------------------------
def test_allow_list_and_limit_are_read_from_the_environment():
    env = {"FEWSHOT_STUDIO_BACKBONES": " ViT-B-32/openai, tiny ,", "FEWSHOT_STUDIO_MAX_BACKBONES": "3"}
    c = AppConfig.from_env(env)
    assert c.backbones == ("ViT-B-32/openai", "tiny") and c.max_backbones == 3
    c = AppConfig.from_env({"FEWSHOT_STUDIO_MAX_BACKBONES": "many"})
    assert c.backbones == () and c.max_backbones == 2


def test_hosted_mode_offers_the_allow_list_and_no_server_paths(tmp_path, tiny):
    def loader(spec):
        raise AssertionError(f"nothing may be loaded for {spec}")

    ws = Workspace(config(tmp_path, True, backbones=("ViT-B-32/openai", "tiny")),
                   BackboneSpec("ViT-B-32", "openai", "/srv/operator/b32.safetensors", "cpu"), loader=loader)
    try:
        assert ws.allowed_backbones() == ["ViT-B-32/openai", "tiny"]
        sentences = set()
        for path in ("/etc/passwd", "/no/such/file", str(tiny_mod.WEIGHTS_PATH), "weights/../../etc/shadow"):
            for name in ("tiny", "ViT-B-32/openai", "ViT-L-14"):
                with pytest.raises(WeightsUnavailableError) as e:
                    ws.backbone(modeling.backbone_spec(ws, name, None, path))
                sentences.add(str(e.value))
        assert len(sentences) == 1  # one sentence for every path: it tells nothing about the files
        (msg,) = sentences
        assert "does not load checkpoints" in msg and "ViT-B-32/openai, tiny" in msg and "\n" not in msg
        for name in ("ViT-L-14", "ViT-B-32/laion2b_s34b_b79k", "local-dir:/etc", "hf-hub:x/y", "ViT-B-32//etc/passwd"):
            with pytest.raises(WeightsUnavailableError, match="offers only these backbones: ViT-B-32/openai, tiny"):
                ws.backbone(modeling.backbone_spec(ws, name))
        # the operator's own default (its checkpoint included) and the allowed names pass the check
        ws.check_backbone(ws.default_spec)
        ws.check_backbone(modeling.backbone_spec(ws, "ViT-B-32/openai"))
        ws.check_backbone(modeling.backbone_spec(ws, "tiny"))
        # an imported model's config is checked the same way, before anything loads
        for backbone in ({"name": "tiny", "checkpoint": "/etc/passwd"}, {"name": "ViT-L-14", "pretrained": "openai"},
                         {"name": ["tiny"], "checkpoint": 3}):
            with pytest.raises(WeightsUnavailableError):
                ws.backbone(ws.saved_spec({"backbone": backbone}))
    finally:
        ws.close()


def test_the_default_allow_list_is_the_default_backbone_and_tiny(tmp_path):
    ws = Workspace(config(tmp_path, True), BackboneSpec("ViT-B-16", "openai", device="cpu"))
    try:
        assert ws.allowed_backbones() == ["ViT-B-16/openai", "tiny"]
        from fewshot_studio.ui import presenters
        assert [v for _, v in presenters.backbone_choices(ws)] == ["ViT-B-16/openai", "tiny"]
    finally:
        ws.close()


def test_an_imported_model_naming_a_server_path_is_refused_in_one_sentence(tmp_path, tiny):
    local = Workspace(config(tmp_path / "a", False), BackboneSpec("tiny", None, device="cpu"), loader=lambda s: tiny)
    p = projects.load_example(local, "shapes")
    local.runner.wait(modeling.start_training(local.scope(p.id), "zeroshot"))
    zpath = exports.export_model(local.scope(p.id))
    buf = io.BytesIO()
    with zipfile.ZipFile(zpath) as src, zipfile.ZipFile(buf, "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            if n.endswith("config.json"):
                cfg = json.loads(data)
                cfg["backbone"] = {"name": "tiny", "pretrained": None, "checkpoint": "/etc/passwd"}
                data = json.dumps(cfg).encode()
            dst.writestr(n, data)
    loads = []
    hosted = Workspace(config(tmp_path / "b", True), BackboneSpec("tiny", None, device="cpu"),
                       loader=lambda s: loads.append(s) or tiny)
    try:
        sc = hosted.scope(projects.create_project(hosted, "q", owner="o").id, "o")
        with pytest.raises(WeightsUnavailableError) as e:
            exports.import_model(sc, buf.getvalue())
        assert "does not load checkpoints" in str(e.value) and "passwd" not in str(e.value)
        assert loads == [] and modeling.models(sc) == []
    finally:
        local.close()
        hosted.close()


def test_a_checkpoint_is_checked_before_the_model_is_built(tmp_path, monkeypatch):
    """The shipped tiny weights named as ViT-B-32, or a junk file: refused from the header,
    without building a model."""
    def no_build(*a, **k):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr(bb, "_create", no_build)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not really a zip" * 100)
    for name, path in (("ViT-B-32", tiny_mod.WEIGHTS_PATH), ("ViT-L-14", junk), ("ViT-B-32", tmp_path)):
        with pytest.raises(WeightsUnavailableError) as e:
            load_backbone(BackboneSpec(name, checkpoint=str(path), device="cpu"))
        assert "Could not load the checkpoint" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsUnavailableError, match="tensor names differ"):
        load_backbone(BackboneSpec("ViT-B-32", checkpoint=str(tiny_mod.WEIGHTS_PATH), device="cpu"))


class Fake:
    """A stand-in backbone: what the cache keeps, and whether it was freed."""

    def __init__(self, spec):
        self.spec, self.id = spec, f"fake-{spec.name}-{spec.checkpoint}"


def test_backbones_are_cached_by_content_bounded_and_freed(tmp_path):
    loads = []

    def loader(spec):
        loads.append(spec)
        return Fake(spec)

    ws = Workspace(config(tmp_path, False, max_backbones=2), BackboneSpec("tiny", None, device="cpu"), loader=loader)
    try:
        copy = tmp_path / "copy.safetensors"
        copy.write_bytes(tiny_mod.WEIGHTS_PATH.read_bytes())
        same = [*spellings(5), str(copy), str(tmp_path / "." / "copy.safetensors")]
        first = ws.backbone(BackboneSpec("tiny", None, same[0], "cpu"))
        assert all(ws.backbone(BackboneSpec("tiny", None, p, "cpu")) is first for p in same)
        assert len(loads) == 1
        ws.extractor(first)
        ws._models[1] = types.SimpleNamespace(backbone=first)  # a model loaded on it
        gone = weakref.ref(first)
        del first
        ws.backbone()  # the default: two loaded, the bound
        ws.backbone(BackboneSpec("ViT-B-32", "openai", None, "cpu"))  # a third: the least recent goes
        assert len(ws._backbones) == 2 and len(loads) == 3
        assert gone() is None  # freed: its extractor and the model on it were dropped too
        assert not ws._extractors and not ws._models
        ws.backbone()  # still cached, and now the most recent
        ws.backbone(BackboneSpec("tiny", None, same[0], "cpu"))
        assert [k[0] for k in ws._backbones] == ["tiny", "tiny"] and len(loads) == 4
    finally:
        ws.close()


# ---- over HTTP -----------------------------------------------------------------------------------
def train_error(endpoint: Endpoint, backbone: str, checkpoint: str = "", **more) -> str:
    """The one sentence a /train (or /evaluate) request ends with ('' when it started a job)."""
    from gradio_client.exceptions import AppError

    try:
        endpoint(**({"Method": "graph"} if endpoint.name == "/train" else {}), Backbone=backbone,
                 checkpoint=checkpoint, **more)
    except AppError as e:
        return str(e)
    return ""


@pytest.fixture
def junk(tmp_path):
    p = tmp_path / "not-a-checkpoint.safetensors"
    p.write_bytes(b"\0" * 4096 + b"this is not a checkpoint" * 1000)
    return p


def start(tmp_path, hosted: bool, **kw):
    from gradio_client import Client

    ws = Workspace(config(tmp_path, hosted, **kw), BackboneSpec("tiny", None, device="cpu"))
    demo = launch(ws)
    client = Client(demo.local_url, verbose=False)
    client.predict("p", api_name="/create_project")
    client.predict("red circle", "", api_name="/add_class")
    return ws, demo, Endpoint(client, "/train")


@pytest.mark.slow  # launches the app
def test_hosted_backbone_requests_keep_memory_bounded(tmp_path, junk):
    """20 hostile backbone/checkpoint requests to a public app: each refused in one sentence
    that does not say whether a server path exists, and memory stays bounded."""
    ws, demo, train = start(tmp_path, hosted=True)
    evaluate = Endpoint(train.client, "/evaluate")
    try:
        assert "add images" in train_error(train, "tiny")  # the default loads; warm-up
        base = reset_peak()
        requests = ([("ViT-B-32", str(junk))] * 4 + [("ViT-B-32/openai", "")] * 2 + [("ViT-L-14", "")]
                    + [("tiny", p) for p in spellings(7)]
                    + [("tiny", "/etc/passwd"), ("tiny", "/no/such/file"), ("ViT-B-32", "/etc/passwd"),
                       ("RN50/openai", "")])
        evaluations = [("ViT-B-32", str(junk)), ("tiny", "/etc/passwd")]  # the Evaluate tab's request
        assert len(requests) + len(evaluations) == 20
        errors = {}
        for backbone, ckpt in requests:
            errors[backbone, ckpt] = train_error(train, backbone, ckpt)
        for backbone, ckpt in evaluations:
            errors["evaluate", backbone, ckpt] = train_error(evaluate, backbone, ckpt, **{"Methods to compare": ["tip"]})
        peak = peak_mb()
        print(f"hosted, 20 requests: RSS {base:.0f} MB before, peak {peak:.0f} MB, after {rss_mb():.0f} MB")
        for key, msg in errors.items():
            assert msg and "\n" not in msg, (key, msg)
            if key[-1]:  # the same sentence for any path: no oracle for the server's files
                assert msg == errors["tiny", "/no/such/file"], (key, msg)
                assert key[-1] not in msg and "exist" not in msg
        assert "tiny" in errors["ViT-L-14", ""]  # names what may be picked
        assert peak - base < GROWTH_LIMIT_MB, f"RSS grew {peak - base:.0f} MB"
        assert len(ws._backbones) <= 1
    finally:
        demo.close()
        ws.close()


@pytest.mark.slow  # launches the app; builds nothing but tiny models
def test_local_checkpoints_are_validated_first_and_cached_by_content(tmp_path, junk):
    """On one's own machine any path works, but a file that is not a checkpoint of the named
    model is refused before the model is built, and 40 spellings of one file are one backbone."""
    ws, demo, train = start(tmp_path, hosted=False)
    try:
        assert "add images" in train_error(train, "tiny")
        base = reset_peak()
        for _ in range(6):
            msg = train_error(train, "ViT-B-32", str(junk))
            assert "Could not load the checkpoint" in msg and "\n" not in msg, msg
        peak = peak_mb()
        print(f"local, ViT-B-32 with a junk checkpoint x6: RSS {base:.0f} MB before, peak {peak:.0f} MB")
        assert peak - base < GROWTH_LIMIT_MB, f"RSS grew {peak - base:.0f} MB"
        base = reset_peak()
        t = time.perf_counter()
        for p in spellings(40):
            assert "add images" in train_error(train, "tiny", p)
        grown = peak_mb() - base
        print(f"local, 40 spellings of the tiny weights: peak RSS +{grown:.0f} MB in {time.perf_counter() - t:.0f} s; "
              f"{len(ws._backbones)} backbones cached")
        assert len(ws._backbones) == 2  # the default tiny and the one checkpoint file
        assert grown < 100, f"RSS grew {grown:.0f} MB"
    finally:
        demo.close()
        ws.close()


def test_a_legacy_torch_checkpoint_is_still_checked_from_its_tensors(tmp_path):
    """Files saved before torch's zip format cannot be memory-mapped: their tensors are read
    (weights only) and checked the same way, not refused for their format."""
    from fewshot_studio.backbone import _lazy_state_dict

    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"module.visual.proj": torch.zeros(2, 3)}}, path,
               _use_new_zipfile_serialization=False)
    state = _lazy_state_dict(str(path))
    assert list(state) == ["visual.proj"] and tuple(state["visual.proj"].shape) == (2, 3)
