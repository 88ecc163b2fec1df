/* camserve viewer: the dense tab (DenseScores).
 *
 * For one image, at one or several scales (a pyramid): the score map of every class
 * (colormap of the score, one cell per window position) and the arg-max class map (one color
 * per class) of the scale shown, and the detections over every scale: windows whose best score
 * reaches the threshold, greedy non-maximum suppression per class (IoU > 0.3), drawn on the
 * image with their boxes from the response (pixels of the image as sent).
 */
(function (CS) {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const MAP_SIZE = 128; // longer side of a class map, CSS pixels

  let ctx = null; // {modelSpec, display}
  let images = [];
  let last = null; // {image, grid}

  function color(i) {
    return PALETTE[i % PALETTE.length];
  }

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  /** DenseScoresResponse JSON -> one grid per scale: {scale, gh, gw, classes, scores
   * (gh*gw*C), boxes (gh*gw*4, in pixels of the image as sent), stride, window, ...}. */
  function parse(r) {
    const f = CS.heatmap.field;
    const scales = r.scales || [];
    if (!scales.length) throw new Error("the response has no scales");
    const strides = r.strides || [];
    return scales.map(function (level) {
      const scores = CS.heatmap.decodeFloatMap(level.scores);
      const boxes = CS.heatmap.decodeFloatMap(level.boxes);
      return {
        scale: level.scale || 0,
        gh: scores.shape[0],
        gw: scores.shape[1],
        classes: f(r, "classNames", "class_names", []),
        scores: scores.data,
        boxes: boxes.data,
        stride: r.stride || 0,
        strides: strides,
        window: r.window || [],
        exact: Boolean(r.exact),
        mode: r.mode || "",
      };
    });
  }

  function iou(a, b) {
    const ix = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
    const iy = Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
    const inter = ix * iy;
    const union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    return union > 0 ? inter / union : 0;
  }

  /** Arg-max class and score of every cell of one grid, and its windows scoring >= threshold. */
  function analyse(grid, threshold) {
    const C = grid.classes.length || grid.scores.length / (grid.gh * grid.gw);
    const cells = grid.gh * grid.gw;
    const argmax = new Int32Array(cells), best = new Float32Array(cells);
    const candidates = [];
    for (let i = 0; i < cells; i++) {
      let k = 0;
      for (let c = 1; c < C; c++) if (grid.scores[i * C + c] > grid.scores[i * C + k]) k = c;
      argmax[i] = k;
      best[i] = grid.scores[i * C + k];
      if (best[i] >= threshold) {
        candidates.push({ cls: k, score: best[i], scale: grid.scale, box: Array.from(grid.boxes.subarray(4 * i, 4 * i + 4)) });
      }
    }
    return { C: C, argmax: argmax, best: best, candidates: candidates };
  }

  /** Detections over every scale: candidates best first, greedy NMS per class (IoU > 0.3). */
  function detect(grids, threshold) {
    const candidates = [];
    grids.forEach((g) => analyse(g, threshold).candidates.forEach((c) => candidates.push(c)));
    candidates.sort((a, b) => b.score - a.score);
    const kept = [];
    candidates.forEach(function (d) {
      if (!kept.some((k) => k.cls === d.cls && iou(k.box, d.box) > 0.3)) kept.push(d);
    });
    return kept;
  }

  function canvasFor(h, w, longer) {
    const c = document.createElement("canvas");
    const s = longer / Math.max(h, w);
    c.height = Math.max(1, Math.round(h * s));
    c.width = Math.max(1, Math.round(w * s));
    return c;
  }

  /** Paint a gh x gw grid of RGB colors, nearest-neighbour, over the whole canvas. */
  function paintCells(canvas, gh, gw, rgbOf) {
    const small = document.createElement("canvas");
    small.width = gw;
    small.height = gh;
    const img = new ImageData(gw, gh);
    for (let i = 0; i < gh * gw; i++) {
      const rgb = rgbOf(i);
      img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
    }
    small.getContext("2d").putImageData(img, 0, 0);
    const g = canvas.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(small, 0, 0, canvas.width, canvas.height);
  }

  function cellHover(canvas, grid, readout, text) {
    canvas.addEventListener("mousemove", function (ev) {
      const rect = canvas.getBoundingClientRect();
      const gx = Math.min(grid.gw - 1, Math.floor(((ev.clientX - rect.left) / rect.width) * grid.gw));
      const gy = Math.min(grid.gh - 1, Math.floor(((ev.clientY - rect.top) / rect.height) * grid.gh));
      readout.textContent = text(gy * grid.gw + gx, gy, gx);
    });
  }

  function render() {
    const view = $("dense-view");
    view.textContent = "";
    if (!last) return;
    const level = Math.min(last.grids.length - 1, Math.max(0, Number($("dense-level").value) || 0));
    const grid = last.grids[level], image = last.image, el = CS.grid.el, fmt = CS.grid.formatScore;
    const threshold = Number($("dense-threshold").value);
    const a = analyse(grid, threshold);
    a.detections = detect(last.grids, threshold);
    let lo = Infinity, hi = -Infinity;
    grid.scores.forEach(function (v) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    });
    const unit = lo >= 0 && hi <= 1;
    const norm = unit ? (v) => v : (v) => (hi > lo ? (v - lo) / (hi - lo) : 0);
    $("dense-summary").textContent = "scale " + grid.scale + ": grid " + grid.gh + " x " + grid.gw + ", stride " +
      (grid.stride || grid.strides.join(" x ")) + " px, window " + grid.window.join(" x ") + " px, mode " +
      grid.mode + (grid.exact ? " (exact: equals the classifier on every crop)" : " (not exact: padding before the head)") +
      (unit ? "" : "; class maps scaled from [" + fmt(lo) + ", " + fmt(hi) + "] to the colormap");

    // detections on the image
    const H = image.height || 1, W = image.width || 1;
    const det = canvasFor(H, W, 256);
    det.className = "dense-detections";
    const g = det.getContext("2d");
    if (image.source) g.drawImage(image.source, 0, 0, det.width, det.height);
    const sx = det.width / W, sy = det.height / H;
    g.lineWidth = 2;
    g.font = "12px sans-serif";
    const list = el("ol", "detections");
    list.id = "detections";
    a.detections.forEach(function (d) {
      const name = grid.classes[d.cls] || String(d.cls);
      g.strokeStyle = color(d.cls);
      g.strokeRect(d.box[0] * sx, d.box[1] * sy, (d.box[2] - d.box[0]) * sx, (d.box[3] - d.box[1]) * sy);
      g.fillStyle = color(d.cls);
      g.fillText(name + " " + fmt(d.score), d.box[0] * sx + 3, d.box[1] * sy + 13);
      const where = " [" + d.box.map(Math.round).join(", ") + "]" + (last.grids.length > 1 ? " at scale " + d.scale : "");
      const item = el("li", "detection", name + " " + fmt(d.score) + where);
      item.dataset.classIndex = String(d.cls);
      list.appendChild(item);
    });
    const detBox = el("figure", "dense-figure");
    detBox.appendChild(det);
    const scope = last.grids.length > 1 ? " over " + last.grids.length + " scales" : "";
    detBox.appendChild(el("figcaption", "", a.detections.length + " detections at score >= " + threshold + scope));
    detBox.appendChild(list);
    view.appendChild(detBox);

    // arg-max class map
    const am = canvasFor(grid.gh, grid.gw, 256);
    am.className = "dense-argmax";
    paintCells(am, grid.gh, grid.gw, (i) => hexToRgb(color(a.argmax[i])));
    const amBox = el("figure", "dense-figure");
    amBox.appendChild(am);
    const amRead = el("figcaption", "readout", "arg-max class per window");
    cellHover(am, grid, amRead, (i, y, x) => "cell (" + y + ", " + x + "): " + (grid.classes[a.argmax[i]] || a.argmax[i]) + " " + fmt(a.best[i]));
    amBox.appendChild(amRead);
    const legend = el("div", "legend");
    for (let c = 0; c < a.C; c++) {
      const swatch = el("span", "swatch");
      swatch.style.backgroundColor = color(c);
      const entry = el("span", "legend-entry");
      entry.appendChild(swatch);
      entry.appendChild(document.createTextNode(grid.classes[c] || String(c)));
      legend.appendChild(entry);
    }
    amBox.appendChild(legend);
    view.appendChild(amBox);

    // one score map per class
    const lut = CS.colormaps.lut(ctx.display.colormap);
    const maps = el("div", "dense-classes");
    for (let c = 0; c < a.C; c++) {
      const cv = canvasFor(grid.gh, grid.gw, MAP_SIZE);
      cv.className = "dense-class";
      cv.dataset.classIndex = String(c);
      let max = -Infinity;
      paintCells(cv, grid.gh, grid.gw, function (i) {
        const v = grid.scores[i * a.C + c];
        max = Math.max(max, v);
        const k = 3 * CS.colormaps.index(norm(v));
        return [lut[k], lut[k + 1], lut[k + 2]];
      });
      const fig = el("figure", "dense-figure");
      fig.appendChild(cv);
      const name = grid.classes[c] || String(c);
      const read = el("figcaption", "readout", name + " (max " + fmt(max) + ")");
      cellHover(cv, grid, read, (i, y, x) => name + " at (" + y + ", " + x + "): " + fmt(grid.scores[i * a.C + c]));
      fig.appendChild(read);
      maps.appendChild(fig);
    }
    view.appendChild(maps);
  }

  async function run() {
    const image = images.find((i) => String(i.id) === $("dense-image").value);
    if (!image) {
      CS.showError("dense scores: add an image first");
      return;
    }
    const request = { model: ctx.modelSpec(), image: { encoded: image.b64 }, mode: $("dense-mode").value };
    const scales = $("dense-scales").value.split(",").map((x) => x.trim()).filter((x) => x !== "").map(Number);
    if (scales.some((x) => !(x > 0))) {
      CS.showError("dense scores: scales must be positive numbers separated by commas, e.g. 1, 0.5");
      return;
    }
    if (scales.length) request.scales = scales;
    const stride = parseInt($("dense-stride").value, 10);
    if (stride > 0) request.stride = stride;
    $("dense-summary").textContent = "working...";
    try {
      const r = await CS.api.call("DenseScores", request);
      last = { image: image, grids: parse(r) };
      const levels = $("dense-level");
      levels.textContent = "";
      last.grids.forEach(function (g, i) {
        const o = document.createElement("option");
        o.value = String(i);
        o.textContent = String(g.scale);
        levels.appendChild(o);
      });
      CS.showError("");
      render();
    } catch (e) {
      last = null;
      $("dense-view").textContent = "";
      $("dense-summary").textContent = "";
      CS.showError("dense scores for " + image.name + ": " + e.message);
    }
  }

  /** Refresh the image choice after the image list changed. */
  function setImages(list) {
    images = list;
    const select = $("dense-image");
    const keep = select.value;
    select.textContent = "";
    list.forEach(function (i) {
      const o = document.createElement("option");
      o.value = String(i.id);
      o.textContent = i.name;
      if (String(i.id) === keep) o.selected = true;
      select.appendChild(o);
    });
  }

  function wire(context) {
    ctx = context;
    $("dense-run").addEventListener("click", run);
    $("dense-level").addEventListener("change", render);
    $("dense-threshold").addEventListener("input", function () {
      $("dense-threshold-value").textContent = $("dense-threshold").value;
      render();
    });
  }

  CS.dense = { wire: wire, images: setImages, redraw: render, analyse: analyse, detect: detect, parse: parse };
})((window.CS = window.CS || {}));
