// Attention explorer front end (anywidget ESM).
//
// Every combination of slider positions was computed in Python when the
// notebook ran and is stored in the widget state ("states"), so the controls
// respond on a static page with no kernel. With a kernel, moving a control also
// sends the selection to Python, which recomputes with the live model and
// answers through "live"; that answer is drawn when it arrives.
//
// Layout: panels are laid out for the width the explorer has (wrapping onto
// rows when the column is narrow) and redrawn when that width changes; the
// canvas is sized in CSS pixels to what is drawn (times devicePixelRatio for
// its backing store), so it is never stretched. What is drawn is exposed on the
// canvas as data attributes (label boxes, panels, colour bars, legends,
// layout) for the browser test.

const FONT = "sans-serif";
const TICK = 10;           // tick label size, px
const TITLE_H = 18;        // title line
const PAD = 6;             // around and between panels
const GAP = 16;            // between panels on a row
const SERIES = ["#1f77b4", "#e8463a", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

function colour(palette, v, vmin, vmax) {
  const t = Math.max(0, Math.min(1, vmax > vmin ? (v - vmin) / (vmax - vmin) : 0));
  return palette[Math.min(palette.length - 1, Math.floor(t * (palette.length - 1) + 0.5))];
}

let measurer = null;
function textWidth(text, size) {
  if (!measurer) measurer = document.createElement("canvas").getContext("2d");
  measurer.font = size + "px " + FONT;
  return measurer.measureText(String(text)).width;
}
const widest = (labels, size) => Math.max(0, ...labels.map((l) => textWidth(l, size)));

// Short numbers for ticks and colour bars: 0.25, 1.2e-3, 40.
function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1).replace("e+", "e");
  return String(+v.toPrecision(3));
}

// Smallest step from 1, 2, 5, 10, 20, ... (integer index ticks) covering `need` cells.
function niceStep(need) {
  let mag = 1;
  for (;;) {
    for (const m of [1, 2, 5]) if (m * mag >= need) return m * mag;
    mag *= 10;
  }
}

function niceTicks(lo, hi, n, integer) {
  const span = hi - lo || 1, raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) out.push(+t.toPrecision(6));
  return out;
}

const isNumeric = (labels) => labels.every((l) => /^[-+]?\d+(\.\d+)?$/.test(String(l).trim()));
const range = (n) => Array.from({ length: n }, (_, i) => String(i));

function fitTitle(text, width, size) {
  let t = String(text || "");
  if (textWidth(t, size) <= width) return t;
  while (t.length > 1 && textWidth(t + "…", size) > width) t = t.slice(0, -1);
  return t + "…";
}

// ------------------------------------------------------------------ heatmap

