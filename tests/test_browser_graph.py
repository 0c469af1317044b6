"""The Knowledge graph tab in Debian's Chromium (Playwright), on the shapes example trained with
GraphAdapter (tiny backbone): the edge table has a fused column, typing a threshold into the
slider's number box redraws without Refresh, "Sort edges by" orders the table, and the "looks
alike, named differently" table lists only pairs whose visual similarity reaches the rule's level."""
from __future__ import annotations

import time

import pytest

from helpers import HAVE_CHROMIUM, NO_CHROMIUM

from fewshot_studio import viz
from fewshot_studio.app import modeling, projects
from fewshot_studio.backbone import BackboneSpec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)]

# A Gradio 6 Dataframe is a virtual grid: header cells are <th>, body rows are
# div[role=row].virtual-row (only those in view are rendered; data-index is the row's place)
# and the grid's aria-rowcount counts the header row too.
TABLE_ROWS_JS = """(id) => Array.from(document.querySelectorAll(`#${id} [role=row].virtual-row`))
    .sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index))
    .map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))"""
HEADERS_JS = """(id) => Array.from(document.querySelectorAll(`#${id} thead th`))
    .map(th => th.innerText.replace('⋮', '').trim())"""


def wait_until(read, ok, timeout: float = 30.0):
    """Poll `read()` until `ok(value)`; the last value either way (the assertion shows it)."""
    end = time.monotonic() + timeout
    value = read()
    while not ok(value) and time.monotonic() < end:
        time.sleep(0.2)
        value = read()
    return value


def table(page, elem_id: str) -> list[list[str]]:
    """All rows of a Dataframe (the tables here are short enough to be rendered whole)."""
    def read():
        count = int(page.locator(f"#{elem_id} [role=grid]").get_attribute("aria-rowcount") or 1) - 1
        return count, page.evaluate(TABLE_ROWS_JS, elem_id)

    count, rows = wait_until(read, lambda cr: len(cr[1]) == cr[0], timeout=10.0)  # mid-redraw: wait
    assert len(rows) == count, f"{elem_id}: {len(rows)} of {count} rows rendered"
    return rows


def column(page, elem_id: str, name: str) -> list[str]:
    headers = page.evaluate(HEADERS_JS, elem_id)
    k = headers.index(name)
    return [row[k] for row in table(page, elem_id)]


def number(cell: str) -> float | None:
    return float(cell) if cell not in ("", "None", "n/a") else None


def test_knowledge_graph_tab(app, browser):  # noqa: F811
    from playwright.sync_api import expect

    studio = app.workspace
    project = projects.load_example(studio, "shapes")
    job = modeling.start_training(studio.scope(project.id), "graph", BackboneSpec("tiny", None, device="cpu"))
    state = studio.runner.wait(job, timeout=300)
    assert state.status == "done", state
    kg = modeling.knowledge_graph(studio.scope(project.id))
    level = kg.confusable_level()
    assert level is not None

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(app.local_url)
        expect(page.locator("#project-select input")).to_have_value(project.name, timeout=60_000)
        page.get_by_role("tab", name="3 · Knowledge graph").click()
        expect(page.locator("#graph-plot .js-plotly-plot")).to_be_visible(timeout=60_000)
        expect(page.locator("#edge-table")).to_contain_text("red circle", timeout=30_000)

        # the fused column is there and, for GraphAdapter, filled
        headers = page.evaluate(HEADERS_JS, "edge-table")
        assert headers == viz.EDGE_COLUMNS, headers
        fused = [number(c) for c in column(page, "edge-table", "fused")]
        assert fused and all(f is not None for f in fused), fused

        # typing a threshold (no Refresh, no leaving the box) redraws the table
        before = len(table(page, "edge-table"))
        assert before == len(viz.edge_rows(kg, 0.0))
        after = len(viz.edge_rows(kg, 0.3))
        assert after < before  # else the check below proves nothing
        box = page.locator("#graph-threshold input[type=number]")
        box.fill("0.3")
        rows = wait_until(lambda: table(page, "edge-table"), lambda r: len(r) == after)
        assert len(rows) == after, (before, after, rows)
        assert all(max(x for x in map(number, r[2:]) if x is not None) >= 0.3 - 1e-4 for r in rows)
        box.fill("0")
        rows = wait_until(lambda: table(page, "edge-table"), lambda r: len(r) == before)
        assert len(rows) == before

        # "Sort edges by" orders the table (the default, visual − textual, orders neither column)
        for choice in ("textual", "fused"):
            expected = [r[viz.EDGE_COLUMNS.index(choice)] for r in viz.edge_rows(kg, 0.0, sort_by=choice)]
            assert expected == sorted(expected, reverse=True)
            page.locator("#edge-sort input").click()
            page.get_by_role("option", name=choice, exact=True).click()
            shown = wait_until(lambda: [number(c) for c in column(page, "edge-table", choice)],
                               lambda v: v == pytest.approx(expected, abs=1e-4))
            assert shown == pytest.approx(expected, abs=1e-4), (choice, shown, expected)

        # "looks alike" lists only pairs that really look alike, and the info line names the first
        rows = table(page, "confusable-table")
        assert rows, "the shapes example has a pair that looks alike but is named differently"
        k = viz.CONFUSABLE_COLUMNS.index("visual")
        assert all(number(r[k]) >= level - 1e-4 for r in rows), (level, rows)
        assert [r[:2] for r in rows] == [[p["a"], p["b"]] for p in kg.confusable_pairs() if p["visual"] >= 0.0]
        expect(page.locator("#graph-info")).to_contain_text(f"most confusable pair: {rows[0][0]} and {rows[0][1]}")

        # the label's other promise: a header's ⋮ menu sorts the view in the browser
        header = page.locator("#edge-table thead th", has_text="textual").first
        header.hover()
        header.locator("button[aria-label='Open cell menu']").click()
        page.get_by_text("Sort ascending", exact=True).click()
        shown = wait_until(lambda: [number(c) for c in column(page, "edge-table", "textual")],
                           lambda v: v == sorted(v))
        assert shown == sorted(shown), shown
        assert not errors, errors
    finally:
        page.close()
