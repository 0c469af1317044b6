"""The feature cache: a second request for the same images never reaches the encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_studio.cache import FeatureCache
from fewshot_studio.features import FeatureExtractor

from conftest import make_refs


@pytest.fixture
def refs():
    return make_refs("red circle", 3, np.random.default_rng(0)) + make_refs("blue star", 3, np.random.default_rng(1))


def test_second_request_skips_encoder(tiny, tmp_path, refs, monkeypatch):
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path))
    first = ex.image_features(refs, views=(0, 1, 2))
    assert first.shape == (6, 3, 64) and ex.encoded_images == 18
    assert torch.allclose(first.norm(dim=-1), torch.ones(6, 3), atol=1e-5)

    def boom(*a, **k):
        raise AssertionError("encoder called on a cache hit")

    monkeypatch.setattr(tiny, "encode_images", boom)
    # same process, and a fresh cache object reading only the disk
    assert torch.equal(ex.image_features(refs, views=(0, 1, 2)), first)
    cold = FeatureExtractor(tiny, FeatureCache(tmp_path, memory=False))
    assert torch.equal(cold.image_features(refs, views=(0, 1, 2)), first)
    assert cold.encoded_images == 0


def test_only_missing_entries_are_encoded(tiny, tmp_path, refs):
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path))
    ex.image_features(refs[:4], views=(0,))
    ex.image_features(refs, views=(0, 1))
    assert ex.encoded_images == 4 + (2 + 6)  # two new images' plain views + six new augmented views


def test_cache_matches_direct_encoding_and_keys_by_backbone(tiny, tmp_path, refs):
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path))
    feats = ex.image_features(refs, views=(0,))[:, 0]
    direct = tiny.encode_images(torch.stack([tiny.preprocess(r.open()) for r in refs]))
    assert torch.allclose(feats, direct, atol=1e-6)
    files = list(tmp_path.rglob("*.f32"))
    assert len(files) == 6 and all(tiny.id in str(f) for f in files)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSHOT_STUDIO_CACHE", str(tmp_path / "c"))
    assert FeatureCache().root == tmp_path / "c"
    monkeypatch.delenv("FEWSHOT_STUDIO_CACHE")
    monkeypatch.setenv("FEWSHOT_STUDIO_DATA", str(tmp_path / "d"))
    assert FeatureCache().root == tmp_path / "d" / "features"


def test_corrupt_cache_entry_is_recomputed(tiny, tmp_path, refs):
    ex = FeatureExtractor(tiny, FeatureCache(tmp_path))
    good = ex.image_features(refs[:1])
    f = next(tmp_path.rglob("*.f32"))
    f.write_bytes(b"garbage")
    ex2 = FeatureExtractor(tiny, FeatureCache(tmp_path, memory=False))
    assert torch.equal(ex2.image_features(refs[:1]), good) and ex2.encoded_images == 1


def test_a_cache_folder_deleted_while_in_use_is_recreated(tiny, tmp_path):
    import shutil

    many = make_refs("green cross", 40, np.random.default_rng(7))
    cache = FeatureCache(tmp_path / "c")
    for decode in ("process", "thread"):
        # small batches: several chunks, so the helper process writes entries too
        FeatureExtractor(tiny, cache, batch_size=8, decode=decode).image_features(many)
        shutil.rmtree(tmp_path / "c")  # e.g. the user cleared the cache while the app runs
        cache.clear_memory()
        ex = FeatureExtractor(tiny, cache, batch_size=8, decode=decode)
        ex.image_features(many)
        assert ex.encoded_images == 40 and len(list((tmp_path / "c").rglob("*.f32"))) == 40
        shutil.rmtree(tmp_path / "c")
        cache.clear_memory()
