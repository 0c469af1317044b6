"""Data insight (fewshot_studio.insight): planted faults are found at the top of their lists, a
clean project has no label issues, the map is deterministic for a seed."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_studio import insight
from fewshot_studio.data import ImageRef, SupportSet, list_image_files
from fewshot_studio.shapes import ShapeSpec, render, write_image_folder

CLASSES = {"red star": "red star", "blue square": "blue square", "green triangle": "green triangle"}


def near_copy(path: Path) -> bytes:
    """The image re-encoded as JPEG (quality 90) with 1 px cropped off each side."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    buf = io.BytesIO()
    im.crop((1, 1, w - 1, h - 1)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def plant(root: Path, faults: bool = True) -> tuple[Path, Path]:
    """An ImageFolder of 3 classes × 5 renders (96 px) and a pool of 3 per class; with `faults`:
    a near-copy of an example (data/red star/copy.jpg), a green triangle filed under blue
    square (data/blue square/wrong.png) and a yellow star in the pool (pool/odd.png)."""
    data, pool = root / "data", root / "pool"
    write_image_folder(data, CLASSES, per_class=5, seed=1, size=96)
    write_image_folder(pool, {k.replace(" ", "_"): v for k, v in CLASSES.items()}, per_class=3, seed=2, size=96)
    if faults:
        rng = np.random.default_rng(3)
        render(ShapeSpec("yellow", "star"), rng, 96).save(pool / "odd.png")
        render(ShapeSpec("green", "triangle"), rng, 96).save(data / "blue square" / "wrong.png")
        (data / "red star" / "copy.jpg").write_bytes(near_copy(data / "red star" / "000.png"))
    return data, pool


def features(extractor, refs):
    return extractor.image_features(refs)[:, 0].numpy()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return plant(tmp_path_factory.mktemp("planted"))


def load(extractor, data: Path, pool: Path):
    support, _ = SupportSet.from_folder(data)
    pool_refs = [ImageRef.from_path(p) for p in list_image_files([pool])]
    return support, pool_refs, features(extractor, support.images), features(extractor, pool_refs)


def test_planted_duplicate_is_the_top_pair(shared_extractor, planted):
    support, pool, ex, pf = load(shared_extractor, *planted)
    names = [r.name for r in support.images] + [r.name for r in pool]
    pairs = insight.near_duplicates(np.concatenate([ex, pf]))
    assert pairs, "the planted copy was not found at the default threshold"
    i, j, s = pairs[0]
    assert {Path(names[i]).name, Path(names[j]).name} == {"000.png", "copy.jpg"}
    assert all(Path(names[k]).parent.name == "red star" for k in (i, j))
    assert s >= insight.DUPLICATE_THRESHOLD and s == max(p[2] for p in pairs)
    groups = insight.duplicate_groups(pairs, len(names))
    assert i in groups[0] and j in groups[0]


def test_near_duplicates_blocks_groups_and_across():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x[7] = x[3] + 0.01 * rng.normal(size=16)          # a pair within group 0
    x[40] = x[5] + 0.01 * rng.normal(size=16)         # a pair across groups
    groups = [0] * 30 + [1] * 20
    whole = insight.near_duplicates(x, 0.99)
    assert {(i, j) for i, j, _ in whole} == {(3, 7), (5, 40)}
    assert insight.near_duplicates(x, 0.99, block=4) == whole            # blocks change nothing
    assert [(i, j) for i, j, _ in insight.near_duplicates(x, 0.99, groups, across_only=True)] == [(5, 40)]
    # brute force over every pair agrees
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    assert len(whole) == int((np.triu(s, 1) >= 0.99).sum())


def test_planted_mislabel_is_the_top_label_issue(shared_extractor, planted):
    support, _, ex, _ = load(shared_extractor, *planted)
    probs, tested = insight.out_of_sample_probs(ex, support.labels, support.num_classes)
    assert tested.all() and np.allclose(probs.sum(1), 1)
    issues = insight.label_issues(support.labels, probs, tested)
    assert issues, "the example filed in the wrong class was not flagged"
    top = issues[0]
    assert Path(support.images[top.index].name).name == "wrong.png"
    assert support.classnames[top.given] == "blue square"
    assert support.classnames[top.suggested] == "green triangle"
    assert top.score > 0.5 and top.confidence > 0.5


def test_clean_project_has_no_label_issues(shared_extractor, tmp_path):
    data, _ = plant(tmp_path, faults=False)
    support, _ = SupportSet.from_folder(data)
    ex = features(shared_extractor, support.images)
    probs, tested = insight.out_of_sample_probs(ex, support.labels, support.num_classes)
    assert insight.label_issues(support.labels, probs, tested) == []


def test_single_image_class_is_not_judged():
    x = np.eye(4, 8, dtype=np.float32) + 0.01
    probs, tested = insight.out_of_sample_probs(x, [0, 0, 1, 2], 3)
    assert tested.tolist() == [True, True, False, False]
    assert np.allclose(probs[3], 1 / 3)


def test_planted_outlier_is_the_top_outlier(shared_extractor, planted):
    support, pool, ex, pf = load(shared_extractor, *planted)
    found, threshold = insight.outliers(pf, ex, support.labels, support.num_classes)
    assert found and Path(pool[found[0][0]].name).name == "odd.png"
    assert -1.0 <= threshold <= 1.0
    scores = insight.outlier_scores(pf, ex, support.labels, support.num_classes)
    assert int(np.argmin(scores)) == found[0][0]


def test_class_dispersion_spots_the_mixed_class(shared_extractor, planted):
    support, _, ex, _ = load(shared_extractor, *planted)
    spread = insight.class_dispersion(ex, support.labels, support.num_classes)
    assert support.classnames[int(np.nanargmax(spread))] == "blue square"   # holds the green triangle


def test_small_map_is_pca_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8))
    a, b = insight.embedding_map(x, seed=1), insight.embedding_map(x, seed=2)
    assert a.method == "pca" and a.coords.shape == (10, 2)
    assert np.array_equal(a.coords, b.coords)
    assert insight.embedding_map(np.zeros((0, 8))).coords.shape == (0, 2)


