// The Inspect tab's map (ui/insight.py): gr.Plot does not forward plotly's events to Python, so a
// click on a point writes "click:<image id>" and a lasso/box selection "select:<ids>" into the
// hidden textbox #insight-selection and presses the hidden button #insight-pick, whose handler
// reads it (a hidden textbox's own input event does not reach Python). Hovering a point
// shows its thumbnail (the URLs are in #insight-thumbs' data-thumbs).
(() => {
  if (window.fsInsight) return;
  window.fsInsight = true;
  const ids = (points) => points.map((p) => Array.isArray(p.customdata) ? p.customdata[0] : p.customdata)
    .filter((v) => v !== undefined && v !== null);

  let pending = null;
  function send(text) {
    const box = document.querySelector("#insight-selection textarea, #insight-selection input");
    if (!box) return;
    box.value = text;
    box.dispatchEvent(new Event("input", { bubbles: true }));
    // a click also reports a one-point selection just before: press once for the last of them
    clearTimeout(pending);
    pending = setTimeout(() => {
      const b = document.getElementById("insight-pick");
      const button = b && (b.tagName === "BUTTON" ? b : b.querySelector("button"));
      if (button) button.click();
    }, 60);
  }

  let tip = null;
  function thumbs() {
    const el = document.getElementById("insight-thumbs");
    try { return el ? JSON.parse(el.dataset.thumbs || "{}") : {}; } catch (e) { return {}; }
  }
  function showTip(ev) {
    const p = ev.points && ev.points[0];
    const url = p ? thumbs()[String(ids([p])[0])] : null;
    if (!url) return;
    if (!tip) {
      tip = document.createElement("img");
      tip.id = "insight-hover-thumb";
      tip.style.cssText = "position:fixed;z-index:1000;width:120px;pointer-events:none;border:1px solid #999;" +
        "background:#fff;box-shadow:0 2px 8px rgba(0,0,0,.25)";
      document.body.appendChild(tip);
    }
    tip.src = url;
    const e = ev.event || {};
    tip.style.left = `${(e.clientX || 0) + 16}px`;
    tip.style.top = `${(e.clientY || 0) + 16}px`;
    tip.hidden = false;
  }

  function bind() {
    const plot = document.querySelector("#insight-map .js-plotly-plot");
    if (!plot || plot.dataset.fsBound === "1" || typeof plot.on !== "function") return;
    plot.dataset.fsBound = "1";
    plot.on("plotly_click", (ev) => { const v = ids(ev.points || []); if (v.length) send(`click:${v[0]}`); });
    plot.on("plotly_selected", (ev) => { if (ev) send(`select:${ids(ev.points || []).join(",")}`); });
    plot.on("plotly_hover", showTip);
    plot.on("plotly_unhover", () => { if (tip) tip.hidden = true; });
  }
  // the plot is replaced on every redraw: bind each new one
  new MutationObserver(bind).observe(document.body, { childList: true, subtree: true });
})();
