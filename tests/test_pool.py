"""Long pools stay fast (issue #15, item 6): JPEG thumbnails, pool labeling that stores its
predictions chunk by chunk while the job runs, pages of the review queue, cancel keeping the
chunks already scored. No timing asserts: the speed figures are the benchmark's
(`bench`, pool_* keys)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import library, modeling, projects
from fewshot_studio.app.library import POOL
from fewshot_studio.jobs import CANCELLED, DONE
from fewshot_studio.ui import presenters

from test_service import make_ws, wait_done

POOL_SIZE = 150  # with the example's 15, three chunks: 32, 64 and 69 images


def small_pool(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = []
    for k in range(n):
        label = shapes.CLASSES[k % 5]
        path = folder / f"p{k:04d}.png"
        shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), rng, 32).save(path)
        out.append(path)
    return out


@pytest.fixture
def studio(tiny, tmp_path):
    """The shapes example (15 pool images) with a zero-shot model and POOL_SIZE more pool images."""
    ws = make_ws(tmp_path / "data", tiny)
    p = projects.load_example(ws, "shapes")
    sc = ws.scope(p.id)
    wait_done(ws, modeling.start_training(sc, "zeroshot"))
    library.add_uploads(sc, small_pool(tmp_path / "pool", POOL_SIZE), POOL)
    yield ws, sc
    ws.close()


def test_label_chunks_start_small_and_double():
    assert modeling.label_chunks(150) == [(0, 32), (32, 96), (96, 150)]
    assert modeling.label_chunks(0) == []
    sizes = [b - a for a, b in modeling.label_chunks(10_000)]
    assert sizes[:6] == [32, 64, 128, 256, 512, 1024] and max(sizes) == 1024 and sum(sizes) == 10_000


class Paused:
    """Wraps the store's save_predictions: after the first chunk is stored the job waits until
    `go` is set, so the test looks at the store while the job is still running."""

    def __init__(self, store):
        self.save, self.saved, self.go, self.calls = store.save_predictions, threading.Event(), threading.Event(), 0

    def __call__(self, *args, **kwargs):
        n = self.save(*args, **kwargs)
        self.calls += 1
        if self.calls == 1:
            self.saved.set()
            assert self.go.wait(60)
        return n


def test_predictions_appear_before_the_job_ends(studio, monkeypatch):
    ws, sc = studio
    in_pool = POOL_SIZE + 15
    paused = Paused(ws.store)
    monkeypatch.setattr(ws.store, "save_predictions", paused)
    before = modeling.pool_page(sc)
    assert before.scored == 0 and before.pool == in_pool and len(before.unscored) == in_pool
    job_id = modeling.start_labeling(sc)
    assert paused.saved.wait(120)
    try:
        assert ws.runner.get(job_id).status == "running"
        page = modeling.pool_page(sc)
        assert page.scored == 32 and page.pool == in_pool  # the first chunk, while the job runs
        assert [r.confidence for r in page.rows] == sorted(r.confidence for r in page.rows)
        assert len(page.unscored) == in_pool - 32  # the rest of the page: pool images not yet scored
        gallery, ids = presenters.pool_page_gallery(sc, page)
        assert len(gallery) == presenters.POOL_GALLERY_THUMBS and ids[:32] == [r.image_id for r in page.rows]
        assert presenters.pool_page_note(page, len(page.rows), len(ids)) == (
            f"Showing 32 of 32 scored pool images, least confident first ({in_pool - 32} not scored yet); "
            f"48 of {in_pool} thumbnails.")
        # an image removed while the job runs is left out, and the job still finishes
        library.remove_image(sc, page.unscored[-1].id)
    finally:
        paused.go.set()
    st = wait_done(ws, job_id)
    assert len(st.result) == in_pool - 1 and paused.calls == 3  # the removed image is not scored
    page = modeling.pool_page(sc)
    assert page.scored == page.pool == in_pool - 1 and page.unscored == []


def test_a_page_is_the_right_slice_of_the_queue(studio):
    ws, sc = studio
    rows = modeling.label_pool(sc)
    queue = modeling.pool_predictions(sc)
    assert [r.image_id for r in queue] == [r.image_id for r in rows]
    page = modeling.pool_page(sc, 40, 25)
    assert page.rows == queue[40:65] and page.offset == 40 and page.scored == len(queue) == page.pool
    assert set(page.images) == {r.image_id for r in page.rows} and page.unscored == []
    last = modeling.pool_page(sc, len(queue) - 5, 25)
    assert last.rows == queue[-5:] and last.unscored == []  # every pool image is scored
    assert modeling.pool_page(sc, len(queue) + 10, 25).rows == []
    # accepted images leave the queue, the total follows
    modeling.accept(sc, [queue[0].image_id, queue[1].image_id])
    page = modeling.pool_page(sc, 0, 10)
    assert page.rows == modeling.pool_predictions(sc)[:10] and page.scored == len(queue) - 2
    # the store's page agrees with its full list
    current = modeling.current_model_info(sc)
    full = ws.store.list_predictions(current.id, pool_only=True)
    part, total = ws.store.pool_prediction_page(current.id, 7, 11)
    assert [p for p, _ in part] == full[7:18] and total == len(full)
    assert all(img.id == p.image_id and img.class_id is None for p, img in part)


def test_cancel_keeps_the_scored_chunks(studio, monkeypatch):
    ws, sc = studio
    paused = Paused(ws.store)
    monkeypatch.setattr(ws.store, "save_predictions", paused)
    job_id = modeling.start_labeling(sc)
    assert paused.saved.wait(120)
    assert modeling.cancel(ws, job_id)
    paused.go.set()
    st = ws.runner.wait(job_id, timeout=120)
    assert st.status == CANCELLED and "kept" in st.message
    page = modeling.pool_page(sc)
    assert page.scored == 32 and paused.calls == 1
    assert {r.image_id for r in page.rows} <= {i.id for i in library.pool_images(sc)}


def test_thumbnails_are_jpeg_and_old_png_ones_still_show(studio):
    ws, sc = studio
    img = library.pool_images(sc)[0]
    thumb = Path(library.thumbnail(ws, img))
    assert thumb.suffix == ".jpg" and thumb.read_bytes()[:3] == b"\xff\xd8\xff"
    assert thumb.resolve().is_relative_to(ws.thumbs_dir.resolve())
    key = library.thumbnail_key(ws, img.hash)
    assert thumb.stem == key and img.hash not in thumb.name  # the HMAC name, as before
    assert presenters.image_by_thumbnail(sc, POOL, thumb.name).id == img.id
    # a PNG made by an earlier version is served as it is, not made again
    other = library.pool_images(sc)[1]
    okey = library.thumbnail_key(ws, other.hash)
    old = ws.thumbs_dir / okey[:2] / f"{okey}.png"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(other.path.read_bytes())
    assert Path(library.thumbnail(ws, other)) == old
    assert presenters.image_by_thumbnail(sc, POOL, old.name).id == other.id


def test_the_review_image_is_a_larger_jpeg_beside_the_thumbnail(studio, tmp_path):
    from PIL import Image

    ws, sc = studio
    big = tmp_path / "photo.jpg"
    Image.new("RGB", (1024, 768), (200, 30, 30)).save(big, "JPEG")
    library.add_uploads(sc, [big], POOL)
    img = next(i for i in library.pool_images(sc) if i.original_name == "photo.jpg")
    small, large = Path(library.thumbnail(ws, img)), Path(library.thumbnail(ws, img, library.PREVIEW_SIZE))
    assert small != large and large.parent == small.parent and large.stem.startswith(small.stem)
    assert Image.open(small).size == (library.THUMB_SIZE, 120)
    assert Image.open(large).size == (library.PREVIEW_SIZE, 384) and Image.open(large).format == "JPEG"
    assert Path(library.thumbnail(ws, img, library.PREVIEW_SIZE)) == large  # made once


@pytest.mark.slow  # launches the app
def test_the_pool_gallery_serves_a_page_of_jpeg_thumbnails(tiny, tmp_path):
    from gradio_client import Client, handle_file

    from helpers import launch

    ws = make_ws(tmp_path / "data", tiny)
    demo = launch(ws)
    try:
        client = Client(demo.local_url, verbose=False)
        client.predict("shapes", api_name="/load_example")
        files = [handle_file(str(p)) for p in small_pool(tmp_path / "pool", 60)]
        out = client.predict(files, api_name="/add_pool")
        gallery = next(o for o in out if isinstance(o, list) and o and isinstance(o[0], dict) and "image" in o[0])
        assert len(gallery) == presenters.POOL_GALLERY_THUMBS  # a page of the 75 pool images
        assert "Showing 48 of 75 pool thumbnails." in out
        # the client fetched each thumbnail from the app's file route: JPEGs, under their HMAC names
        got = Path(gallery[0]["image"])
        assert got.suffix == ".jpg" and got.read_bytes()[:3] == b"\xff\xd8\xff"
        assert (ws.thumbs_dir / got.stem[:2] / got.name).is_file()
    finally:
        demo.close()
        ws.close()


def test_predictions_of_reads_only_the_images_asked(studio):
    ws, sc = studio
    modeling.label_pool(sc)
    current = modeling.current_model_info(sc)
    full = {p.image_id: p for p in ws.store.list_predictions(current.id)}
    some = list(full)[:3]
    assert ws.store.predictions_of(current.id, some + [10**9]) == {i: full[i] for i in some}
    assert ws.store.predictions_of(current.id, []) == {}
    many = list(full)  # more than one batch of bound parameters
    assert ws.store.predictions_of(current.id, many * 4) == full
