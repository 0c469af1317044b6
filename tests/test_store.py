"""The persistent project store: round trips, migrations, restarts, dedup, threads, validation."""
from __future__ import annotations

import io
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_studio import store as store_mod
from fewshot_studio.data import ImageRef, SupportSet
from fewshot_studio.errors import DataError, FewShotError
from fewshot_studio.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DuplicateNameError,
    JobFinishedError,
    NotFoundError,
    ProjectStore,
    StoreError,
    ValidationError,
)


def png(seed: int, size: int = 8) -> bytes:
    """A small PNG whose bytes differ for every seed."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def one_sentence(text: str) -> bool:
    body = text.rstrip()
    return body.endswith(".") and ". " not in body[:-1] and "\n" not in body


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "images").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path):
    s = ProjectStore(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def project(store):
    return store.create_project("Shapes")


def make_model_dir(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "config.json").write_text('{"method": "tip"}')
    return path


# ------------------------------------------------------------------ opening, schema


def test_fresh_store_layout_and_pragmas(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root) as s:
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert (root / "studio.db").is_file() and (root / "images").is_dir() and (root / "models").is_dir()
        with s._read() as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"projects", "classes", "images", "models", "predictions", "jobs"} <= tables
    assert s.closed
    with pytest.raises(StoreError, match="closed"):
        s.list_projects()


def test_data_dir_default_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_STUDIO_DATA", str(tmp_path / "from-env"))
    with ProjectStore() as s:
        s.create_project("p")
        assert s.root == tmp_path / "from-env"
    assert (tmp_path / "from-env" / "studio.db").is_file()


def test_migrates_an_empty_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "studio.db").write_bytes(b"")
    with ProjectStore(root) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.get_project(s.create_project("p").id).name == "p"


def test_upgrades_an_older_database_and_keeps_its_data(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root, migrations=MIGRATIONS[:1]) as s:
        assert s.schema_version == 1
        pid = s.create_project("Old").id
        cid = s.add_class(pid, "cat").id
        s.add_images(pid, [("a.png", png(1))], cid)

    applied = []

    def backfill(conn):  # a Python migration step, run in the same transaction as its version bump
        applied.append(conn.execute("SELECT COUNT(*) FROM projects").fetchone()[0])
        conn.execute("UPDATE projects SET colour = 'teal'")

    later = list(MIGRATIONS) + ["ALTER TABLE projects ADD COLUMN colour TEXT;\n-- a comment; with a semicolon\n",
                                backfill]
    with ProjectStore(root, migrations=later) as s:
        assert s.schema_version == len(MIGRATIONS) + 2
        assert applied == [1]
        with s._read() as conn:
            assert conn.execute("SELECT colour FROM projects").fetchone()[0] == "teal"
        assert s.get_project(pid).name == "Old"
        assert [i.original_name for i in s.list_images(pid, class_id=cid)] == ["a.png"]
    # Reopening at the same version runs nothing again.
    with ProjectStore(root, migrations=later) as s:
        assert applied == [1] and s.schema_version == len(later)


def test_failed_migration_leaves_the_previous_version(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root) as s:
        s.create_project("keep me")
    bad = list(MIGRATIONS) + ["CREATE TABLE extra (x INTEGER); INSERT INTO no_such_table VALUES (1);"]
    with pytest.raises(StoreError, match=f"schema version {len(bad)} failed") as e:
        ProjectStore(root, migrations=bad)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
    with ProjectStore(root) as s:
        assert s.schema_version == len(MIGRATIONS)
        assert [p.name for p in s.list_projects()] == ["keep me"]
        with s._read() as conn:
            assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None


def test_newer_database_is_refused(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root, migrations=list(MIGRATIONS) + ["CREATE TABLE later (x);"]):
        pass
    with pytest.raises(StoreError, match="newer than this version"):
        ProjectStore(root)


def test_damaged_database_file_gives_one_sentence(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "studio.db").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError) as e:
        ProjectStore(root)
    assert "damaged or not a SQLite database" in str(e.value) and one_sentence(str(e.value))


# ---------------------------------------------------------------------- round trips


def test_project_round_trip_and_owner_filter(store):
    a = store.create_project("  Ünïcode 项目  ")
    b = store.create_project("Hosted", owner="session-1")
    assert a.name == "Ünïcode 项目" and a.owner is None and a.created <= a.updated
    assert store.get_project(b.id) == b
    assert {p.id for p in store.list_projects()} == {a.id, b.id}
    assert [p.id for p in store.list_projects(owner="session-1")] == [b.id]
    assert store.list_projects(owner="someone-else") == []
    renamed = store.rename_project(a.id, "Renamed")
    assert renamed.name == "Renamed" and renamed.updated >= a.updated
    assert store.list_projects()[0].id == a.id  # most recently changed first
    store.delete_project(b.id)
    with pytest.raises(NotFoundError, match=rf"^There is no project with id {b.id}\.$"):
        store.get_project(b.id)


def test_class_round_trip(store, project):
    cat = store.add_class(project.id, "cat", "a small furry pet")
    dog = store.add_class(project.id, "dog")
    assert (cat.position, dog.position) == (0, 1)
    assert store.get_class(cat.id) == cat and cat.description == "a small furry pet"
    assert store.rename_class(cat.id, "Cat").name == "Cat"  # same name, other case: fine
    assert store.set_class_description(dog.id, "a loyal pet").description == "a loyal pet"
    emu = store.add_class(project.id, "ëmu 🐦")
    assert [c.id for c in store.list_classes(project.id)] == [cat.id, dog.id, emu.id]
    store.delete_class(cat.id)
    assert [(c.name, c.position) for c in store.list_classes(project.id)] == [("dog", 0), ("ëmu 🐦", 1)]


def test_image_round_trip_move_and_counts(store, project):
    cat = store.add_class(project.id, "cat")
    dog = store.add_class(project.id, "dog")
    imgs, errors = store.add_images(project.id, [("c1.png", png(1, 5)), ("c2.png", png(2))], cat.id)
    assert errors == [] and len(imgs) == 2
    first = imgs[0]
    assert (first.class_id, first.labeled_by, first.original_name, (first.width, first.height)) == (cat.id, "user",
                                                                                                    "c1.png", (5, 5))
    assert first.path.read_bytes() == png(1, 5)
    assert first.path == store.root / "images" / first.hash[:2] / first.hash
    ref = first.ref()
    assert isinstance(ref, ImageRef) and ref.hash == first.hash and ref.read() == png(1, 5)
    assert ref.open().size == (5, 5)
    assert store.get_image(first.id) == first

    pool, _ = store.add_images(project.id, [("u1.png", png(3)), ("u2.png", png(4))])
    assert all(i.class_id is None and i.labeled_by is None for i in pool)
    assert [i.id for i in store.list_images(project.id, pool=True)] == [i.id for i in pool]
    assert store.class_counts(project.id) == {cat.id: 2, dog.id: 0, None: 2}

    (moved,) = store.move_images([(pool[0].id, dog.id)], "accepted")
    assert (moved.class_id, moved.labeled_by) == (dog.id, "accepted")
    bulk = store.move_images([(pool[1].id, dog.id), (first.id, dog.id)], labeled_by="corrected")
    assert [(i.class_id, i.labeled_by) for i in bulk] == [(dog.id, "corrected")] * 2
    (back,) = store.move_images([(first.id, None)])
    assert (back.class_id, back.labeled_by) == (None, None)
    assert store.class_counts(project.id) == {cat.id: 1, dog.id: 2, None: 1}
    assert len(store.list_images(project.id)) == 4
    assert [i.id for i in store.list_images(project.id, class_id=dog.id)] == sorted([pool[0].id, pool[1].id])

    with pytest.raises(ValidationError, match="labeled_by"):
        store.move_images([(first.id, cat.id)], "robot")
    with pytest.raises(ValidationError, match="not both"):
        store.list_images(project.id, class_id=cat.id, pool=True)

    store.remove_image(pool[1].id)
    with pytest.raises(NotFoundError, match=rf"^There is no image with id {pool[1].id} in this project\.$"):
        store.get_image(pool[1].id)


def test_same_upload_twice_in_the_same_class_is_not_duplicated(store, project):
    cat = store.add_class(project.id, "cat")
    a, _ = store.add_images(project.id, [("x.png", png(9)), ("x-again.png", png(9))], cat.id)
    b, _ = store.add_images(project.id, [("x.png", png(9))], cat.id)
    assert a[0].id == a[1].id == b[0].id
    assert len(store.list_images(project.id)) == 1


def test_delete_class_moves_images_to_pool_or_deletes_them(store, project):
    cat = store.add_class(project.id, "cat")
    dog = store.add_class(project.id, "dog")
    cats, _ = store.add_images(project.id, [("c1.png", png(1)), ("c2.png", png(2))], cat.id)
    dogs, _ = store.add_images(project.id, [("d1.png", png(3))], dog.id)

    assert store.delete_class(cat.id) == 2  # default: to the unlabeled pool
    assert {i.id for i in store.list_images(project.id, pool=True)} == {i.id for i in cats}
    assert all(i.labeled_by is None for i in store.list_images(project.id, pool=True))
    assert all(i.path.exists() for i in cats)

    assert store.delete_class(dog.id, delete_images=True) == 1
    assert not dogs[0].path.exists()
    with pytest.raises(NotFoundError):
        store.get_image(dogs[0].id)
    assert store.list_classes(project.id) == []
    with pytest.raises(NotFoundError, match=rf"^There is no class with id {dog.id} in this project\.$"):
        store.get_class(dog.id)


def test_support_set_order_labels_and_descriptions(store, project):
    b = store.add_class(project.id, "bravo")
    store.add_class(project.id, "charlie")  # stays empty
    a = store.add_class(project.id, "alpha", "red circle")
    store.add_images(project.id, [("a1.png", png(1)), ("a2.png", png(2))], a.id)
    bravo_imgs, _ = store.add_images(project.id, [("b1.png", png(3))], b.id)
    store.add_images(project.id, [("pool.png", png(4))])  # unlabeled: not in the support set

    s = store.support_set(project.id)
    assert isinstance(s, SupportSet)
    assert s.classnames == ["bravo", "charlie", "alpha"]
    assert s.descriptions == ["", "", "red circle"]
    assert [r.name for r in s.images] == ["b1.png", "a1.png", "a2.png"]
    assert s.labels == [0, 2, 2]
    assert s.counts() == [1, 0, 2]
    assert s.images[0].hash == bravo_imgs[0].hash and s.images[0].read() == png(3)
    assert s.images[1].open().size == (8, 8)

    empty = store.create_project("empty")
    with pytest.raises(DataError):
        store.support_set(empty.id)


def test_model_round_trip_and_delete(store, project, tmp_path):
    src = make_model_dir(store.staging_dir() / "job-1" / "model")
    assert src.is_relative_to(store.root)
    config = {"classes": ["a", "b"], "alpha": np.float32(1.5), "epochs": np.int64(20)}
    m = store.register_model(project.id, "graph", "ViT-B-32/openai", config, {"accuracy": np.float64(0.75)}, src)
    assert not src.exists()
    assert m.weights_path == f"models/{m.id}" and m.path == store.root / "models" / str(m.id)
    assert (m.path / "model.safetensors").read_bytes() == b"weights"
    assert m.config == {"classes": ["a", "b"], "alpha": 1.5, "epochs": 20} and m.metrics == {"accuracy": 0.75}
    assert (m.method, m.backbone_id, m.status) == ("graph", "ViT-B-32/openai", "ready")
    assert store.get_model(m.id) == m
    m2 = store.register_model(project.id, "tip", "tiny", {}, None, make_model_dir(tmp_path / "work" / "run-2"))
    assert [x.id for x in store.list_models(project.id)] == [m2.id, m.id]
    store.delete_model(m.id)
    assert not m.path.exists() and [x.id for x in store.list_models(project.id)] == [m2.id]
    with pytest.raises(NotFoundError, match=rf"^There is no model with id {m.id}\.$"):
        store.get_model(m.id)
    with pytest.raises(NotFoundError, match="does not exist"):
        store.register_model(project.id, "tip", "tiny", {}, {}, tmp_path / "missing")
    with pytest.raises(ValidationError, match="JSON"):
        store.register_model(project.id, "tip", "tiny", {"f": object()}, {}, make_model_dir(tmp_path / "w3"))
    assert (tmp_path / "w3").is_dir()  # refused before anything moved


def test_predictions_round_trip(store, project, tmp_path):
    cat = store.add_class(project.id, "cat")
    dog = store.add_class(project.id, "dog")
    labelled, _ = store.add_images(project.id, [("l.png", png(1))], cat.id)
    pool, _ = store.add_images(project.id, [("p1.png", png(2)), ("p2.png", png(3))])
    m = store.register_model(project.id, "tip", "tiny", {}, {}, make_model_dir(tmp_path / "m"))
    n = store.save_predictions(m.id, [
        (pool[0].id, dog.id, 0.9, {cat.id: 0.1, dog.id: 0.9}),
        (pool[1].id, cat.id, np.float32(0.55), {cat.id: 0.55, dog.id: 0.45}),
        (labelled[0].id, cat.id, 0.99, [0.99, 0.01]),
    ])
    assert n == 3
    preds = store.list_predictions(m.id)
    assert [p.image_id for p in preds] == [pool[1].id, pool[0].id, labelled[0].id]  # least confident first
    assert preds[1].probs == {cat.id: 0.1, dog.id: 0.9} and preds[1].label == dog.id
    assert preds[2].probs == [0.99, 0.01]
    assert [p.image_id for p in store.list_predictions(m.id, pool_only=True)] == [pool[1].id, pool[0].id]
    # Re-predicting replaces; deleting the class keeps the row with label=None.
    store.save_predictions(m.id, [(pool[0].id, cat.id, 0.6, {cat.id: 0.6, dog.id: 0.4})])
    assert len(store.list_predictions(m.id)) == 3
    store.delete_class(dog.id)
    assert {p.image_id: p.label for p in store.list_predictions(m.id)}[pool[0].id] == cat.id
    with pytest.raises(ValidationError, match="between 0 and 1"):
        store.save_predictions(m.id, [(pool[0].id, cat.id, 1.5, {})])
    other = store.create_project("other")
    foreign, _ = store.add_images(other.id, [("f.png", png(7))])
    with pytest.raises(NotFoundError, match="in this project"):
        store.save_predictions(m.id, [(foreign[0].id, cat.id, 0.5, {})])
    store.remove_image(pool[1].id)
    assert pool[1].id not in {p.image_id for p in store.list_predictions(m.id)}


def test_jobs_round_trip_and_finished_jobs_stay_finished(store, project):
    j = store.create_job(project.id, "train", progress={"stage": "queued"})
    assert (j.status, j.kind, j.progress, j.model_id, j.finished) == ("queued", "train", {"stage": "queued"},
                                                                     None, False)
    j = store.update_job(j.id, status="running", progress={"stage": "epoch", "step": 3, "total": 10})
    assert j.status == "running" and j.progress["step"] == 3 and j.updated >= j.created
    assert store.update_job(j.id, message="epoch 3/10").progress["step"] == 3  # unchanged fields kept
    j = store.update_job(j.id, status="cancelled", message="Training was cancelled.")
    assert j.finished and store.get_job(j.id) == j
    with pytest.raises(JobFinishedError, match="already finished"):
        store.update_job(j.id, status="done")
    with pytest.raises(ValidationError, match="status"):
        store.create_job(project.id, "train", status="exploded")
    j2 = store.create_job(project.id, "evaluate")
    assert [x.id for x in store.list_jobs(project.id)] == [j2.id, j.id]
    assert [x.id for x in store.list_jobs(status="queued")] == [j2.id]
    assert [x.id for x in store.list_jobs(status=["queued", "cancelled"])] == [j2.id, j.id]
    with pytest.raises(NotFoundError, match=r"^There is no job with id 999\.$"):
        store.get_job(999)


def test_mark_interrupted_jobs(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root) as s:
        pid = s.create_project("p").id
        queued = s.create_job(pid, "train")
        running = s.create_job(pid, "train", status="running")
        done = s.create_job(pid, "train", status="done", message="Finished.")
    with ProjectStore(root) as s:  # the app restarts
        assert s.mark_interrupted_jobs() == 2
        assert s.get_job(running.id).status == "failed"
        assert s.get_job(running.id).message == "The app stopped while this job was running."
        assert s.get_job(queued.id).status == "failed"  # it never ran: the sentence says so
        assert s.get_job(queued.id).message == "The app stopped before this job started."
        assert s.get_job(done.id).status == "done" and s.get_job(done.id).message == "Finished."
        assert s.mark_interrupted_jobs() == 0


# ------------------------------------------------------------------- persistence


def test_everything_survives_close_and_reopen(tmp_path):
    root = tmp_path / "data"
    s = ProjectStore(root)
    p = s.create_project("Persist", owner="tok")
    cat = s.add_class(p.id, "cat", "desc")
    dog = s.add_class(p.id, "dog")
    imgs, _ = s.add_images(p.id, [("a.png", png(1)), ("b.png", png(2))], cat.id)
    pool, _ = s.add_images(p.id, [("u.png", png(3))])
    s.move_images([(imgs[1].id, dog.id)], "corrected")
    m = s.register_model(p.id, "mma", "tiny", {"k": 1}, {"acc": 1.0}, make_model_dir(tmp_path / "m"))
    s.save_predictions(m.id, [(pool[0].id, cat.id, 0.7, {cat.id: 0.7, dog.id: 0.3})])
    job = s.create_job(p.id, "train", status="done", model_id=m.id, progress={"loss": [1.0, 0.5]})
    snapshot = (s.list_projects(), s.list_classes(p.id), s.list_images(p.id), s.list_models(p.id),
                s.list_predictions(m.id), s.list_jobs(), s.support_set(p.id).labels)
    s.close()

    with ProjectStore(root) as s2:
        again = (s2.list_projects(), s2.list_classes(p.id), s2.list_images(p.id), s2.list_models(p.id),
                 s2.list_predictions(m.id), s2.list_jobs(), s2.support_set(p.id).labels)
        assert again == snapshot
        assert s2.get_job(job.id).model_id == m.id
        assert all(i.path.read_bytes() for i in s2.list_images(p.id))
        assert (s2.get_model(m.id).path / "model.safetensors").is_file()
        assert s2.check_integrity() == []


# ------------------------------------------------------------- content addressing


def test_duplicate_bytes_stored_once_and_removed_with_the_last_reference(store, tmp_path):
    p1 = store.create_project("one")
    p2 = store.create_project("two")
    a = store.add_class(p1.id, "a")
    b = store.add_class(p1.id, "b")
    data = png(42)
    (in_a,), _ = store.add_images(p1.id, [("same.png", data)], a.id)
    (in_b,), _ = store.add_images(p1.id, [("copy.png", data)], b.id)
    (in_p2,), _ = store.add_images(p2.id, [("other.png", data)])
    assert len({in_a.id, in_b.id, in_p2.id}) == 3
    assert in_a.hash == in_b.hash == in_p2.hash and in_a.path == in_p2.path
    assert blob_files(store.root) == [in_a.path]

    store.remove_image(in_a.id)
    assert in_a.path.exists()
    store.delete_class(b.id, delete_images=True)
    assert in_a.path.exists()  # project two still uses it
    store.delete_project(p2.id)
    assert not in_a.path.exists() and blob_files(store.root) == []
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in (store.root / "images").rglob(".tmp-*")]


def test_delete_project_cleans_files_rows_and_model_dirs(store, tmp_path):
    keep = store.create_project("keep")
    gone = store.create_project("gone")
    shared = png(1)
    store.add_images(keep.id, [("shared.png", shared)])
    c = store.add_class(gone.id, "c")
    imgs, _ = store.add_images(gone.id, [("shared.png", shared), ("own.png", png(2))], c.id)
    m = store.register_model(gone.id, "tip", "tiny", {}, {}, make_model_dir(tmp_path / "m"))
    store.save_predictions(m.id, [(imgs[0].id, c.id, 0.8, {c.id: 0.8})])
    store.create_job(gone.id, "train", model_id=m.id)

    store.delete_project(gone.id)
    assert imgs[0].path.exists() and not imgs[1].path.exists()
    assert not m.path.exists() and list((store.root / "models").iterdir()) == []
    with store._read() as conn:
        for table in ("classes", "models", "predictions", "jobs"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1
    assert store.check_integrity() == []
    with pytest.raises(NotFoundError):
        store.delete_project(gone.id)


def test_collect_garbage_removes_only_orphans(store, project):
    (img,), _ = store.add_images(project.id, [("a.png", png(1))])
    orphan = store.image_path("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    (orphan.parent / ".tmp-123").write_bytes(b"half")
    (store.root / "models" / "77").mkdir()
    (store.staging_dir() / "job-1-abc").mkdir()
    assert store.collect_garbage() == {"images": 1, "temporary": 2, "models": 1}
    assert list(store.staging_dir().iterdir()) == []
    assert img.path.exists() and not orphan.exists()
    assert store.check_integrity() == []


# --------------------------------------------------------------------- uploads


def test_non_image_rejected_by_name_while_good_files_are_stored(store, project):
    cat = store.add_class(project.id, "cat")
    truncated = png(5)[:40]
    stored, errors = store.add_images(project.id, [
        ("good1.png", png(1)),
        ("notes.txt", b"just some text, not a picture"),
        ("fake.jpg", b"<html><body>saved web page</body></html>"),
        ("broken.png", truncated),
        ("empty.png", b""),
        ("good2.png", png(2)),
    ], cat.id)
    assert [i.original_name for i in stored] == ["good1.png", "good2.png"]
    assert len(errors) == 4
    for name, err in zip(["notes.txt", "fake.jpg", "broken.png", "empty.png"], errors):
        assert err.startswith(f"{name}: ") and one_sentence(err)
    assert "not an image" in errors[0]
    assert [i.original_name for i in store.list_images(project.id)] == ["good1.png", "good2.png"]
    assert len(blob_files(store.root)) == 2

    only_bad, errors = store.add_images(project.id, [("x.bin", os.urandom(64))])
    assert only_bad == [] and len(errors) == 1 and errors[0].startswith("x.bin: ")


def test_uploads_from_paths_and_awkward_names(store, project, tmp_path):
    f = tmp_path / "on disk.png"
    f.write_bytes(png(8))
    stored, errors = store.add_images(project.id, [("on disk.png", f), ("", png(9)), ("a\nb.png", png(10)),
                                                   ("é" * 400 + ".png", png(11))])
    assert errors == []
    assert stored[0].path.read_bytes() == png(8)
    assert stored[1].original_name == "image #2"
    assert "\n" not in stored[2].original_name
    assert len(stored[3].original_name) <= store_mod.MAX_FILE_NAME_LENGTH


# ------------------------------------------------------------------ validation


def test_class_name_validation_messages(store, project):
    store.add_class(project.id, "Cat")
    cases = [
        ("", ValidationError, "cannot be blank"),
        ("   \t ", ValidationError, "cannot be blank"),
        ("cat", DuplicateNameError, "already a class named 'Cat'"),
        ("  CAT  ", DuplicateNameError, "unique"),
        ("x" * 201, ValidationError, "201 characters long; use at most 200"),
        ("two\nlines", ValidationError, "line breaks"),
    ]
    for name, exc, fragment in cases:
        with pytest.raises(exc) as e:
            store.add_class(project.id, name)
        assert fragment in str(e.value) and one_sentence(str(e.value)), str(e.value)
        assert isinstance(e.value, FewShotError)
    # Unicode case folding, exactly 200 characters, and the same name in another project are fine/refused right.
    store.add_class(project.id, "Straße")
    with pytest.raises(DuplicateNameError):
        store.add_class(project.id, "STRASSE")
    assert store.add_class(project.id, "y" * 200).name == "y" * 200
    other = store.create_project("other")
    assert store.add_class(other.id, "cat").name == "cat"
    dog = store.add_class(project.id, "dog")
    with pytest.raises(DuplicateNameError):
        store.rename_class(dog.id, " cat ")
    with pytest.raises(ValidationError, match="at most 2000"):
        store.set_class_description(dog.id, "d" * 2001)
    with pytest.raises(ValidationError, match="cannot be blank"):
        store.create_project(" ")
    with pytest.raises(ValidationError, match="cannot be blank"):
        store.rename_project(project.id, "")


def test_unknown_and_foreign_ids(store, project):
    other = store.create_project("other")
    foreign = store.add_class(other.id, "foreign")
    (img,), _ = store.add_images(project.id, [("a.png", png(1))])
    expected = {
        "class": "There is no class with id 42 in this project.",
        "foreign": f"There is no class with id {foreign.id} in this project.",
    }
    for call in (lambda: store.rename_class(42, "x"), lambda: store.delete_class(42),
                 lambda: store.move_images([(img.id, 42)]), lambda: store.list_images(project.id, class_id=42),
                 lambda: store.add_images(project.id, [("b.png", png(2))], class_id=42)):
        with pytest.raises(NotFoundError) as e:
            call()
        assert str(e.value) == expected["class"]
    for call in (lambda: store.move_images([(img.id, foreign.id)]),
                 lambda: store.add_images(project.id, [("b.png", png(2))], class_id=foreign.id),
                 lambda: store.list_images(project.id, class_id=foreign.id)):
        with pytest.raises(NotFoundError) as e:
            call()
        assert str(e.value) == expected["foreign"]
    assert store.get_image(img.id).class_id is None  # nothing changed
    assert len(store.list_images(project.id)) == 1 and len(blob_files(store.root)) == 1
    with pytest.raises(NotFoundError, match=r"^There is no project with id 999\.$"):
        store.add_class(999, "x")
    with pytest.raises(NotFoundError, match=r"^There is no project with id 999\.$"):
        store.add_images(999, [("a.png", png(1))])
    with pytest.raises(ValidationError, match="whole number"):
        store.get_project("1; DROP TABLE projects")
    # A bulk move with one unknown id changes nothing.
    cat = store.add_class(project.id, "cat")
    with pytest.raises(NotFoundError, match="image with id 12345"):
        store.move_images([(img.id, cat.id), (12345, cat.id)])
    assert store.get_image(img.id).class_id is None


def test_database_rejects_cross_project_labels_even_without_the_api(store, project):
    other = store.create_project("other")
    foreign = store.add_class(other.id, "foreign")
    (img,), _ = store.add_images(project.id, [("a.png", png(1))])
    with store._read() as conn, pytest.raises(sqlite3.IntegrityError, match="its own project"):
        conn.execute("UPDATE images SET class_id = ?, labeled_by = 'user' WHERE id = ?", (foreign.id, img.id))


# ---------------------------------------------------------------- register_model


def test_register_model_db_failure_leaves_nothing_half_visible(store, project, tmp_path):
    src = make_model_dir(tmp_path / "run")
    with store._read() as conn:  # make the DB step of registration fail
        conn.execute("CREATE TEMP TRIGGER fail_model BEFORE UPDATE OF weights_path ON models "
                     "BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END")
    with pytest.raises(StoreError, match="simulated disk failure"):
        store.register_model(project.id, "tip", "tiny", {}, {}, src)
    assert store.list_models(project.id) == []
    assert list((store.root / "models").iterdir()) == []
    assert (src / "model.safetensors").read_bytes() == b"weights"  # handed back intact

    with store._read() as conn:
        conn.execute("DROP TRIGGER fail_model")
    m = store.register_model(project.id, "tip", "tiny", {}, {}, src)
    assert (m.path / "model.safetensors").is_file() and store.check_integrity() == []


def test_register_model_commit_failure_and_move_failure(store, project, tmp_path, monkeypatch):
    src = make_model_dir(tmp_path / "run")
    real_touch = ProjectStore._touch

    def exploding_touch(self, conn, project_id, now=None):  # fails after the directory moved
        raise KeyboardInterrupt

    monkeypatch.setattr(ProjectStore, "_touch", exploding_touch)
    with pytest.raises(KeyboardInterrupt):
        store.register_model(project.id, "tip", "tiny", {}, {}, src)
    monkeypatch.setattr(ProjectStore, "_touch", real_touch)
    assert store.list_models(project.id) == [] and list((store.root / "models").iterdir()) == []
    assert src.is_dir()

    def failing_rename(a, b):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(store_mod.os, "rename", failing_rename)
    with pytest.raises(StoreError, match="could not be moved"):
        store.register_model(project.id, "tip", "tiny", {}, {}, src)
    monkeypatch.undo()
    assert store.list_models(project.id) == [] and src.is_dir()


def test_register_model_across_filesystems_copies(store, project, tmp_path, monkeypatch):
    src = make_model_dir(tmp_path / "run", b"x" * 1000)
    real_rename = os.rename

    def rename(a, b):
        if Path(a) == src:
            raise OSError(18, "Invalid cross-device link")
        return real_rename(a, b)

    monkeypatch.setattr(store_mod.os, "rename", rename)
    m = store.register_model(project.id, "tip", "tiny", {}, {}, src)
    assert (m.path / "model.safetensors").read_bytes() == b"x" * 1000
    assert not src.exists()
    assert [p.name for p in (store.root / "models").iterdir()] == [str(m.id)]


# ------------------------------------------------------------------ concurrency


def test_two_threads_write_one_project_concurrently(store, project):
    cat = store.add_class(project.id, "cat")
    payloads = {t: [png(1000 * t + i, 6) for i in range(50)] for t in (1, 2)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i, data in enumerate(payloads[t]):
                if i % 5 == 0:
                    store.add_class(project.id, f"class {t}-{i}")
                target = cat.id if i % 2 else None
                stored, errs = store.add_images(project.id, [(f"t{t}-{i}.png", data)], target)
                assert errs == [] and len(stored) == 1
                if i % 7 == 0:
                    store.move_images([(stored[0].id, cat.id)], "accepted")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    images = store.list_images(project.id)
    assert len(images) == 100
    assert sorted(i.original_name for i in images) == sorted(f"t{t}-{i}.png" for t in (1, 2) for i in range(50))
    classes = store.list_classes(project.id)
    assert len(classes) == 1 + 20 and [c.position for c in classes] == list(range(21))
    assert len(blob_files(store.root)) == 100
    assert sum(store.class_counts(project.id).values()) == 100
    assert store.check_integrity() == []


def test_two_store_instances_share_one_database(tmp_path):
    root = tmp_path / "data"
    a, b = ProjectStore(root), ProjectStore(root)
    try:
        pid = a.create_project("shared").id
        errors: list[BaseException] = []

        def worker(s: ProjectStore, t: int) -> None:
            try:
                for i in range(15):
                    s.add_images(pid, [(f"{t}-{i}.png", png(5000 + 100 * t + i, 4))])
                    s.add_class(pid, f"c{t}-{i}")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s, t)) for t, s in enumerate((a, b))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert len(b.list_images(pid)) == 30 and len(a.list_classes(pid)) == 30
        with a._read() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        a.close()
        b.close()


def test_project_links_and_members(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root, migrations=MIGRATIONS[:1]) as s:  # a database from before project links
        p = s.create_project("Shared", owner="alice")
        s.add_class(p.id, "cat")
    with ProjectStore(root) as s:  # opening it migrates, keeping the data
        assert s.schema_version == SCHEMA_VERSION and [c.name for c in s.list_classes(p.id)] == ["cat"]
        token = s.project_link(p.id)
        assert len(token) >= 20 and s.project_link(p.id) == token  # stable until renewed
        assert s.project_by_link(token).id == p.id
        assert s.list_projects(owner="bob") == [] and not s.is_member(p.id, "bob")
        s.add_member(p.id, "bob")
        s.add_member(p.id, "bob")  # twice is once
        assert [q.id for q in s.list_projects(owner="bob")] == [p.id] and s.is_member(p.id, "bob")
        new = s.project_link(p.id, renew=True)
        assert new != token and s.project_by_link(new).id == p.id
        for bad in (token, "", "  ", "nonsense"):
            with pytest.raises(NotFoundError) as e:
                s.project_by_link(bad)
            assert str(e.value).count(".") == 1
        assert s.is_member(p.id, "bob")  # a renewed link keeps who already joined
        s.delete_project(p.id)
        with pytest.raises(NotFoundError):
            s.project_by_link(new)
        assert s.list_projects(owner="bob") == []


# ------------------------------------------------- damage and checkpoints (#13 finding 10)

def killed_copy(store: ProjectStore, to: Path) -> Path:
    """The data folder as a process killed now leaves it: the database file and its
    write-ahead log as they are on disk (nothing checkpointed at exit), and the images."""
    import shutil

    to.mkdir(parents=True)
    for name in ("studio.db", "studio.db-wal"):
        if (store.root / name).exists():
            shutil.copyfile(store.root / name, to / name)
    shutil.copytree(store.root / "images", to / "images")
    return to


def filled(root: Path, *, checkpointed: bool) -> ProjectStore:
    """A store with project 'early' (checkpointed into the database file when asked) and
    project 'late' (only in the log)."""
    s = ProjectStore(root, checkpoint_every=None)
    p = s.create_project("early")
    s.add_images(p.id, [(f"{k}.png", png(k)) for k in range(3)])
    if checkpointed:
        assert s.checkpoint()
    s.create_project("late")
    return s


def names(store: ProjectStore) -> list[str]:
    return sorted(p.name for p in store.list_projects())


def test_a_sound_log_left_by_a_kill_is_not_damage(tmp_path):
    s = filled(tmp_path / "a", checkpointed=False)
    try:
        root = killed_copy(s, tmp_path / "b")
    finally:
        s.close()
    assert (root / "studio.db-wal").stat().st_size > 0 and store_mod.wal_damage(root / "studio.db-wal") is None
    with ProjectStore(root) as again:
        assert names(again) == ["early", "late"] and again.recovery == ""


@pytest.mark.parametrize("where", ["header", "middle"])
def test_junk_in_the_log_is_found_and_set_aside_with_one_sentence(tmp_path, where):
    s = filled(tmp_path / "a", checkpointed=True)
    try:
        root = killed_copy(s, tmp_path / "b")
    finally:
        s.close()
    wal = root / "studio.db-wal"
    data = bytearray(wal.read_bytes())
    if where == "header":
        data[:] = os.urandom(len(data))
    else:  # one frame's page overwritten: SQLite would drop it and every later transaction
        data[32 + 24 + 100:32 + 24 + 200] = os.urandom(100)
    wal.write_bytes(bytes(data))
    assert store_mod.wal_damage(wal)
    with pytest.raises(store_mod.DamagedDatabaseError) as e:  # plain opening refuses; nothing moved
        ProjectStore(root)
    assert one_sentence(str(e.value)) and "log" in str(e.value) and wal.read_bytes() == bytes(data)
    with ProjectStore(root, recover=True) as again:
        assert one_sentence(again.recovery) and "log was damaged" in again.recovery
        (aside,) = root.glob("damaged-*")
        assert aside.name in again.recovery
        assert (aside / "studio.db-wal").read_bytes() == bytes(data)  # kept as it was
        assert names(again) == ["early"]  # what the last checkpoint holds
        assert wal.stat().st_size == 0  # taken into the database file at once: no damaged frames left
        assert len(again.list_images(again.list_projects()[0].id)) == 3
        again.create_project("after")  # and the store works
    with ProjectStore(root) as third:  # the next start is a normal one
        assert third.recovery == "" and names(third) == ["after", "early"]


def test_a_zero_byte_database_with_stored_images_is_reported_not_shown_empty(tmp_path):
    s = filled(tmp_path / "a", checkpointed=True)
    s.close()
    root = tmp_path / "a"
    (root / "studio.db").write_bytes(b"")
    images = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    with pytest.raises(store_mod.DamagedDatabaseError, match="empty although the data folder holds 3 image files"):
        ProjectStore(root)
    with ProjectStore(root, recover=True) as again:
        assert one_sentence(again.recovery) and "found empty" in again.recovery
        (aside,) = root.glob("damaged-*")
        assert (aside / "studio.db").stat().st_size == 0
        assert names(again) == []
        assert sorted(p for p in (root / "images").rglob("*") if p.is_file()) == images  # nothing deleted


def test_an_empty_data_folder_is_not_damage(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "studio.db").write_bytes(b"")
    with ProjectStore(root, recover=True) as s:
        assert s.recovery == "" and not list(root.glob("damaged-*"))


@pytest.mark.parametrize("damage", ["junk", "truncated page"])
def test_a_damaged_database_file_is_set_aside_and_a_fresh_one_starts(tmp_path, damage):
    s = filled(tmp_path / "d", checkpointed=True)
    s.close()
    root = tmp_path / "d"
    db = root / "studio.db"
    if damage == "junk":
        db.write_bytes(b"this is not sqlite at all" * 100)
    else:  # a sound header, then garbage over the schema and tables
        data = bytearray(db.read_bytes())
        data[100:] = os.urandom(len(data) - 100)
        db.write_bytes(bytes(data))
    before = db.read_bytes()
    with pytest.raises(StoreError, match="damaged or not a SQLite database"):
        ProjectStore(root)
    with ProjectStore(root, recover=True) as again:
        assert one_sentence(again.recovery) and "database was damaged" in again.recovery
        (aside,) = root.glob("damaged-*")
        assert (aside / "studio.db").read_bytes() == before
        assert names(again) == []
        again.create_project("fresh")


def test_the_log_is_checkpointed_at_intervals_and_on_close(tmp_path):
    import time

    root = tmp_path / "d"
    s = ProjectStore(root, checkpoint_every=0.2)
    try:
        s.create_project("saved")
        wal = root / "studio.db-wal"
        assert wal.stat().st_size > 0
        end = time.time() + 5
        while wal.stat().st_size and time.time() < end:
            time.sleep(0.05)
        assert wal.stat().st_size == 0  # the timer checkpointed it
        copy = killed_copy(s, tmp_path / "only-db")
        (copy / "studio.db-wal").unlink()
        with ProjectStore(copy, checkpoint_every=None) as alone:  # the database file alone holds it
            assert names(alone) == ["saved"]
        s.create_project("second")
        assert wal.stat().st_size > 0
    finally:
        s.close()
    assert not wal.exists() or wal.stat().st_size == 0


# ------------------------------------------------------------------ the action log (undo)

def test_label_actions_undo_exactly(store, project, tmp_path):
    a, b = store.add_class(project.id, "a"), store.add_class(project.id, "b")
    imgs, _ = store.add_images(project.id, [(f"{i}.png", png(i)) for i in range(4)])
    labeled, _ = store.add_images(project.id, [("l.png", png(9))], class_id=a.id, labeled_by="user")
    ids = [i.id for i in imgs]
    act = store.label_images(project.id, [(ids[0], a.id, "accepted"), (ids[1], b.id, "corrected"),
                                          (labeled[0].id, b.id, "corrected")], kind="correct", owner="ann",
                             summary="Labeled 3 images.")
    assert (act.kind, act.count, act.labeled, act.undone) == ("correct", 3, 2, False)
    assert [(store.get_image(i).class_id, store.get_image(i).labeled_by) for i in ids[:2]] == \
        [(a.id, "accepted"), (b.id, "corrected")]
    assert store.labeled_since(project.id, 0) == 2
    assert store.undo_last(project.id, owner="bob") is None  # another owner's action is not bob's to undo
    original, undo = store.undo_last(project.id, owner="ann")
    assert original.id == act.id and original.undone and undo.kind == "undo" and undo.undoes == act.id
    assert undo.count == 3
    assert [store.get_image(i).class_id for i in ids[:2]] == [None, None]
    assert (store.get_image(labeled[0].id).class_id, store.get_image(labeled[0].id).labeled_by) == (a.id, "user")
    assert store.labeled_since(project.id, 0) == 0  # net of undo
    assert store.undo_last(project.id, owner="ann") is None  # an undo is not undone
    assert [x.kind for x in store.list_actions(project.id)] == ["undo", "correct"]
    # all or nothing: an image of another project changes nothing and logs nothing
    other = store.create_project("Other")
    foreign, _ = store.add_images(other.id, [("f.png", png(20))])
    with pytest.raises(NotFoundError):
        store.label_images(project.id, [(ids[2], a.id, "accepted"), (foreign[0].id, a.id, "accepted")],
                           kind="accept")
    assert store.get_image(ids[2]).class_id is None and len(store.list_actions(project.id)) == 2
    # an image changed since the action is left alone by its undo
    act = store.label_images(project.id, [(ids[2], a.id, "accepted"), (ids[3], a.id, "accepted")], kind="accept")
    store.move_images([(ids[3], b.id)], labeled_by="user")
    _, undo = store.undo_last(project.id)
    assert undo.count == 1 and store.get_image(ids[2]).class_id is None
    assert (store.get_image(ids[3]).class_id, store.get_image(ids[3]).labeled_by) == (b.id, "user")


def test_remove_undo_brings_rows_files_and_predictions_back(store, project, tmp_path):
    a = store.add_class(project.id, "a")
    imgs, _ = store.add_images(project.id, [(f"{i}.png", png(i)) for i in range(3)])
    model = store.register_model(project.id, "tip", "tiny", {}, {}, make_model_dir(tmp_path / "m"))
    store.save_predictions(model.id, [(i.id, a.id, 0.7, [0.7]) for i in imgs])
    gone = [imgs[0].id, imgs[1].id]
    before = [store.get_image(i) for i in gone]
    act = store.remove_undoably(project.id, gone, summary="Removed 2 images.")
    assert act.kind == "remove" and act.count == 2
    assert [i.id for i in store.list_images(project.id, pool=True)] == [imgs[2].id]
    assert [p.image_id for p in store.list_predictions(model.id)] == [imgs[2].id]
    assert all(store.image_path(i.hash).is_file() for i in before)  # kept for undo
    original, undo = store.undo_last(project.id)
    assert original.id == act.id and undo.count == 2
    assert [store.get_image(i) for i in gone] == before  # the same ids, names, sizes, times
    assert sorted(p.image_id for p in store.list_predictions(model.id)) == sorted(i.id for i in imgs)
    # removed for good: purged once older than REMOVED_KEEP_SECONDS, then its files go
    store.remove_undoably(project.id, gone)
    with store._tx() as conn:
        conn.execute("UPDATE actions SET created = created - ?", (store_mod.REMOVED_KEEP_SECONDS + 1,))
    assert store.collect_garbage()["images"] == 2
    assert not any(store.image_path(i.hash).is_file() for i in before)
    assert store.undo_last(project.id) is None  # the purged removal is no longer offered
    assert store.check_integrity() == []


def test_deleting_a_project_releases_the_files_kept_for_undo(store, project):
    imgs, _ = store.add_images(project.id, [("x.png", png(1))])
    store.remove_undoably(project.id, [imgs[0].id])
    assert store.image_path(imgs[0].hash).is_file()
    store.delete_project(project.id)
    assert not store.image_path(imgs[0].hash).is_file()


def test_a_database_from_before_the_action_log_migrates(tmp_path):
    root = tmp_path / "data"
    with ProjectStore(root, migrations=MIGRATIONS[:3]) as s:  # schema 3: no action log
        p = s.create_project("Old")
        c = s.add_class(p.id, "cat")
        imgs, _ = s.add_images(p.id, [("a.png", png(1))])
    with ProjectStore(root) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert s.list_actions(p.id) == [] and s.labeled_since(p.id, 0) == 0
        s.label_images(p.id, [(imgs[0].id, c.id, "accepted")], kind="accept")
        assert s.get_image(imgs[0].id).labeled_by == "accepted"
        s.undo_last(p.id)
        assert s.get_image(imgs[0].id).class_id is None
