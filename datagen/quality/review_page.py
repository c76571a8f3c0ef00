"""The HTML/CSS/JS of the review page (no external resources), and the one function that fills it in."""
from __future__ import annotations

import re
from typing import Any

from datagen.escaping import html_text, script_json

_SLOT = re.compile(r"__(TITLE|DATA)__")


def render_page(title: str, data: Any) -> str:
    """The page with its title (as HTML text) and data (as script-safe JSON), filled in one pass.

    One pass, so a title or sample text that contains a slot's name is never filled in itself.
    """
    values = {"TITLE": html_text(title), "DATA": script_json(data)}
    return _SLOT.sub(lambda m: values[m.group(1)], PAGE_TEMPLATE)


# Rule of the page's script: sample strings reach the DOM only as textContent, text nodes or
# setAttribute values (el(), svgEl(), createTextNode); never innerHTML or a URL built from them.
PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --bg: #f6f7f9; --card: #fff; --ink: #1d232b; --dim: #67707c; --bad: #c62828; --ok: #2e7d32; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--ink); }
  header { position: sticky; top: 0; z-index: 2; background: #263238; color: #fff; padding: 10px 16px;
           display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
  header h1 { font-size: 16px; margin: 0 12px 0 0; }
  header label { font-size: 13px; }
  header select, header input { font: inherit; padding: 2px 4px; }
  #count { margin-left: auto; font-size: 13px; }
  #pager button { font: inherit; margin: 0 2px; }
  main { padding: 12px 16px; }
  .card { background: var(--card); border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); margin: 0 0 14px;
          display: grid; grid-template-columns: minmax(260px, 480px) 1fr; gap: 16px; padding: 12px; }
  .card.rejected { border-left: 5px solid var(--bad); }
  .card.accepted { border-left: 5px solid var(--ok); }
  figure { margin: 0; align-self: start; }
  .frame { position: relative; }
  figure img { display: block; width: 100%; height: auto; border-radius: 4px; background: #ddd; min-height: 60px; }
  figure svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
  figure svg rect.box { fill: none; stroke-width: 2.5; vector-effect: non-scaling-stroke; }
  figure svg rect.textbox { fill: none; stroke-width: 4; stroke-dasharray: 8 5; vector-effect: non-scaling-stroke; }
  figure svg rect.label { fill: rgba(20,20,20,.72); stroke-width: 1; vector-effect: non-scaling-stroke; }
  figure svg text { font-weight: 600; }
  figcaption { color: var(--dim); font-size: 12px; margin-top: 4px; word-break: break-all; }
  .legend { margin-top: 4px; font-size: 12px; line-height: 1.3; }
  .legend span { display: inline-block; margin: 1px 8px 1px 0; white-space: nowrap; }
  .legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px;
              vertical-align: -1px; }
  /* Sample text: long words wrap, and a direction override inside it cannot reorder the page around it. */
  .u { unicode-bidi: isolate; overflow-wrap: anywhere; }
  h3, .details li, pre.context, .turn { overflow-wrap: anywhere; }
  .noimg { padding: 24px; background: #eee; color: var(--dim); border-radius: 4px; overflow-wrap: anywhere; }
  h3 { margin: 0 0 6px; font-size: 14px; }
  h4 { margin: 10px 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--dim); }
  pre.context { white-space: pre-wrap; unicode-bidi: isolate; background: #f1f3f5; padding: 8px; border-radius: 4px; margin: 0;
                font-size: 12px; max-height: 220px; overflow: auto; }
  .turn { margin: 4px 0; white-space: pre-wrap; }
  .turn b { display: inline-block; min-width: 52px; }
  .turn.human b { color: #1565c0; }
  .turn.gpt b { color: #2e7d32; }
  .flag { display: inline-block; background: #fdecea; color: var(--bad); border-radius: 10px; padding: 1px 8px;
          margin: 2px 4px 2px 0; font-size: 12px; }
  .flag.ok { background: #e8f5e9; color: var(--ok); }
  .details { color: var(--dim); font-size: 12px; margin: 2px 0 0; padding-left: 18px; }
  mark.halluc { background: #ffcdd2; }
  @media (max-width: 800px) { .card { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>split <select id="split"></select></label>
  <label>checks <select id="reason"></select></label>
  <label>search <input id="search" type="search" placeholder="id or text"></label>
  <span id="pager"></span>
  <span id="count"></span>
</header>
<main id="list"></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const SAMPLES = DATA.samples;
const PAGE_SIZE = 50;
const SVG_NS = "http://www.w3.org/2000/svg";
let page = 0;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function colour(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return "hsl(" + h + ", 85%, 55%)";
}

function option(select, value, label) {
  const o = el("option", { value: value }, label);
  select.appendChild(o);
}

function countBy(key) {
  const counts = new Map();
  for (const s of SAMPLES) for (const v of key(s)) counts.set(v, (counts.get(v) || 0) + 1);
  return counts;
}

function setupFilters() {
  const split = document.getElementById("split");
  option(split, "", "all (" + SAMPLES.length + ")");
  for (const [name, n] of [...countBy(s => [s.split])].sort()) option(split, name, name + " (" + n + ")");
  const reason = document.getElementById("reason");
  option(reason, "", "all");
  const accepted = SAMPLES.filter(s => s.flags.length === 0).length;
  option(reason, "__ok", "passed (" + accepted + ")");
  option(reason, "__flagged", "flagged (" + (SAMPLES.length - accepted) + ")");
  for (const [code, n] of [...countBy(s => s.flags)].sort()) option(reason, code, code + " (" + n + ")");
  // A link like page.html#reason=truncated&split=detail opens with those filters set.
  const preset = new URLSearchParams(location.hash.slice(1));
  for (const id of ["split", "reason", "search"]) {
    const control = document.getElementById(id);
    if (preset.has(id)) control.value = preset.get(id);
    control.addEventListener("input", () => { page = 0; render(); });
  }
}

function matches(s) {
  const split = document.getElementById("split").value;
  const reason = document.getElementById("reason").value;
  const query = document.getElementById("search").value.trim().toLowerCase();
  if (split && s.split !== split) return false;
  if (reason === "__ok" && s.flags.length) return false;
  if (reason === "__flagged" && !s.flags.length) return false;
  if (reason && !reason.startsWith("__") && !s.flags.includes(reason)) return false;
  if (query) {
    const text = (s.id + " " + s.image + " " + s.turns.map(t => t[1]).join(" ")).toLowerCase();
    if (!text.includes(query)) return false;
  }
  return true;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function overlaps(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

// Where a label goes: the first spot, in order of preference, that lies inside the image and covers no
// label placed before it; then the free spot nearest the box, scanning the image's height in label rows.
// A label with no free spot is left out (its box stays drawn, and the legend names every category).
function labelSpot(size, box, placed, W, H) {
  const [x, y, w, h] = box;
  const clampX = v => Math.min(Math.max(v, 0), Math.max(0, W - size.w));
  const clampY = v => Math.min(Math.max(v, 0), Math.max(0, H - size.h));
  const free = r => r.w <= W && r.h <= H && !placed.some(p => overlaps(p, r));
  const preferred = box.dashed ? [y + h - size.h, y + h, y, y - size.h] : [y, y - size.h, y + h - size.h, y + h];
  for (const top of preferred) {
    for (const left of [x, x + w - size.w]) {
      const r = { x: clampX(left), y: clampY(top), w: size.w, h: size.h };
      if (free(r)) return r;
    }
  }
  const rows = Math.floor(H / size.h);
  const centre = clampY(y);
  for (let step = 1; step <= 2 * rows; step++) {
    const top = clampY(centre + (step % 2 ? 1 : -1) * Math.ceil(step / 2) * size.h);
    for (const left of [x, x + w - size.w, 0, W - size.w]) {
      const r = { x: clampX(left), y: top, w: size.w, h: size.h };
      if (free(r)) return r;
    }
  }
  return null;
}

function drawBoxes(figure, svg, s) {
  // Labels in image pixels, sized to the shown width: about 11 CSS pixels at the usual 480-pixel display.
  const fontSize = Math.max(8, Math.round(s.w / 42));
  const pad = Math.round(fontSize * 0.3);
  const labels = [];
  for (const [name, x, y, w, h] of s.boxes) {
    svg.appendChild(svgEl("rect", { class: "box", x: x, y: y, width: w, height: h, stroke: colour(name), "data-category": name }));
    labels.push({ text: name, name: name, box: [x, y, w, h] });
  }
  // Boxes the sample's text mentions (grounded split): dashed, labelled with the object named before them.
  for (const [name, x, y, w, h] of (s.textBoxes || [])) {
    svg.appendChild(svgEl("rect", { class: "textbox", x: x, y: y, width: w, height: h, stroke: colour(name), "data-category": name }));
    const box = [x, y, w, h];
    box.dashed = true;
    labels.push({ text: "\u2192 " + name, name: name, box: box });
  }
  // Small boxes first: a big box has room for its label in many places, a small one in few.
  labels.sort((a, b) => a.box[2] * a.box[3] - b.box[2] * b.box[3]);
  const placed = [];
  let dropped = 0;
  for (const label of labels) {
    const text = svgEl("text", { "font-size": fontSize, fill: colour(label.name) }, label.text);
    svg.appendChild(text);
    const measured = text.getComputedTextLength ? text.getComputedTextLength() : 0;
    const width = (measured > 0 ? measured : 0.6 * fontSize * label.text.length) + 2 * pad;
    const spot = labelSpot({ w: Math.min(width, s.w), h: Math.round(fontSize * 1.3) }, label.box, placed, s.w, s.h);
    if (spot === null) { text.remove(); dropped++; continue; }
    placed.push(spot);
    const chip = svgEl("rect", { class: "label", x: spot.x, y: spot.y, width: spot.w, height: spot.h,
                                 stroke: colour(label.name), "data-category": label.name });
    svg.insertBefore(chip, text);
    text.setAttribute("x", spot.x + pad);
    text.setAttribute("y", spot.y + spot.h - Math.round((spot.h - fontSize) / 2) - Math.round(fontSize * 0.18));
    if (spot.w < width) text.setAttribute("textLength", spot.w - 2 * pad);
  }
  figure.dataset.boxesDrawn = String(s.boxes.length);
  figure.dataset.textBoxesDrawn = String((s.textBoxes || []).length);
  figure.dataset.labelsDrawn = String(placed.length);
  figure.dataset.labelsDropped = String(dropped);
}

function legend(s) {
  const counts = new Map();
  for (const [name] of [...s.boxes, ...(s.textBoxes || [])]) counts.set(name, (counts.get(name) || 0) + 1);
  const node = el("div", { class: "legend" });
  for (const [name, n] of [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))) {
    const item = el("span", { "data-category": name });
    const swatch = el("i");
    swatch.style.background = colour(name);
    item.append(swatch, document.createTextNode(n > 1 ? name + " \u00d7" + n : name));
    node.appendChild(item);
  }
  return node;
}

function figureFor(s) {
  const figure = el("figure");
  if (!s.src) {
    figure.appendChild(el("div", { class: "noimg" }, s.boxes ? "image file not found" : "no COCO record for " + s.image));
    figure.appendChild(el("figcaption", {}, s.image));
    return figure;
  }
  const frame = el("div", { class: "frame" });
  const img = el("img", { loading: "lazy", alt: s.image, width: s.w, height: s.h });
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + s.w + " " + s.h);
  svg.setAttribute("preserveAspectRatio", "none");
  img.addEventListener("load", () => {
    figure.dataset.imageLoaded = "1";
    // Boxes go on once the picture is there, so a drawn box always sits over a shown image.
    drawBoxes(figure, svg, s);
  });
  img.addEventListener("error", () => { figure.dataset.imageError = "1"; });
  img.src = s.src;
  // The overlay shares the image's box, so the viewBox (image pixels) scales with the shown size.
  frame.appendChild(img);
  frame.appendChild(svg);
  figure.appendChild(frame);
  figure.appendChild(el("figcaption", {}, s.image + " · " + s.w + "×" + s.h + " · " + s.boxes.length + " boxes"));
  if (s.boxes.length || (s.textBoxes || []).length) figure.appendChild(legend(s));
  return figure;
}

function highlighted(text, words) {
  const span = el("span", { class: "u" });
  if (!words.length) { span.textContent = text; return span; }
  const re = new RegExp("\\b(" + words.map(w => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|") + ")s?\\b", "gi");
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    span.appendChild(document.createTextNode(text.slice(last, m.index)));
    span.appendChild(el("mark", { class: "halluc", title: "not in the image's boxes or captions" }, m[0]));
    last = m.index + m[0].length;
  }
  span.appendChild(document.createTextNode(text.slice(last)));
  return span;
}

function card(s) {
  const node = el("article", { class: "card " + (s.flags.length ? "rejected" : "accepted"), "data-id": s.id });
  node.appendChild(figureFor(s));
  const body = el("div");
  const heading = el("h3", {}, "#" + s.n + " · ");
  heading.append(el("span", { class: "u sid" }, s.id), document.createTextNode(" · "), el("span", { class: "u" }, s.split));
  body.appendChild(heading);
  body.appendChild(el("h4", {}, "Checks"));
  const flags = el("div");
  if (!s.flags.length) flags.appendChild(el("span", { class: "flag ok" }, "all checks passed"));
  for (const code of s.flags) {
    const about = Object.prototype.hasOwnProperty.call(DATA.reasons, code) ? DATA.reasons[code] : "";
    flags.appendChild(el("span", { class: "flag u", title: about }, code));
  }
  body.appendChild(flags);
  const details = el("ul", { class: "details" });
  for (const [code, text] of Object.entries(s.details)) details.appendChild(el("li", { class: "u" }, code + ": " + text));
  if (s.absent && s.absent.length) details.appendChild(el("li", {}, "absent objects (must be denied): " + s.absent.join(", ")));
  if (s.objects.length) details.appendChild(el("li", {}, "objects named: " + s.objects.join(", ")));
  if (!s.objectsChecked && s.turns.length) details.appendChild(el("li", {}, "object check skipped (no COCO record)"));
  body.appendChild(details);
  if (s.turns.length) body.appendChild(el("h4", {}, "Conversation"));
  for (const [who, value] of s.turns) {
    const turn = el("div", { class: "turn " + who });
    turn.appendChild(el("b", {}, who));
    turn.appendChild(document.createTextNode(" "));
    turn.appendChild(who === "gpt" ? highlighted(value, s.hallucinatedWords) : el("span", { class: "u" }, value));
    body.appendChild(turn);
  }
  if (s.raw) {
    body.appendChild(el("h4", {}, "Raw completion (did not parse)"));
    body.appendChild(el("pre", { class: "context" }, s.raw));
  }
  if (s.context) {
    body.appendChild(el("h4", {}, "Context the writer saw"));
    body.appendChild(el("pre", { class: "context" }, s.context));
  }
  node.appendChild(body);
  return node;
}

function render() {
  const shown = SAMPLES.filter(matches);
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  page = Math.min(page, pages - 1);
  const list = document.getElementById("list");
  list.replaceChildren(...shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE).map(card));
  document.getElementById("count").textContent = shown.length + " of " + SAMPLES.length + " samples";
  const pager = document.getElementById("pager");
  pager.replaceChildren();
  if (pages > 1) {
    const prev = el("button", {}, "‹ prev"); prev.disabled = page === 0;
    prev.addEventListener("click", () => { page--; render(); window.scrollTo(0, 0); });
    const next = el("button", {}, "next ›"); next.disabled = page >= pages - 1;
    next.addEventListener("click", () => { page++; render(); window.scrollTo(0, 0); });
    pager.append(prev, document.createTextNode(" page " + (page + 1) + "/" + pages + " "), next);
  }
  document.body.dataset.renderedCards = String(list.children.length);
}

setupFilters();
render();
</script>
</body>
</html>
"""