@pytest.mark.slow  # numba compiles umap-learn's kernels on first use: about a minute on 2 cores
def test_umap_map_is_deterministic_for_a_seed_and_extends():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    x = centres[rng.integers(0, 4, 120)] + 0.3 * rng.normal(size=(120, 32))
    a = insight.embedding_map(x, seed=3, n_epochs=50)
    b = insight.embedding_map(x, seed=3, n_epochs=50)
    c = insight.embedding_map(x, seed=4, n_epochs=50)
    assert a.method == "umap" and a.coords.shape == (120, 2)
    assert np.array_equal(a.coords, b.coords)
    assert not np.allclose(a.coords, c.coords)
    new = insight.extend_map(a, x[:3] + 0.01)
    assert new.shape == (3, 2) and np.isfinite(new).all()


# ---- the app's use cases (fewshot_studio.app.insight) ------------------------------------------
def small_project(ws, root: Path):
    """A project with 3 classes × 3 renders plus the three planted faults: 14 images, so its map
    is the instant PCA one."""
    from fewshot_studio.app import library, projects

    rng = np.random.default_rng(5)
    scope = ws.scope(projects.create_project(ws, "faults").id)
    for name in CLASSES:
        c = library.add_class(scope, name)
        files = []
        for k in range(3):
            p = root / f"{name.replace(' ', '_')}_{k}.png"
            render(ShapeSpec(*name.split(" ")), rng, 96).save(p)
            files.append(p)
        if name == "red star":
            (root / "copy.jpg").write_bytes(near_copy(files[0]))
            files.append(root / "copy.jpg")
        if name == "blue square":
            render(ShapeSpec("green", "triangle"), rng, 96).save(root / "wrong.png")
            files.append(root / "wrong.png")
        library.add_images(scope, files, c.id)
    pool = []
    for k, name in enumerate(["red star", "blue square"]):
        render(ShapeSpec(*name.split(" ")), rng, 96).save(root / f"pool_{k}.png")
        pool.append(root / f"pool_{k}.png")
    render(ShapeSpec("yellow", "star"), rng, 96).save(root / "odd.png")
    library.add_images(scope, pool + [root / "odd.png"], None)
    return scope


