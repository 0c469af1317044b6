"""Shared fixtures: the offline `tiny` backbone, synthetic coloured-shape tasks, the launched app
and the browser (plain helpers live in helpers.py)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from fewshot_studio.backbone import load_backbone
from fewshot_studio.cache import FeatureCache
from fewshot_studio.features import FeatureExtractor

from helpers import NATO, make_task

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _patient_url_ok(url: str) -> bool:
    """gradio.networking.url_ok with patience: Gradio's launch asks the new server for its page
    with a 3 s timeout and gives up on the first timeout ("When localhost is not accessible, a
    shareable link must be created"), which a busy 2-core CI machine hit twice in a day while
    the server was fine. Up to 60 s here, 10 s a try."""
    import time

    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.head(url, timeout=10, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


import gradio.networking  # noqa: E402 - after the environment above

gradio.networking.url_ok = _patient_url_ok


@pytest.fixture(scope="session")
def tiny():
    return load_backbone("tiny", device="cpu")


@pytest.fixture
def extractor(tiny, tmp_path):
    return FeatureExtractor(tiny, FeatureCache(tmp_path / "features"))


@pytest.fixture(scope="session")
def shared_extractor(tiny, tmp_path_factory):
    """One cache for the whole session: fast repeated feature look-ups across tests."""
    return FeatureExtractor(tiny, FeatureCache(tmp_path_factory.mktemp("features")))


@pytest.fixture(scope="session")
def nato_task():
    """5 classes with uninformative names, 4 shots each, 20 held-out images per class."""
    return make_task(NATO, shots=4, test_per_class=20, seed=7)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app with the tiny backbone on a free loopback port, one per test module."""
    from fewshot_studio.backbone import BackboneSpec
    from fewshot_studio.app import Workspace

    from helpers import launch

    studio = Workspace.at(tmp_path_factory.mktemp("data"), BackboneSpec("tiny", None, device="cpu"))
    demo = launch(studio)
    yield demo
    demo.close()
    studio.close()


@pytest.fixture
def client(app):
    from gradio_client import Client

    return Client(app.local_url, verbose=False)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (requirements-dev.txt), one per test module."""
    from playwright.sync_api import sync_playwright

    from helpers import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def studio(tmp_path):
    """A Workspace on the tiny backbone in a fresh data folder (the browser tests' app runs on it);
    test files with a richer `studio` define their own."""
    from fewshot_studio.app import Workspace
    from fewshot_studio.backbone import BackboneSpec

    s = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"))
    yield s
    s.close()
