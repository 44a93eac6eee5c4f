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

function drawPanels(canvas, panels, palette) {
  const ctx = canvas.getContext("2d");
  const pad = 6, labelW = 46, labelH = 40, titleH = 18, maxPanel = 300;
  const sizes = panels.map((p) => {
    const rows = p.z.length, cols = rows ? p.z[0].length : 0;
    const cell = Math.max(3, Math.min(26, Math.floor(maxPanel / Math.max(rows, cols, 1))));
    return { rows, cols, cell, w: labelW + cols * cell + pad, h: titleH + rows * cell + labelH };
  });
  const W = sizes.reduce((a, s) => a + s.w, 0) + pad;
  const H = Math.max(...sizes.map((s) => s.h), 40) + pad;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = W * ratio; canvas.height = H * ratio;
  canvas.style.width = W + "px"; canvas.style.height = H + "px";
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, W, H);
  let x0 = pad;
  panels.forEach((p, k) => {
    const s = sizes[k];
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
    ctx.fillStyle = "#444"; ctx.font = Math.min(11, s.cell) + "px sans-serif";
    if (p.rows && s.cell >= 8) {
      ctx.textAlign = "right";
      p.rows.forEach((r, i) => ctx.fillText(String(r), gx - 3, gy + (i + 0.75) * s.cell));
    }
    if (p.cols && s.cell >= 8) {
      ctx.textAlign = "center";
      p.cols.forEach((c, j) => ctx.fillText(String(c), gx + (j + 0.5) * s.cell, gy + s.rows * s.cell + 12));
    }
    ctx.font = "11px sans-serif"; ctx.textAlign = "center";
    ctx.fillText(p.xlabel || "key", gx + (s.cols * s.cell) / 2, gy + s.rows * s.cell + 30);
    x0 += s.w;
  });
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
