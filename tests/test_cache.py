"""The feature cache: a second request for the same images never reaches the encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_studio.cache import FeatureCache
from fewshot_studio.features import FeatureExtractor

from helpers import make_refs


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
    assert FeatureCache(tmp_path).keys(tiny.id) == {(r.hash, 0) for r in refs}
    packs = list(tmp_path.rglob("*.pack"))
    assert packs and all(tiny.id in str(f) for f in packs)
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
    f = next(tmp_path.rglob("*.pack"))
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
        assert ex.encoded_images == 40 and len(FeatureCache(tmp_path / "c").keys(tiny.id)) == 40
        shutil.rmtree(tmp_path / "c")
        cache.clear_memory()


def _rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_packs_written_by_another_instance_are_found_after_a_miss(tmp_path):
    reader, writer = FeatureCache(tmp_path), FeatureCache(tmp_path)  # e.g. the app and a helper process
    assert reader.get_many("bb", [("a" * 64, 0)]) == [None]  # the reader has indexed the (empty) folder
    writer.put_many("bb", [("a" * 64, 0), ("b" * 64, 3)], _rows(2))
    got = reader.get_many("bb", [("b" * 64, 3), ("a" * 64, 0), ("c" * 64, 0)], dim=8)
    assert np.array_equal(got[0], _rows(2)[1]) and np.array_equal(got[1], _rows(2)[0]) and got[2] is None
    assert reader.get_many("bb", [("a" * 64, 0)], dim=4) == [None]  # another dimension is a miss
    assert reader.get_many("other", [("a" * 64, 0)]) == [None]  # keyed by backbone
    assert reader.keys("bb") == {("a" * 64, 0), ("b" * 64, 3)}


def test_a_damaged_or_deleted_pack_only_loses_its_own_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put_many("bb", [("a" * 64, 0)], _rows(1, seed=1))
    cache.put_many("bb", [("b" * 64, 0)], _rows(1, seed=2))
    cache.put_many("bb", [("c" * 64, 0)], _rows(1, seed=3))
    packs = sorted((tmp_path / "bb").glob("*.pack"))
    assert len(packs) == 3
    indexed = FeatureCache(tmp_path, memory=False)
    assert all(r is not None for r in indexed.get_many("bb", [("a" * 64, 0), ("b" * 64, 0), ("c" * 64, 0)]))
    packs[0].write_bytes(packs[0].read_bytes()[:-4])  # truncated: a torn copy, say
    packs[1].unlink()
    fresh = FeatureCache(tmp_path, memory=False)
    for c in (fresh, indexed):  # a new reader, and one that had indexed the packs before
        got = c.get_many("bb", [("a" * 64, 0), ("b" * 64, 0), ("c" * 64, 0)])
        assert got[0] is None and got[1] is None and np.array_equal(got[2], _rows(1, seed=3)[0])
    # writing the lost entries again makes them whole
    cache.put_many("bb", [("a" * 64, 0), ("b" * 64, 0)], np.concatenate([_rows(1, seed=1), _rows(1, seed=2)]))
    assert np.array_equal(fresh.get("bb", "a" * 64, 0), _rows(1, seed=1)[0])


def test_one_pack_per_write_and_a_large_pack_round_trips(tmp_path):
    cache = FeatureCache(tmp_path)
    keys = [(f"{i:064x}", i % 3) for i in range(3000)]
    feats = _rows(3000, d=512)  # 6 MB: more than one write() may take
    cache.put_many("bb", keys, feats)
    assert len(list((tmp_path / "bb").glob("*.pack"))) == 1 and not list(tmp_path.rglob("*.tmp"))
    got = FeatureCache(tmp_path, memory=False).get_many("bb", keys[::-1], dim=512)
    assert np.array_equal(np.stack(got), feats[::-1])


def test_many_small_packs_are_merged_and_readers_follow(tmp_path, monkeypatch):
    import fewshot_studio.cache as cache_module

    writer = FeatureCache(tmp_path)
    keys = [(f"{i:064x}", 0) for i in range(12)]
    rows = _rows(12)
    early = FeatureCache(tmp_path, memory=False)
    for k in range(6):  # one pack per write, as when images are added one at a time
        writer.put_many("bb", keys[2 * k:2 * k + 2], rows[2 * k:2 * k + 2])
    assert np.array_equal(early.get("bb", *keys[0]), rows[0])  # `early` has indexed all six packs
    writer.put_many("bb", keys[:1], rows[:1])  # an entry written twice stays one entry
    monkeypatch.setattr(cache_module, "COMPACT_AT", 4)
    assert FeatureCache(tmp_path).get_many("bb", keys[:1])[0] is not None  # this lookup merges
    assert len(list((tmp_path / "bb").glob("*.pack"))) == 1
    for reader in (FeatureCache(tmp_path, memory=False), early):  # `early` finds its packs gone
        assert np.array_equal(np.stack(reader.get_many("bb", keys)), rows)
    assert FeatureCache(tmp_path).keys("bb") == set(keys)
