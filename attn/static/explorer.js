// Attention explorer front end (anywidget ESM).
//
// Every combination of slider positions was computed in Python when the
// notebook ran and is stored in the widget state ("states"), so the sliders
// respond on a static page with no kernel. With a kernel, moving a slider also
// sends the selection to Python, which recomputes with the live model and
// answers through "live"; that answer is drawn when it arrives.

function colour(palette, v, vmax) {
  const t = Math.max(0, Math.min(1, vmax > 0 ? v / vmax : 0));
  return palette[Math.min(palette.length - 1, Math.floor(t * (palette.length - 1) + 0.5))];
}

const SERIES = ["#1f77b4", "#e8463a", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

// Which of n labels to draw so that none overlaps: every step-th, where step
// keeps (label width + gap) <= step * spacing.
function thin(ctx, labels, spacing) {
  const widest = Math.max(0, ...labels.map((l) => ctx.measureText(String(l)).width));
  return Math.max(1, Math.ceil((widest + 4) / Math.max(spacing, 1e-6)));
}

function heatmapSize(p) {
  const maxPanel = 300, labelW = 46, labelH = 40, titleH = 18, pad = 6;
  const rows = p.z.length, cols = rows ? p.z[0].length : 0;
  const cell = Math.max(3, Math.min(26, Math.floor(maxPanel / Math.max(rows, cols, 1))));
  return { rows, cols, cell, w: labelW + cols * cell + pad, h: titleH + rows * cell + labelH };
}

function drawHeatmap(ctx, p, s, x0, palette, boxes) {
  const labelW = 46, titleH = 18;
  const vmax = p.vmax != null ? p.vmax : Math.max(1e-12, ...p.z.flat());
  ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "left";
  ctx.fillText(p.title || "", x0 + labelW, 13);
  const gx = x0 + labelW, gy = titleH;
  for (let i = 0; i < s.rows; i++) {
    for (let j = 0; j < s.cols; j++) {
      ctx.fillStyle = colour(palette, p.z[i][j], vmax);
      ctx.fillRect(gx + j * s.cell, gy + i * s.cell, s.cell, s.cell);
    }
  }
  if (p.highlight_row != null) {
    ctx.strokeStyle = "#e8463a"; ctx.lineWidth = 2;
    ctx.strokeRect(gx + 1, gy + p.highlight_row * s.cell + 1, s.cols * s.cell - 2, s.cell - 2);
  }
  const fs = Math.max(8, Math.min(11, s.cell));
  ctx.fillStyle = "#444"; ctx.font = fs + "px sans-serif";
  if (p.rows) {
    ctx.textAlign = "right";
    const step = Math.max(1, Math.ceil((fs + 2) / s.cell));  // row labels stack vertically
    p.rows.forEach((r, i) => {
      if (i % step) return;
      const y = gy + (i + 0.5) * s.cell + fs * 0.35, w = ctx.measureText(String(r)).width;
      ctx.fillText(String(r), gx - 3, y);
      boxes.push({ axis: "row", x: gx - 3 - w, y: y - fs * 0.8, w, h: fs });
    });
  }
  if (p.cols) {
    ctx.textAlign = "center";
    const step = thin(ctx, p.cols, s.cell);
    p.cols.forEach((c, j) => {
      if (j % step) return;
      const cx = gx + (j + 0.5) * s.cell, w = ctx.measureText(String(c)).width, y = gy + s.rows * s.cell + 12;
      ctx.fillText(String(c), cx, y);
      boxes.push({ axis: "col", x: cx - w / 2, y: y - fs * 0.8, w, h: fs });
    });
  }
  ctx.font = "11px sans-serif"; ctx.textAlign = "center";
  ctx.fillText(p.xlabel || "key", gx + (s.cols * s.cell) / 2, gy + s.rows * s.cell + 30);
}

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1, raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) out.push(+t.toPrecision(6));
  return out;
}