function heatmapLayout(p, avail, cap) {
  const rows = p.z.length, cols = rows ? p.z[0].length : 0;
  const rowLabels = p.rows || range(rows), colLabels = p.cols || range(cols);
  const ylab = p.ylabel ? 16 : 0;
  const labelW = ylab + widest(rowLabels, TICK) + 5;
  const finite = p.z.flat().filter(Number.isFinite);
  const vmin = p.vmin != null ? p.vmin : Math.min(0, ...finite);
  const vmax = p.vmax != null ? p.vmax : Math.max(vmin + 1e-12, ...finite);
  // ticks at both ends (marked when values lie beyond them: clipped) and 0 or the middle
  const zmax = p.zmax != null ? p.zmax : Math.max(...finite), zmin = p.zmin != null ? p.zmin : Math.min(...finite);
  const mid = vmin < 0 && vmax > 0 ? 0 : (vmin + vmax) / 2;
  const cbTicks = [(zmin < vmin - 1e-9 ? "≤ " : "") + fmt(vmin), fmt(mid), (zmax > vmax + 1e-9 ? "≥ " : "") + fmt(vmax)];
  const cbPos = [0, (mid - vmin) / (vmax - vmin), 1];
  // per state: the Panel said scale="state", or a state stored before fixed scales (vmax null)
  const perState = p.vmax == null || p.vmax_from === "state";
  const cbNote = [p.unit || "", perState ? "scaled per state" : ""].filter(Boolean).join(", ");
  const cbW = 10 + 10 + 3 + widest(cbTicks, TICK) + (cbNote ? 16 : 2);
  const room = Math.min(cap, avail - labelW - cbW - 2);
  const cell = Math.max(2, Math.min(26, Math.floor(room / Math.max(rows, cols, 1))));
  const gridW = cols * cell, gridH = rows * cell;
  // column ticks: index labels thinned to a nice step; word labels rotated (then thinned only if a
  // rotated label is still taller than a cell is wide)
  const words = !isNumeric(colLabels);
  const colW = widest(colLabels, TICK);
  let rotate = false, colStep = 1;
  if (words) {
    if (colW + 4 > cell) { rotate = true; colStep = Math.ceil((TICK + 1) / cell); }
  } else colStep = niceStep(Math.ceil((colW + 4) / cell));
  const rowStep = isNumeric(rowLabels) ? niceStep(Math.ceil((TICK + 1) / cell)) : Math.ceil((TICK + 1) / cell);
  const tickH = rotate ? colW + 6 : TICK + 6;
  const barH = Math.max(gridH, 48);
  const w = Math.max(labelW + gridW + cbW, Math.min(avail, labelW + textWidth(p.title || "", 12) + 2));
  const h = TITLE_H + barH + tickH + (p.xlabel ? 16 : 2);
  return { rows, cols, rowLabels, colLabels, labelW, cell, gridW, gridH, cbW, cbTicks, cbNote, perState, vmax, rotate,
           colStep, rowStep, tickH, barH, w, h, vmin, cbPos };
}

