// The labeling station's keys and the grid's selection: the page's only JavaScript (ui/station.py).
// Keys click the station's own buttons by elem_id, so a key and a mouse click run the same handler.
// Nothing here talks to the server: the grid's selection goes into a hidden textbox that the
// Python handlers read.
(() => {
  if (window.fsStation) return;
  const KEYS = {
    Enter: "station-accept", a: "station-accept", s: "station-skip", z: "station-undo",
    ArrowLeft: "station-prev", ArrowRight: "station-next",
  };
  // One action at a time: a key pressed before the last action's result is on screen would act on
  // the image that is leaving. An action is over when another image shows, or when its event
  // ends (station.py chains .then(js=idle) to each: errors and undo end so); BUSY_MS is the
  // fallback should neither happen.
  const BUSY_MS = 5000;
  let busy = null;

  const typing = (el) => !!el && (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
  const shown = (el) => !!el && el.offsetParent !== null;
  const button = (id) => {
    const el = document.getElementById(id);
    if (!el) return null;
    return el.tagName === "BUTTON" ? el : el.querySelector("button");
  };
  const onScreen = () => {
    const fig = document.querySelector("#station-image [data-image-id]");
    return fig ? fig.dataset.imageId : null;
  };

  function press(id) {
    const b = button(id);
    if (!shown(b) || b.disabled) return false;
    const image = onScreen();
    if (busy && busy.image === image && Date.now() - busy.t < BUSY_MS) return true; // swallowed: wait
    busy = { image, t: Date.now() };
    b.click();
    return true;
  }

  function toggleHelp() {
    const help = document.getElementById("fs-keys-help");
    if (help) help.hidden = !help.hidden;
  }

  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.metaKey || typing(e.target)) return;
    const station = document.getElementById("station");
    if (!shown(station)) return; // another tab is open
    if (e.key === "?") { toggleHelp(); e.preventDefault(); return; }
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (e.ctrlKey && key !== "z") return; // Ctrl+Z undoes; other shortcuts stay the browser's
    // Enter accepts, except on a grid tile (it toggles) and on a control outside the station that
    // has the focus (the browser's own keyboard access); a station button clicked with the mouse
    // keeps the focus, and Enter must still accept rather than press it again.
    if (key === "Enter" && e.target.closest) {
      if (e.target.closest(".fs-tile")) return;
      const control = e.target.closest("button, a, [role=button]");
      if (control && !control.closest("#station") && control.getAttribute("role") !== "tab") return;
    }
    let id = null;
    if (/^[1-9]$/.test(key)) id = `station-class-${key}`;
    else if (KEYS[key]) id = KEYS[key];
    if (id && press(id)) e.preventDefault();
  }, true);

  // ---- grid selection: click toggles, shift-click selects the range from the last click, a drag
  // selects (or unselects) every tile it passes; Space/Enter on a focused tile toggles it.
  let anchor = null, dragging = null;
  const tiles = () => Array.from(document.querySelectorAll("#station-grid-tiles .fs-tile"));
  const tileOf = (el) => (el && el.closest ? el.closest("#station-grid-tiles .fs-tile") : null);
  const isOn = (t) => t.getAttribute("aria-selected") === "true";
  const mark = (t, on) => t.setAttribute("aria-selected", on ? "true" : "false");

  function sync() {
    const ids = tiles().filter(isOn).map((t) => t.dataset.imageId);
    const box = document.querySelector("#station-grid-selection textarea, #station-grid-selection input");
    if (box) {
      box.value = ids.join(", ");
      box.dispatchEvent(new Event("input", { bubbles: true }));
    }
    const count = document.getElementById("fs-grid-count");
    if (count) count.textContent = ids.length ? `${ids.length} selected` : "";
  }

  function range(from, to, on) {
    const all = tiles();
    const [i, j] = [all.indexOf(from), all.indexOf(to)].sort((x, y) => x - y);
    if (i < 0) return mark(to, on);
    all.slice(i, j + 1).forEach((t) => mark(t, on));
  }

  document.addEventListener("mousedown", (e) => {
    const t = tileOf(e.target);
    if (!t || e.button !== 0) return;
    e.preventDefault(); // no text selection or image drag while sweeping
    t.focus();
    if (e.shiftKey && anchor && document.contains(anchor)) {
      range(anchor, t, true);
    } else {
      dragging = !isOn(t);
      mark(t, dragging);
      anchor = t;
    }
    sync();
  });
  document.addEventListener("mouseover", (e) => {
    if (dragging === null || !(e.buttons & 1)) return;
    const t = tileOf(e.target);
    if (t) { mark(t, dragging); sync(); }
  });
  document.addEventListener("mouseup", () => { dragging = null; });
  document.addEventListener("keydown", (e) => {
    const t = tileOf(e.target);
    if (!t || (e.key !== " " && e.key !== "Enter")) return;
    e.preventDefault();
    if (e.shiftKey && anchor && document.contains(anchor)) range(anchor, t, true);
    else { mark(t, !isOn(t)); anchor = t; }
    sync();
  });

  window.fsStation = {
    idle() { busy = null; },
    press,
    selected: () => tiles().filter(isOn).map((t) => Number(t.dataset.imageId)),
  };
})();