function drawCurves(ctx, p, s, x0, boxes) {
  const left = x0 + 48, top = 20, w = s.w - 60, h = s.h - 60;
  const ys = Object.values(p.series).flat().concat(...Object.values(p.points || {}).map((q) => q[1]));
  const xs = p.x.concat(...Object.values(p.points || {}).map((q) => q[0]));
  let [ylo, yhi] = p.ylim || [Math.min(...ys), Math.max(...ys)];
  if (ylo === yhi) { ylo -= 1; yhi += 1; }
  const xlo = Math.min(...xs), xhi = Math.max(...xs) === xlo ? xlo + 1 : Math.max(...xs);
  const X = (v) => left + ((v - xlo) / (xhi - xlo)) * w, Y = (v) => top + h - ((v - ylo) / (yhi - ylo)) * h;
  ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "left";
  ctx.fillText(p.title || "", left, 13);
  ctx.strokeStyle = "#888"; ctx.lineWidth = 1; ctx.strokeRect(left, top, w, h);
  ctx.font = "10px sans-serif"; ctx.fillStyle = "#444";
  ctx.textAlign = "center";
  const xt = niceTicks(xlo, xhi, 5), xstep = thin(ctx, xt.map(String), w / Math.max(xt.length, 1));
  xt.forEach((t, i) => {
    if (i % xstep) return;
    const wd = ctx.measureText(String(t)).width;
    ctx.fillText(String(t), X(t), top + h + 12);
    boxes.push({ axis: "col", x: X(t) - wd / 2, y: top + h + 4, w: wd, h: 10 });
  });
  ctx.textAlign = "right";
  niceTicks(ylo, yhi, 4).forEach((t) => {
    const wd = ctx.measureText(String(t)).width;
    ctx.fillText(String(t), left - 3, Y(t) + 3);
    boxes.push({ axis: "row", x: left - 3 - wd, y: Y(t) - 5, w: wd, h: 10 });
  });
  ctx.textAlign = "center"; ctx.font = "11px sans-serif";
  ctx.fillText(p.xlabel || "", left + w / 2, top + h + 28);
  ctx.save(); ctx.beginPath(); ctx.rect(left, top, w, h); ctx.clip();
  if (p.vline != null) {
    ctx.strokeStyle = "#e8463a"; ctx.setLineDash([4, 3]); ctx.beginPath();
    ctx.moveTo(X(p.vline), top); ctx.lineTo(X(p.vline), top + h); ctx.stroke(); ctx.setLineDash([]);
  }
  let k = 0;
  const legend = [];
  Object.entries(p.points || {}).forEach(([name, q]) => {
    const c = "#9a9a9a";
    ctx.fillStyle = c;
    q[0].forEach((xv, i) => { ctx.beginPath(); ctx.arc(X(xv), Y(q[1][i]), 2, 0, 2 * Math.PI); ctx.fill(); });
    legend.push([name, c]);
  });
  Object.entries(p.series).forEach(([name, y]) => {
    const c = SERIES[k++ % SERIES.length];
    ctx.strokeStyle = c; ctx.lineWidth = 2; ctx.beginPath();
    y.forEach((v, i) => (i ? ctx.lineTo(X(p.x[i]), Y(v)) : ctx.moveTo(X(p.x[i]), Y(v))));
    ctx.stroke();
    legend.push([name, c]);
  });
  ctx.restore();
  ctx.font = "10px sans-serif"; ctx.textAlign = "left";
  legend.forEach(([name, c], i) => {
    ctx.fillStyle = c; ctx.fillRect(left + 6, top + 6 + i * 13, 10, 3);
    ctx.fillStyle = "#222"; ctx.fillText(name, left + 20, top + 10 + i * 13);
  });
}

function drawGraph(ctx, p, s, x0, palette) {
  const left = x0 + 10, top = 22, w = s.w - 20, h = s.h - 30;
  const xs = p.pos.map((q) => q[0]), ys = p.pos.map((q) => q[1]);
  const [xlo, xhi, ylo, yhi] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const X = (v) => left + 8 + ((v - xlo) / (xhi - xlo || 1)) * (w - 16);
  const Y = (v) => top + 8 + ((v - ylo) / (yhi - ylo || 1)) * (h - 16);
  ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "left";
  ctx.fillText(p.title || "", left, 13);
  const [src, dst] = p.edges;
  src.forEach((a, e) => {
    const wt = p.edge_weight ? p.edge_weight[e] : 0.15;
    if (wt <= 0) return;
    ctx.strokeStyle = p.edge_weight ? "rgba(232,70,58," + Math.min(1, 0.15 + wt) + ")" : "rgba(120,120,120,0.25)";
    ctx.lineWidth = p.edge_weight ? 0.5 + 5 * wt : 0.7;
    ctx.beginPath(); ctx.moveTo(X(p.pos[a][0]), Y(p.pos[a][1])); ctx.lineTo(X(p.pos[dst[e]][0]), Y(p.pos[dst[e]][1])); ctx.stroke();
  });
  p.pos.forEach((q, i) => {
    ctx.fillStyle = p.node_value ? colour(palette, p.node_value[i], 1) : "#bbbbbb";
    ctx.beginPath(); ctx.arc(X(q[0]), Y(q[1]), 4.5, 0, 2 * Math.PI); ctx.fill();
    if (i === p.highlight) {
      ctx.strokeStyle = "#e8463a"; ctx.lineWidth = 2.5;
      ctx.beginPath(); ctx.arc(X(q[0]), Y(q[1]), 8, 0, 2 * Math.PI); ctx.stroke();
    }
  });
}