function drawHeatmap(ctx, p, g, palette, out) {
  const gx = g.labelW, gy = TITLE_H;
  ctx.fillStyle = "#222"; ctx.font = "12px " + FONT; ctx.textAlign = "left";
  ctx.fillText(fitTitle(p.title, g.w - gx, 12), gx, 13);
  for (let i = 0; i < g.rows; i++) {
    for (let j = 0; j < g.cols; j++) {
      ctx.fillStyle = colour(palette, p.z[i][j], g.vmin, g.vmax);
      ctx.fillRect(gx + j * g.cell, gy + i * g.cell, g.cell, g.cell);
    }
  }
  if (p.highlight_row != null) {
    ctx.strokeStyle = "#e8463a"; ctx.lineWidth = 2;
    ctx.strokeRect(gx + 1, gy + p.highlight_row * g.cell + 1, g.gridW - 2, g.cell - 2);
  }
  ctx.fillStyle = "#444"; ctx.font = TICK + "px " + FONT;
  // row ticks
  ctx.textAlign = "right";
  g.rowLabels.forEach((r, i) => {
    if (i % g.rowStep) return;
    const y = gy + (i + 0.5) * g.cell + TICK * 0.35, w = ctx.measureText(String(r)).width;
    ctx.fillText(String(r), gx - 3, y);
    out.boxes.push({ axis: "row", x: gx - 3 - w, y: y - TICK * 0.8, w, h: TICK });
  });
  // column ticks
  const ty = gy + g.gridH + 3;
  g.colLabels.forEach((c, j) => {
    if (j % g.colStep) return;
    const cx = gx + (j + 0.5) * g.cell, w = ctx.measureText(String(c)).width;
    if (g.rotate) {
      ctx.save(); ctx.translate(cx + TICK * 0.35, ty); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "right"; ctx.fillText(String(c), 0, 0); ctx.restore();
      out.boxes.push({ axis: "col", x: cx - TICK * 0.45, y: ty, w: TICK * 0.9, h: w });
    } else {
      ctx.textAlign = "center"; ctx.fillText(String(c), cx, ty + TICK);
      out.boxes.push({ axis: "col", x: cx - w / 2, y: ty + 1, w, h: TICK });
    }
  });
  // axis names
  ctx.font = "11px " + FONT; ctx.fillStyle = "#222"; ctx.textAlign = "center";
  if (p.xlabel) ctx.fillText(p.xlabel, gx + g.gridW / 2, ty + g.tickH + 10);
  if (p.ylabel) {
    ctx.save(); ctx.translate(10, gy + g.gridH / 2); ctx.rotate(-Math.PI / 2);
    ctx.fillText(fitTitle(p.ylabel, Math.max(g.barH, 40), 11), 0, 0); ctx.restore();
  }
  // colour bar: 0 at the bottom, vmax at the top
  const bx = gx + g.gridW + 10, bw = 10, by = gy, bh = g.barH;
  for (let k = 0; k < bh; k++) {
    ctx.fillStyle = colour(palette, g.vmin + (1 - (k + 0.5) / bh) * (g.vmax - g.vmin), g.vmin, g.vmax);
    ctx.fillRect(bx, by + k, bw, 1.5);
  }
  ctx.strokeStyle = "#888"; ctx.lineWidth = 0.5; ctx.strokeRect(bx, by, bw, bh);
  ctx.fillStyle = "#444"; ctx.font = TICK + "px " + FONT; ctx.textAlign = "left";
  g.cbTicks.forEach((t, k) => {
    if (k === 1 && Math.min(g.cbPos[1], 1 - g.cbPos[1]) * bh < TICK + 2) return;  // too close to an end
    const y = by + bh - g.cbPos[k] * bh, w = ctx.measureText(t).width;
    const ty2 = Math.min(by + bh, Math.max(by + TICK * 0.8, y + TICK * 0.35));
    ctx.fillText(t, bx + bw + 3, ty2);
    out.boxes.push({ axis: "cbar", x: bx + bw + 3, y: ty2 - TICK * 0.8, w, h: TICK });
  });
  if (g.cbNote) {
    ctx.save(); ctx.translate(bx + g.cbW - 14, by + bh / 2); ctx.rotate(Math.PI / 2);
    ctx.textAlign = "center"; ctx.font = "10px " + FONT; ctx.fillStyle = "#555";
    ctx.fillText(fitTitle(g.cbNote, bh, 10), 0, 0); ctx.restore();
  }
  out.colorbar = { x: bx, y: by, w: bw, h: bh, vmin: g.vmin, vmax: g.vmax, unit: p.unit || "",
                   scale: g.perState ? "scaled per state" : "fixed", note: g.cbNote };
}

// ------------------------------------------------------------------ curves

function curvesLayout(p, avail) {
  return { w: Math.max(160, Math.min(380, avail)), h: 250 };
}

