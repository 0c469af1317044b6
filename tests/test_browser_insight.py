"""The Inspect tab in Debian's Chromium (Playwright), on a small project with planted faults (tiny
backbone; 14 images, so the map is the instant PCA one): the map renders, a click on a point opens
that image, a lasso selection of two pool images relabels them and the store has them. Writes
docs/insight.png, the README's picture of the map."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import HAVE_CHROMIUM, NO_CHROMIUM

from test_insight import small_project

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)]

INSIGHT_SHOT = Path(__file__).resolve().parent.parent / "docs" / "insight.png"

# every point of the map: its screen position, image id and whether it is a pool point (an open circle)
POINTS_JS = """() => {
  const gd = document.querySelector('#insight-map .js-plotly-plot');
  const out = [];
  gd.querySelectorAll('.scatterlayer .trace').forEach((tr, t) => {
    tr.querySelectorAll('path.point').forEach((p, k) => {
      const r = p.getBoundingClientRect();
      out.push({x: r.left + r.width / 2, y: r.top + r.height / 2, id: gd.data[t].customdata[k],
                pool: gd.data[t].name.includes('pool')});
    });
  });
  return out;
}"""


def lasso(page, centres, r: float = 7.0) -> None:
    """One lasso drawn by the mouse around each of `centres` in turn: a small circle around the
    first, along a straight line to the next and around it, ..., and back along the same lines
    (the way out and back encloses nothing, so only the circles select)."""
    import math

    def circle(x, y):
        for k in range(1, 17):
            a = 2 * math.pi * k / 16
            page.mouse.move(x + r * math.cos(a), y + r * math.sin(a), steps=2)

    (x0, y0), rest = centres[0], centres[1:]
    page.mouse.move(x0 + r, y0)
    page.mouse.down()
    circle(x0, y0)
    for x, y in rest:
        page.mouse.move(x + r, y, steps=8)
        circle(x, y)
    for x, y in [*reversed(rest[:-1]), (x0, y0)]:
        page.mouse.move(x + r, y, steps=8)
    page.mouse.up()


def isolated(points, gap: float = 15.0):
    return [p for p in points if all((p["x"] - q["x"]) ** 2 + (p["y"] - q["y"]) ** 2 > gap ** 2
                                     for q in points if q is not p)]


def test_inspect_tab_map_click_and_lasso(app, browser, tmp_path):
    from playwright.sync_api import expect

    ws = app.workspace
    scope = small_project(ws, tmp_path)
    names = {i.id: i.original_name for i in ws.store.list_images(scope.id)}
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(app.local_url)
        expect(page.locator("#project-select input")).to_have_value("faults", timeout=60_000)
        page.get_by_role("tab", name="7 · Inspect").click()
        page.locator("#insight-run").click()
        expect(page.locator("#insight-map .js-plotly-plot path.point").first).to_be_visible(timeout=120_000)
        expect(page.locator("#insight-info")).to_contain_text("that may be in the wrong class", timeout=30_000)
        page.locator("#insight-map").scroll_into_view_if_needed()  # the mouse acts in the viewport
        page.wait_for_timeout(300)
        points = page.evaluate(POINTS_JS)
        assert len(points) == len(names), points

        # a click on a point opens that image
        spots = isolated(points)
        first = next(p for p in spots if not p["pool"])
        page.mouse.move(first["x"], first["y"])
        page.wait_for_timeout(300)  # plotly's click reports the point its (throttled) hover found
        page.mouse.click(first["x"], first["y"])
        expect(page.locator("#insight-picked")).to_contain_text(f"#{first['id']}", timeout=30_000)
        expect(page.locator("#insight-picked")).to_contain_text(Path(names[first["id"]]).name)
        expect(page.locator("#insight-image img")).to_be_visible(timeout=30_000)
        page.locator("#insight-map").screenshot(path=str(INSIGHT_SHOT))  # the README's picture of the map

        # one lasso around two pool points: two selected
        pool = [p for p in spots if p["pool"]][:2]
        assert len(pool) == 2, spots
        lasso(page, [(p["x"], p["y"]) for p in pool])
        expect(page.locator("#insight-picked")).to_contain_text("2 images selected", timeout=30_000)
        page.locator("#insight-class input").click()
        page.get_by_role("option", name="green triangle", exact=True).click()
        page.locator("#insight-relabel").click()
        expect(page.locator("#insight-done")).to_contain_text("Labeled 2 images as green triangle", timeout=30_000)
        triangle = next(c.id for c in ws.store.list_classes(scope.id) if c.name == "green triangle")
        for p in pool:
            assert ws.store.get_image(int(p["id"])).class_id == triangle
        assert not errors, errors
    finally:
        page.close()