def test_app_inspection_finds_the_planted_faults_and_keeps_one(tiny, tmp_path):
    from fewshot_studio.app import insight as app_insight

    from test_service import make_ws, wait_done

    ws = make_ws(tmp_path / "data", tiny)
    try:
        scope = small_project(ws, tmp_path)
        result = wait_done(ws, app_insight.start(scope)).result
        assert result is app_insight.latest(scope)
        assert result.map_method == "pca" and len(result.points) == 14
        names = {p.image_id: Path(p.name).name for p in result.points}
        top = {names[i] for i, _ in result.duplicates[0]}
        assert top == {"red_star_0.png", "copy.jpg"}
        assert result.label_issues[0].name.endswith("wrong.png")
        assert (result.label_issues[0].given, result.label_issues[0].suggested) == ("blue square", "green triangle")
        assert names[result.outliers[0][0]] == "odd.png"
        assert app_insight.outlier_ids(scope) == {i for i, _ in result.outliers}
        odd = next(p for p in result.points if names[p.image_id] == "odd.png")
        assert odd.outlier and not odd.example
        from fewshot_studio.app import exports

        flags = {Path(r["file"]).name: r["unlike_every_class"] for r in exports.label_records(scope)}
        assert flags["odd.png"] is True and flags["pool_0.png"] is False and flags["copy.jpg"] is None
        # the upload note: the copy looks like an image already there
        copy_id = next(i for i, n in names.items() if n == "copy.jpg")
        assert app_insight.look_alikes(scope, [copy_id]) == 1
        keep = next(i for i, n in names.items() if n == "red_star_0.png")
        app_insight.keep_one(scope, [i for i, _ in result.duplicates[0]], keep)
        left = {i.id for i in scope.store.list_images(scope.id)}
        assert keep in left and copy_id not in left
        with pytest.raises(Exception, match="Pick the image to keep"):
            app_insight.keep_one(scope, [keep], 10 ** 6)
    finally:
        ws.close()


def test_an_upload_says_how_many_look_like_images_already_there(tiny, tmp_path):
    """The upload note: after the upload's background encoding, a near-copy of an example is
    counted and a new, different image is not."""
    from fewshot_studio.app import insight as app_insight
    from fewshot_studio.app import library

    from test_service import make_ws

    ws = make_ws(tmp_path / "data", tiny)
    try:
        scope = small_project(ws, tmp_path)
        (tmp_path / "again.jpg").write_bytes(near_copy(tmp_path / "blue_square_1.png"))
        render(ShapeSpec("green", "circle"), np.random.default_rng(9), 96).save(tmp_path / "new.png")
        up = library.add_uploads(scope, [tmp_path / "again.jpg", tmp_path / "new.png"], library.POOL)
        assert up.added == 2 and len(up.image_ids) == 2 and up.encode_job is not None
        assert app_insight.upload_look_alikes(scope, up.image_ids, up.encode_job, wait_s=120) == 1
        only_new = [i for i in up.image_ids if library.image(scope, i).original_name == "new.png"]
        assert app_insight.upload_look_alikes(scope, only_new, up.encode_job) == 0
    finally:
        ws.close()


@pytest.mark.slow  # UMAP (17 images): numba compiles umap-learn's kernels on first use
def test_app_map_places_a_few_new_images_without_refitting(tiny, tmp_path):
    from fewshot_studio.app import insight as app_insight
    from fewshot_studio.app import library

    from test_service import make_ws

    ws = make_ws(tmp_path / "data", tiny)
    try:
        scope = small_project(ws, tmp_path)
        rng = np.random.default_rng(9)
        extra = []
        for k in range(4):
            render(ShapeSpec("blue", "square"), rng, 96).save(tmp_path / f"more_{k}.png")
            extra.append(tmp_path / f"more_{k}.png")
        library.add_images(scope, extra[:3], None)
        first = app_insight.compute(scope)
        assert first.map_method == "umap" and first.map_extended == 0 and len(first.points) == 17
        library.add_images(scope, extra[3:], None)
        second = app_insight.compute(scope)
        assert second.map_extended == 1 and len(second.points) == 18
        old = {p.image_id: (p.x, p.y) for p in first.points}
        assert all(old[p.image_id] == (p.x, p.y) for p in second.points if p.image_id in old)  # not refitted
    finally:
        ws.close()