function drawCurves(ctx, p, g, out) {
  const left = p.ylabel ? 62 : 48, top = 20, w = g.w - left - 8, h = g.h - 60;
  const ys = Object.values(p.series).flat().concat(...Object.values(p.points || {}).map((q) => q[1]));
  const xs = p.x.concat(...Object.values(p.points || {}).map((q) => q[0]));
  let [ylo, yhi] = p.ylim || [Math.min(...ys), Math.max(...ys)];
  if (ylo === yhi) { ylo -= 1; yhi += 1; }
  const xlo = Math.min(...xs), xhi = Math.max(...xs) === xlo ? xlo + 1 : Math.max(...xs);
  const integer = xs.every(Number.isInteger);
  const X = (v) => left + ((v - xlo) / (xhi - xlo)) * w, Y = (v) => top + h - ((v - ylo) / (yhi - ylo)) * h;
  ctx.fillStyle = "#222"; ctx.font = "12px " + FONT; ctx.textAlign = "left";
  ctx.fillText(fitTitle(p.title, g.w - left, 12), left, 13);
  ctx.strokeStyle = "#888"; ctx.lineWidth = 1; ctx.strokeRect(left, top, w, h);
  ctx.font = TICK + "px " + FONT; ctx.fillStyle = "#444"; ctx.textAlign = "center";
  const xt = niceTicks(xlo, xhi, Math.max(2, Math.min(6, Math.floor(w / 60))), integer);
  const xl = xt.map(fmt), xw = widest(xl, TICK);
  const xstep = Math.max(1, Math.ceil((xw + 6) / Math.max(w / Math.max(xt.length, 1), 1e-6)));
  xt.forEach((t, i) => {
    if (i % xstep) return;
    const wd = ctx.measureText(xl[i]).width;
    ctx.fillText(xl[i], X(t), top + h + 12);
    out.boxes.push({ axis: "col", x: X(t) - wd / 2, y: top + h + 4, w: wd, h: 10 });
  });
  ctx.textAlign = "right";
  const yt = niceTicks(ylo, yhi, 4, false), ylw = widest(yt.map(fmt), TICK);
  yt.forEach((t) => {
    const s = fmt(t), wd = ctx.measureText(s).width;
    ctx.fillText(s, left - 3, Y(t) + 3);
    out.boxes.push({ axis: "row", x: left - 3 - wd, y: Y(t) - 5, w: wd, h: 10 });
  });
  out.xticks = xt;
  ctx.textAlign = "center"; ctx.font = "11px " + FONT; ctx.fillStyle = "#222";
  ctx.fillText(p.xlabel || "", left + w / 2, top + h + 28);
  if (p.ylabel) {  // the axis name just left of the tick labels, not at the panel's edge
    ctx.save(); ctx.translate(Math.max(10, left - ylw - 10), top + h / 2); ctx.rotate(-Math.PI / 2);
    ctx.fillText(fitTitle(p.ylabel, h, 11), 0, 0); ctx.restore();
  }
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
  ctx.font = TICK + "px " + FONT; ctx.textAlign = "left";
  legend.forEach(([name, c], i) => {
    ctx.fillStyle = c; ctx.fillRect(left + 6, top + 6 + i * 13, 10, 3);
    ctx.fillStyle = "#222"; ctx.fillText(name, left + 20, top + 10 + i * 13);
  });
}

// ------------------------------------------------------------------ graph

function graphLayout(p, avail) {
  const side = Math.max(160, Math.min(320, avail));
  const lg = p.legend || {};
  const legendH = (lg.node_label ? 18 : 0) + (lg.edge_label ? 18 : 0);
  return { w: side, h: side + legendH, side, legendH };
}

