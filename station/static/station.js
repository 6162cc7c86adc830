// grad-edge station: the page's only script, written for this package (no CDN, no library).
// 1. [data-refresh]: the line view reloads its fragment every data-every-ms.
// 2. The defect page: heatmap on/off, the region's box drawn over the picture.
// 3. The ROI page: drag a rectangle on the frame; its corners go in frame pixels.
// 4. The shift report: the what-if slider recounts from the stored scores.
"use strict";

function refreshLoop(el) {
  const every = parseInt(el.dataset.everyMs || "1000", 10);
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(el.dataset.refresh, {cache: "no-store"});
      if (r.ok) {
        el.innerHTML = await r.text();
        el.dataset.refreshedAt = String(Date.now());
      }
    } catch (e) { /* the line may be restarting: try again next tick */ }
    busy = false;
  }, every);
}

// An SVG laid over an <img>, in the image's own pixels (viewBox = natural size).
function fitOverlay(img, svg) {
  const w = img.naturalWidth, h = img.naturalHeight;
  if (!w || !h) return false;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  return true;
}

function defectPage() {
  const img = document.getElementById("picture");
  const box = document.getElementById("box");
  const holder = document.getElementById("framebox");
  const heat = document.getElementById("show-heatmap");
  const showBox = document.getElementById("show-box");
  if (!img || !holder) return;
  if (heat) heat.addEventListener("change", () => {
    img.src = heat.checked ? holder.dataset.heatmap : holder.dataset.frame;
  });
  if (!box) return;
  const draw = () => {
    if (!fitOverlay(img, box)) return;
    const [x0, y0, x1, y1] = box.dataset.box.split(",").map(Number);
    const rect = box.querySelector("rect");
    rect.setAttribute("x", x0); rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0); rect.setAttribute("height", y1 - y0);
  };
  img.addEventListener("load", draw);
  if (img.complete) draw();
  if (showBox) showBox.addEventListener("change", () => {
    box.style.display = showBox.checked ? "" : "none";
  });
}

function roiPage() {
  const img = document.getElementById("roi-image");
  const svg = document.getElementById("roi-svg");
  const rect = document.getElementById("roi-rect");
  if (!img || !svg) return;
  let start = null;
  const toFrame = (ev) => {
    const r = img.getBoundingClientRect();
    const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width);
    const y = Math.min(Math.max(ev.clientY - r.top, 0), r.height);
    return [Math.round(x * img.naturalWidth / r.width), Math.round(y * img.naturalHeight / r.height)];
  };
  const show = (a, b) => {
    const x0 = Math.min(a[0], b[0]), y0 = Math.min(a[1], b[1]);
    const x1 = Math.max(a[0], b[0]), y1 = Math.max(a[1], b[1]);
    rect.setAttribute("x", x0); rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0); rect.setAttribute("height", y1 - y0);
    for (const [id, v] of [["x0", x0], ["y0", y0], ["x1", x1], ["y1", y1]]) {
      document.getElementById(id).value = v;
    }
    document.getElementById("roi-text").textContent = `[${x0}, ${y0}, ${x1}, ${y1}]`;
  };
  const ready = () => fitOverlay(img, svg);
  img.addEventListener("load", ready);
  if (img.complete) ready();
  svg.addEventListener("mousedown", (ev) => { start = toFrame(ev); ev.preventDefault(); });
  svg.addEventListener("mousemove", (ev) => { if (start) show(start, toFrame(ev)); });
  window.addEventListener("mouseup", (ev) => { if (start) { show(start, toFrame(ev)); start = null; } });
}

function reportPage() {
  for (const slider of document.querySelectorAll(".whatif-slider")) {
    const section = slider.closest("section");
    const out = section.querySelector(".whatif-value");
    const result = section.querySelector(".whatif-result");
    const hist = section.querySelector("svg.hist");
    const line = hist.querySelector(".whatif");
    let timer = null;
    slider.addEventListener("input", () => {
      const t = parseFloat(slider.value);
      out.textContent = t.toPrecision(4);
      const lo = parseFloat(hist.dataset.lo), hi = parseFloat(hist.dataset.hi);
      const x = hist.width.baseVal.value * (t - lo) / (hi - lo);
      line.setAttribute("x1", x); line.setAttribute("x2", x);
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const q = new URLSearchParams(slider.dataset.query);
        q.set("t", String(t)); q.set("source", slider.dataset.source);
        const r = await fetch("/api/whatif?" + q.toString());
        const data = await r.json();
        const s = data.sources && data.sources[slider.dataset.source];
        if (!s) { result.textContent = data.error || "no scores"; return; }
        let text = `${s.flagged} of ${s.frames} frames at or above ${t.toPrecision(4)}`;
        if (s.defective !== undefined) {
          text += `; defective parts found ${s.defective_found} of ${s.defective}` +
                  `, good parts flagged ${s.good_flagged} of ${s.good}`;
        }
        text += `; frames marked false positive still flagged: ${s.false_positives_still_flagged}`;
        result.textContent = text;
      }, 150);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll("[data-refresh]")) refreshLoop(el);
  defectPage();
  roiPage();
  reportPage();
});