function panelSize(p) {
  if (p.kind === "curves") return { w: 380, h: 250 };
  if (p.kind === "graph") return { w: 320, h: 320 };
  return heatmapSize(p);
}

function drawPanels(canvas, panels, palette) {
  const ctx = canvas.getContext("2d");
  const pad = 6;
  const sizes = panels.map(panelSize);
  const W = sizes.reduce((a, s) => a + s.w, 0) + pad;
  const H = Math.max(...sizes.map((s) => s.h), 40) + pad;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = W * ratio; canvas.height = H * ratio;
  canvas.style.width = W + "px"; canvas.style.height = H + "px";
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, W, H);
  const boxes = [];
  let x0 = pad;
  panels.forEach((p, k) => {
    const s = sizes[k], mine = [];
    if (p.kind === "curves") drawCurves(ctx, p, s, x0, mine);
    else if (p.kind === "graph") drawGraph(ctx, p, s, x0, palette);
    else drawHeatmap(ctx, p, s, x0, palette, mine);
    mine.forEach((b) => boxes.push({ panel: k, ...b }));
    x0 += s.w;
  });
  // the drawn axis labels, in canvas pixels: the browser test checks that none overlap
  canvas.dataset.labelBoxes = JSON.stringify(boxes.map((b) => [b.panel, b.axis, +b.x.toFixed(1), +b.y.toFixed(1), +b.w.toFixed(1), +b.h.toFixed(1)]));
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "attn-explorer";
  const title = document.createElement("div");
  title.className = "attn-explorer-title";
  const controls = document.createElement("div");
  controls.className = "attn-explorer-controls";
  const canvas = document.createElement("canvas");
  canvas.className = "attn-explorer-canvas";
  canvas.setAttribute("role", "img");
  const caption = document.createElement("div");
  caption.className = "attn-explorer-caption";
  caption.setAttribute("aria-live", "polite");
  root.append(title, controls, canvas, caption);
  el.appendChild(root);

  const specs = model.get("controls");
  let selection = model.get("selection").slice();
  const readouts = [];

  function key(sel) { return sel.join("-"); }

  function draw(state, source) {
    if (!state) return;
    drawPanels(canvas, state.panels, model.get("palette"));
    caption.textContent = state.caption || "";
    canvas.setAttribute("aria-label", state.caption || "attention weights");
    root.dataset.key = state.key;
    root.dataset.source = source;
  }

  function update() {
    specs.forEach((s, i) => { readouts[i].textContent = s.labels[selection[i]]; });
    const k = key(selection);
    draw(model.get("states")[k], "stored");
    try {
      model.set("selection", selection.slice());
      model.save_changes();
    } catch (err) {
      // static page: no kernel to talk to; the stored state is already drawn
    }
  }

  specs.forEach((s, i) => {
    const row = document.createElement("label");
    row.className = "attn-explorer-row";
    const name = document.createElement("span");
    name.className = "attn-explorer-name";
    name.textContent = s.label;
    const input = document.createElement("input");
    input.type = "range"; input.min = "0"; input.max = String(s.labels.length - 1); input.step = "1";
    input.value = String(selection[i]);
    input.setAttribute("aria-label", s.label);
    input.dataset.control = s.name;
    const out = document.createElement("output");
    out.className = "attn-explorer-value";
    readouts.push(out);
    input.addEventListener("input", () => { selection[i] = parseInt(input.value, 10); update(); });
    row.append(name, input, out);
    controls.appendChild(row);
  });

  title.textContent = model.get("title");
  model.on("change:live", () => {
    const live = model.get("live");
    if (live && live.key === key(selection)) draw(live, "kernel");
  });
  specs.forEach((s, i) => { readouts[i].textContent = s.labels[selection[i]]; });
  draw(model.get("states")[key(selection)], "stored");
}

export default { render };