function drawGraph(ctx, p, g, palette, out) {
  const left = 10, top = 22, w = g.w - 20, h = g.side - 30;
  const xs = p.pos.map((q) => q[0]), ys = p.pos.map((q) => q[1]);
  const [xlo, xhi, ylo, yhi] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const X = (v) => left + 8 + ((v - xlo) / (xhi - xlo || 1)) * (w - 16);
  const Y = (v) => top + 8 + ((v - ylo) / (yhi - ylo || 1)) * (h - 16);
  ctx.fillStyle = "#222"; ctx.font = "12px " + FONT; ctx.textAlign = "left";
  ctx.fillText(fitTitle(p.title, g.w - left, 12), left, 13);
  const edgeStyle = (wt) => [p.edge_weight ? "rgba(232,70,58," + Math.min(1, 0.15 + wt) + ")" : "rgba(120,120,120,0.25)",
                             p.edge_weight ? 0.5 + 5 * wt : 0.7];
  const [src, dst] = p.edges;
  src.forEach((a, e) => {
    const wt = p.edge_weight ? p.edge_weight[e] : 0.15;
    if (wt <= 0) return;
    [ctx.strokeStyle, ctx.lineWidth] = edgeStyle(wt);
    ctx.beginPath(); ctx.moveTo(X(p.pos[a][0]), Y(p.pos[a][1])); ctx.lineTo(X(p.pos[dst[e]][0]), Y(p.pos[dst[e]][1])); ctx.stroke();
  });
  p.pos.forEach((q, i) => {
    ctx.fillStyle = p.node_value ? colour(palette, p.node_value[i], 0, 1) : "#bbbbbb";
    ctx.beginPath(); ctx.arc(X(q[0]), Y(q[1]), 4.5, 0, 2 * Math.PI); ctx.fill();
    if (i === p.highlight) {
      ctx.strokeStyle = "#e8463a"; ctx.lineWidth = 2.5;
      ctx.beginPath(); ctx.arc(X(q[0]), Y(q[1]), 8, 0, 2 * Math.PI); ctx.stroke();
    }
  });
  // legend under the graph: node colours, then edge widths
  const lg = p.legend || {};
  let y = g.side + 4;
  ctx.font = TICK + "px " + FONT; ctx.textAlign = "left";
  out.legend = [];
  if (lg.node_label) {
    ctx.fillStyle = "#222"; ctx.fillText(lg.node_label + ":", left, y + 8);
    let x = left + ctx.measureText(lg.node_label + ":").width + 8;
    if (lg.nodes) {
      lg.nodes.forEach(([name, v]) => {
        ctx.fillStyle = colour(palette, v, 0, 1); ctx.beginPath(); ctx.arc(x + 4, y + 4.5, 4.5, 0, 2 * Math.PI); ctx.fill();
        ctx.fillStyle = "#222"; ctx.fillText(name, x + 11, y + 8);
        x += 11 + ctx.measureText(name).width + 8;
      });
    } else {
      ctx.fillText("0", x, y + 8); x += ctx.measureText("0").width + 3;
      for (let k = 0; k < 60; k++) { ctx.fillStyle = colour(palette, k / 59, 0, 1); ctx.fillRect(x + k, y, 1.5, 9); }
      ctx.fillStyle = "#222"; ctx.fillText("1", x + 63, y + 8);
    }
    out.legend.push("nodes");
    y += 18;
  }
  if (lg.edge_label) {
    ctx.fillStyle = "#222"; ctx.fillText(lg.edge_label + ":", left, y + 8);
    let x = left + ctx.measureText(lg.edge_label + ":").width + 8;
    [0.25, 0.5, 1].forEach((v) => {
      [ctx.strokeStyle, ctx.lineWidth] = edgeStyle(v);
      ctx.beginPath(); ctx.moveTo(x, y + 4.5); ctx.lineTo(x + 18, y + 4.5); ctx.stroke();
      ctx.fillStyle = "#222"; ctx.fillText(fmt(v), x + 22, y + 8);
      x += 22 + ctx.measureText(fmt(v)).width + 10;
    });
    out.legend.push("edges");
  }
}

// ------------------------------------------------------------------ layout

function layoutPanel(p, avail, cap) {
  if (p.kind === "curves") return curvesLayout(p, avail);
  if (p.kind === "graph") return graphLayout(p, avail);
  return heatmapLayout(p, avail, cap);
}

// Heatmap grids are at most CAPS[0] px; smaller ones are tried when that keeps more panels on a row.
const CAPS = [300, 250, 210, 180, 150];

// Panels left to right, wrapping onto a new row when the next one would pass the available width;
// the largest heatmap size that needs the fewest rows wins.
function layout(panels, avail) {
  let best = null;
  for (const cap of CAPS) {
    const L = layoutAt(panels, avail, cap);
    if (!best || L.nrows < best.nrows) best = L;
  }
  return best;
}

