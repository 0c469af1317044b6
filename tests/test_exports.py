"""Exports that lose or mislead nothing (issue #13, findings 6, 7 and 9): ImageFolder folders and
file names that are safe on every system and never merge two classes or two images (with a
manifest that maps them back), labels.csv cells that a spreadsheet never runs as formulas, and
the unlabeled pool's name refused as a class name on every path."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pytest

from fewshot_studio import shapes
from fewshot_studio.app import Workspace, exports, library, projects
from fewshot_studio.app.library import POOL
from fewshot_studio.backbone import BackboneSpec
from fewshot_studio.errors import FewShotError
from fewshot_studio.store import ReservedNameError
from fewshot_studio.ui import presenters

WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(10))}


@pytest.fixture
def ws(tmp_path):
    w = Workspace.at(tmp_path / "data", BackboneSpec("tiny", None, device="cpu"))
    yield w
    w.close()


def png(seed: int, label: str = "red circle") -> bytes:
    b = io.BytesIO()
    shapes.render(shapes.ShapeSpec(*label.split(" ", 1)), np.random.default_rng(seed), 32).save(b, "PNG")
    return b.getvalue()


def valid_on_windows(part: str) -> bool:
    return (bool(part) and not re.search(r'[<>:"/\\|?*\x00-\x1f]', part) and part[-1] not in " ."
            and part.split(".")[0].rstrip(" ").upper() not in WINDOWS_DEVICES and len(part) <= 255
            and len(part.encode("utf-8")) <= 255)


LONG_A = "a" * 100 + "b" * 50
LONG_B = "a" * 100 + "c" * 50
COLLIDING = ["cat/dog", "cat:dog", "cat_dog", LONG_A, LONG_B, "x?", "x*", "y.", "y", "CON"]


def test_imagefolder_keeps_colliding_classes_and_same_named_images_apart(ws):
    p = projects.create_project(ws, "Collisions")
    sc = ws.scope(p.id)
    hashes: dict[str, set[str]] = {}
    for k, name in enumerate(COLLIDING):
        c = library.add_class(sc, name)
        items = [(f"img{k}.png", png(k))]
        if name == "cat_dog":  # two uploads with the same original name, different content
            items += [("same.png", png(100)), ("same.png", png(101)), ("SAME.png", png(102))]
        infos, errors = library.add_images(sc, items, class_id=c.id)
        assert errors == [] and len(infos) == len(items)
        hashes[name] = {i.hash for i in infos}

    folder = exports.export_imagefolder(sc)
    with zipfile.ZipFile(folder.path) as z:
        manifest = json.loads(z.read("manifest.json"))
        entries = {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist() if n != "manifest.json"}
    rows = manifest["classes"]
    assert manifest["project"] == "Collisions"
    assert [r["class"] for r in rows] == COLLIDING  # class order, every class
    by_folder = {r["folder"]: r for r in rows}
    assert len({f.casefold() for f in by_folder}) == len(COLLIDING)  # distinct even ignoring case
    for name in COLLIDING:
        row = next(r for r in rows if r["class"] == name)
        got = {h for n, h in entries.items() if n.split("/")[0] == row["folder"]}
        assert got == hashes[name] and row["images"] == len(hashes[name]), name
    assert sorted({n.split("/")[0] for n in entries}) == sorted(by_folder)
    for n in entries:
        folder_name, file_name = n.split("/")
        assert valid_on_windows(folder_name) and valid_on_windows(file_name), n
        assert len(folder_name) <= 100
    files = [n.split("/")[1] for n in entries]
    assert len({f.casefold() for f in entries}) == len(entries)  # no two entries one file on Windows/macOS
    assert sum(f.casefold().startswith("same") for f in files) == 3
    assert by_folder["cat_dog"]["class"] == "cat_dog" and by_folder["y"]["class"] == "y"  # safe names kept
    assert by_folder["_CON"]["class"] == "CON"
    renamed = [r for r in rows if r["folder"] != r["class"]]
    assert folder.renamed == len(renamed) == 8  # all but cat_dog and y
    assert presenters.renamed_folders(folder) == (
        " 8 class names were changed to be safe folder names; see manifest.json in the zip.")


def test_safe_names_and_unique_names():
    for name in ["cat/dog", "a\\b", "x?", "trailing. ", " .lead", "CON", "con.txt", "Lpt1 .png", "nul", "\x07bell",
                 "é" * 150, "🐈" * 120, "", "..."]:
        s = exports.safe_name(name)
        assert valid_on_windows(s) and len(s) <= exports.MAX_PART_CHARS, (name, s)
    used: set[str] = set()
    got = [exports.unique_name("x" * 100, used, ".png") for _ in range(12)]
    assert len({g.casefold() for g in got}) == 12 and all(valid_on_windows(g) and len(g) <= 110 for g in got)
    assert got[1].endswith(" (2).png") and got[11].endswith(" (12).png")
    assert exports.class_folders(["B", "a/b", "a_b", "A_B (2)"]) == {
        "B": "B", "a_b": "a_b", "A_B (2)": "A_B (2)", "a/b": "a_b (3)"}  # kept names first, then (2), (3)...


FORMULAS = ['=HYPERLINK("http://x")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-1+1"]


def test_labels_csv_escapes_formulas_and_json_keeps_them(ws):
    p = projects.create_project(ws, "Formulas")
    sc = ws.scope(p.id)
    for k, name in enumerate(FORMULAS):
        c = library.add_class(sc, name)
        library.add_images(sc, [(f"=cell{k}.png", png(k))], class_id=c.id)
    library.add_images(sc, [("plain.png", png(50))])  # the pool: an empty label stays empty
    with open(exports.export_labels_csv(sc), newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert header == exports.LABEL_FIELDS
    rows = [dict(zip(header, r)) for r in rows]
    assert sorted(r["label"] for r in rows if r["label"]) == sorted("'" + n for n in FORMULAS)
    assert {r["file"] for r in rows} == {f"'=cell{k}.png" for k in range(4)} | {"plain.png"}
    assert all(re.fullmatch(r"\d+", r["image_id"]) for r in rows)  # numbers stay numbers
    assert [r["label"] for r in rows if r["file"] == "plain.png"] == [""]
    data = json.loads(exports.export_labels_json(sc).read_text(encoding="utf-8"))
    assert [c["name"] for c in data["classes"]] == FORMULAS
    assert sorted(i["label"] for i in data["images"] if i["label"]) == sorted(FORMULAS)
    for cell, want in [("\tx", "'\tx"), ("\rx", "'\rx"), ("a=b", "a=b"), (3, 3), (-1.5, -1.5), (None, None)]:
        assert exports.csv_cell(cell) == want


RESERVED = ["(unlabeled pool)", "(Unlabeled Pool) ", "  (UNLABELED POOL)", "(unlabeled  pool)",
            "（unlabeled pool）", "(unlabeled\u200b pool)"]


def test_pool_name_is_refused_as_a_class_name_on_every_path(ws):
    p = projects.create_project(ws, "Reserved")
    sc = ws.scope(p.id)
    for name in RESERVED:
        for call in (lambda: library.add_class(sc, name), lambda: ws.store.add_class(p.id, name)):
            with pytest.raises(ReservedNameError) as e:
                call()
            assert str(e.value) == f"{name!r} is reserved for the unlabeled pool; choose another class name."
    assert str(pytest.raises(FewShotError, library.add_class, sc, "(Unlabeled Pool) ").value) == (
        "'(Unlabeled Pool) ' is reserved for the unlabeled pool; choose another class name.")
    c = library.add_class(sc, "cats")
    for name in RESERVED:
        with pytest.raises(ReservedNameError):
            library.rename_class(sc, c.id, name)
        with pytest.raises(ReservedNameError):
            ws.store.rename_class(c.id, name)
    library.add_class(sc, "unlabeled pool")  # close, but not the pool's name
    assert [r[0] for r in library.class_rows(sc)] == ["cats", "unlabeled pool", POOL]


def test_zip_folders_named_like_the_pool_are_refused_and_the_rest_imported(ws, tmp_path):
    p = projects.create_project(ws, "Zip")
    sc = ws.scope(p.id)
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("(unlabeled pool)/a.png", png(1))
        zf.writestr("(Unlabeled Pool) /b.png", png(2))
        zf.writestr("(Unlabeled Pool) /c.png", png(3))
        zf.writestr("dogs/d.png", png(4))
        zf.writestr("loose.png", png(5))
    up = library.add_uploads(sc, [z], None)
    assert up.added == 2
    assert up.errors == [
        "(unlabeled pool)/ (in set.zip): the folder name '(unlabeled pool)' is reserved for the unlabeled pool, "
        "so its 1 file was skipped; rename the folder.",
        "(Unlabeled Pool) / (in set.zip): the folder name '(Unlabeled Pool) ' is reserved for the unlabeled "
        "pool, so its 2 files were skipped; rename the folder."]
    rows = library.class_rows(sc)
    assert [r[0] for r in rows] == ["dogs", POOL] and rows[-1][2] == 1 and rows[0][2] == 1
    # uploaded to the pool on purpose, the same zip's images all go there
    up = library.add_uploads(sc, [z], POOL)
    assert up.added == 4 and up.duplicates == 1 and up.errors == []  # loose.png was in the pool already
    assert [r[:3:2] for r in library.class_rows(sc)] == [["dogs", 1], [POOL, 5]]  # loose.png once