function layoutAt(panels, avail, cap) {
  const inner = Math.max(120, avail - 2 * PAD);
  const sizes = panels.map((p) => layoutPanel(p, inner, cap));
  const rows = [];
  let row = null;
  sizes.forEach((s, k) => {
    if (!row || row.w + GAP + s.w > inner) { row = { items: [], w: -GAP, h: 0 }; rows.push(row); }
    row.items.push(k); row.w += GAP + s.w; row.h = Math.max(row.h, s.h);
  });
  const place = [];
  let y = PAD;
  rows.forEach((r) => {
    let x = PAD;
    r.items.forEach((k) => { place[k] = { x, y }; x += sizes[k].w + GAP; });
    y += r.h + GAP;
  });
  const W = Math.max(40, ...rows.map((r) => r.w)) + 2 * PAD, H = Math.max(40, y - GAP + PAD);
  // a single panel wider than the column even at its smallest: scale the whole drawing down uniformly
  const scale = Math.min(1, avail / W);
  return { sizes, place, W, H, scale, nrows: rows.length };
}

function drawPanels(canvas, panels, palette, avail) {
  const t0 = performance.now();
  const L = layout(panels, avail);
  const ratio = window.devicePixelRatio || 1;
  const cssW = Math.floor(L.W * L.scale), cssH = Math.floor(L.H * L.scale);
  canvas.width = Math.round(cssW * ratio); canvas.height = Math.round(cssH * ratio);
  canvas.style.width = cssW + "px"; canvas.style.height = cssH + "px";
  const ctx = canvas.getContext("2d");
  const k = Math.min(canvas.width / L.W, canvas.height / L.H);  // = ratio * scale, up to rounding
  ctx.setTransform(k, 0, 0, k, 0, 0);
  ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, L.W, L.H);
  const boxes = [], info = [], bars = [], legends = [];
  panels.forEach((p, k) => {
    const g = L.sizes[k], { x, y } = L.place[k], out = { boxes: [] };
    ctx.save(); ctx.translate(x, y);
    const kind = p.kind || "heatmap";
    if (kind === "curves") drawCurves(ctx, p, g, out);
    else if (kind === "graph") drawGraph(ctx, p, g, palette, out);
    else drawHeatmap(ctx, p, g, palette, out);
    ctx.restore();
    out.boxes.forEach((b) => boxes.push({ panel: k, ...b, x: b.x + x, y: b.y + y }));
    info.push([k, kind, x, y, +g.w.toFixed(1), +g.h.toFixed(1)].concat(kind === "curves" ? [out.xticks] : []));
    if (out.colorbar) {
      const c = out.colorbar;
      bars.push([k, +c.vmin.toPrecision(4), +c.vmax.toPrecision(4), c.unit, c.scale, +(c.x + x).toFixed(1), +(c.y + y).toFixed(1), c.w, +c.h.toFixed(1)]);
    }
    if (out.legend) out.legend.forEach((what) => legends.push([k, what]));
  });
  const r1 = (v) => +v.toFixed(1);
  // what was drawn, in canvas CSS pixels before any scale-down: the browser test reads these
  canvas.dataset.labelBoxes = JSON.stringify(boxes.map((b) => [b.panel, b.axis, r1(b.x), r1(b.y), r1(b.w), r1(b.h)]));
  canvas.dataset.panels = JSON.stringify(info);
  canvas.dataset.colorbars = JSON.stringify(bars);
  canvas.dataset.legends = JSON.stringify(legends);
  canvas.dataset.layout = JSON.stringify({ avail: r1(avail), width: cssW, height: cssH, rows: L.nrows, scale: +L.scale.toFixed(3), dpr: ratio });
  canvas.dataset.drawMs = (performance.now() - t0).toFixed(2);
}

// ------------------------------------------------------------------ controls

let uid = 0;

// One control per slider: a range slider, a two-position toggle (radio buttons) or a dropdown.
// Each reports its new position through onChange(i); set(i) moves it from outside.
function makeControl(spec, position, onChange) {
  const row = document.createElement("div");
  row.className = "attn-explorer-row";
  row.dataset.control = spec.name;
  row.dataset.kind = spec.kind || "slider";
  row.dataset.count = String(spec.labels.length);
  const name = document.createElement("span");
  name.className = "attn-explorer-name";
  name.textContent = spec.label;
  name.id = "attn-explorer-" + ++uid;
  row.appendChild(name);
  let readout = null;
  const kind = row.dataset.kind;
  if (kind === "toggle") {
    const group = document.createElement("div");
    group.className = "attn-explorer-toggle";
    group.setAttribute("role", "radiogroup");
    group.setAttribute("aria-labelledby", name.id);
    const radios = spec.labels.map((text, i) => {
      const lab = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = "attn-explorer-" + uid; input.value = String(i);
      input.className = "attn-explorer-input";
      input.checked = i === position;
      input.addEventListener("change", () => { if (input.checked) onChange(i); });
      const span = document.createElement("span");
      span.textContent = text;
      lab.append(input, span);
      group.appendChild(lab);
      return input;
    });
    row.appendChild(group);
    row.set = (i) => { radios[i].checked = true; };
  } else if (kind === "dropdown") {
    const select = document.createElement("select");
    select.className = "attn-explorer-input";
    select.setAttribute("aria-labelledby", name.id);
    spec.labels.forEach((text, i) => {
      const opt = document.createElement("option");
      opt.value = String(i); opt.textContent = text;
      select.appendChild(opt);
    });
    select.value = String(position);
    const changed = () => onChange(parseInt(select.value, 10));
    select.addEventListener("change", changed);
    select.addEventListener("input", changed);
    row.appendChild(select);
    row.set = (i) => { select.value = String(i); };
  } else {
    const input = document.createElement("input");
    input.type = "range"; input.min = "0"; input.max = String(spec.labels.length - 1); input.step = "1";
    input.value = String(position);
    input.className = "attn-explorer-input";
    input.setAttribute("aria-labelledby", name.id);
    readout = document.createElement("output");
    readout.className = "attn-explorer-value";
    input.addEventListener("input", () => onChange(parseInt(input.value, 10)));
    row.append(input, readout);
    row.set = (i) => { input.value = String(i); };
  }
  row.show = (i) => {
    row.dataset.position = String(i);
    if (readout) readout.textContent = spec.labels[i];
  };
  row.show(position);
  return row;
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
  const selection = model.get("selection").slice();
  const rows = [];
  let shown = null, drawnAt = -1, pending = 0;

  const key = (sel) => sel.join("-");
  const width = () => root.clientWidth || (el.clientWidth || 0) || 720;

  function draw(state, source) {
    if (!state) return;
    shown = state;
    drawnAt = width();
    drawPanels(canvas, state.panels, model.get("palette"), drawnAt);
    caption.textContent = state.caption || "";
    canvas.setAttribute("aria-label", state.caption || "attention weights");
    root.dataset.key = state.key;
    root.dataset.source = source;
  }

  function update() {
    rows.forEach((r, i) => r.show(selection[i]));
    draw(model.get("states")[key(selection)], "stored");
    try {
      model.set("selection", selection.slice());
      model.save_changes();
    } catch (err) {
      // static page: no kernel to talk to; the stored state is already drawn
    }
  }

  specs.forEach((s, i) => {
    const row = makeControl(s, selection[i], (v) => { selection[i] = v; update(); });
    rows.push(row);
    controls.appendChild(row);
  });

  title.textContent = model.get("title");
  model.on("change:live", () => {
    const live = model.get("live");
    if (live && live.key === key(selection)) draw(live, "kernel");
  });
  draw(model.get("states")[key(selection)], "stored");

  // redraw for the new width when the column changes (window resize, sidebar folded, phone rotated)
  if (typeof ResizeObserver !== "undefined") {
    const ro = new ResizeObserver(() => {
      if (pending) return;
      pending = requestAnimationFrame(() => {
        pending = 0;
        if (shown && Math.abs(width() - drawnAt) >= 1) draw(shown, root.dataset.source || "stored");
      });
    });
    ro.observe(root);
    return () => ro.disconnect();
  }
}

export default { render };
