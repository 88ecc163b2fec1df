/* camserve viewer: the grid of images x methods.
 *
 * One row per image: its name, the top-k class chips with scores (a click re-targets the
 * row's explanations), then one cell per method with the heatmap drawn over the image on a
 * canvas. Hovering a cell shows the heatmap value under the cursor, the raw map's value (layer
 * resolution, not normalised) and the target's score.
 */
(function (CS) {
  "use strict";

  const DISPLAY = 192; // the longer side of a cell's canvas, in CSS pixels

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Canvas size for an image of (h, w): the longer side DISPLAY, aspect kept. */
  function displaySize(h, w) {
    const scale = DISPLAY / Math.max(h, w);
    return [Math.max(1, Math.round(h * scale)), Math.max(1, Math.round(w * scale))];
  }

  function formatScore(x) {
    return Number(x).toFixed(3);
  }

  /** Explanation JSON (protobuf mapping) -> {method, classIndex, label, score, heatmap, box}. */
  function explanation(json) {
    const f = CS.heatmap.field;
    return {
      method: f(json, "method", null, ""),
      classIndex: f(json, "classIndex", "class_index", 0),
      label: f(json, "label", null, ""),
      score: f(json, "score", null, 0),
      heatmap: CS.heatmap.decodeFloatMap(f(json, "heatmap", null, null)),
      raw: CS.heatmap.decodeFloatMap(f(json, "raw", null, null)),
      box: CS.heatmap.box(f(json, "box", null, null)),
    };
  }

  function chips(image, onChip) {
    const box = el("div", "chips");
    (image.top || []).forEach(function (c) {
      const chip = el("button", "chip", c.label + " " + formatScore(c.score));
      chip.type = "button";
      chip.dataset.classIndex = String(c.index);
      chip.dataset.score = String(c.score);
      chip.title = "explain class " + c.index + " (" + c.label + ")";
      if (c.index === image.target) chip.classList.add("selected");
      chip.addEventListener("click", function () {
        onChip(image, c.index);
      });
      box.appendChild(chip);
    });
    return box;
  }

  function rowHead(image, onChip) {
    const head = el("div", "row-head");
    head.appendChild(el("div", "name", image.name));
    if (image.width && image.height) head.appendChild(el("div", "muted", image.width + " x " + image.height + " px"));
    head.appendChild(chips(image, onChip));
    if (image.error) head.appendChild(el("div", "error row-error", image.error));
    else if (image.busy) head.appendChild(el("div", "muted busy", "working..."));
    return head;
  }

  function hover(canvas, readout, expl) {
    canvas.addEventListener("mousemove", function (ev) {
      const map = canvas.resizedMap;
      if (!map) return;
      const rect = canvas.getBoundingClientRect();
      const x = Math.min(canvas.width - 1, Math.max(0, Math.floor(((ev.clientX - rect.left) * canvas.width) / rect.width)));
      const y = Math.min(canvas.height - 1, Math.max(0, Math.floor(((ev.clientY - rect.top) * canvas.height) / rect.height)));
      const value = map.data[y * map.shape[1] + x];
      let text = "heatmap " + formatScore(value);
      if (expl.raw) {
        // the raw map at the layer's resolution: the cell under the cursor
        const rh = expl.raw.shape[0], rw = expl.raw.shape[1];
        const ry = Math.min(rh - 1, Math.floor((y * rh) / canvas.height)), rx = Math.min(rw - 1, Math.floor((x * rw) / canvas.width));
        const raw = expl.raw.data[ry * rw + rx];
        text += " | raw " + raw.toPrecision(4);
        readout.dataset.raw = String(raw);
        readout.dataset.rawCell = ry + "," + rx;
      }
      readout.textContent = text + " | " + expl.label + " " + formatScore(expl.score);
      readout.dataset.value = String(value);
      readout.dataset.pixel = y + "," + x;
    });
    canvas.addEventListener("mouseleave", function () {
      readout.textContent = expl.label + " " + formatScore(expl.score);
    });
  }

  function cell(image, method, display) {
    const node = el("div", "cell");
    node.dataset.method = method;
    const expls = image.byTarget[image.target];
    const expl = expls ? expls[method] : null;
    if (!expl) {
      node.appendChild(el("div", "placeholder muted", image.error ? "-" : "..."));
      return node;
    }
    const size = displaySize(image.height || expl.heatmap.shape[0], image.width || expl.heatmap.shape[1]);
    const canvas = el("canvas", "overlay");
    canvas.height = size[0];
    canvas.width = size[1];
    canvas.dataset.classIndex = String(expl.classIndex);
    canvas.explanation = expl;
    canvas.sourceImage = image.source;
    node.appendChild(canvas);
    const readout = el("div", "readout", expl.label + " " + formatScore(expl.score));
    node.appendChild(readout);
    draw(canvas, display);
    hover(canvas, readout, expl);
    return node;
  }

  /** (Re)draw one cell's canvas with the display settings {opacity, colormap, showBox}. */
  function draw(canvas, display) {
    const expl = canvas.explanation;
    canvas.resizedMap = CS.heatmap.drawOverlay(canvas, canvas.sourceImage, expl.heatmap, {
      opacity: display.opacity,
      colormap: display.colormap,
      showBox: display.showBox,
      box: expl.box,
    });
  }

  /** Rebuild the grid: a header row of method names, then one row per image. */
  function render(container, state, onChip) {
    container.textContent = "";
    container.style.setProperty("--columns", String(state.methods.length));
    const header = el("div", "row header");
    header.appendChild(el("div", "row-head", "image"));
    state.methods.forEach(function (m) {
      header.appendChild(el("div", "cell method-name", m));
    });
    container.appendChild(header);
    state.images.forEach(function (image) {
      container.appendChild(row(image, state, onChip));
    });
  }

  function row(image, state, onChip) {
    const node = el("div", "row image-row");
    node.dataset.id = String(image.id);
    node.dataset.image = image.name;
    node.dataset.target = image.target === null ? "" : String(image.target);
    node.dataset.layer = image.layer || "";
    node.appendChild(rowHead(image, onChip));
    state.methods.forEach(function (m) {
      node.appendChild(cell(image, m, state.display));
    });
    return node;
  }

  /** Redraw one image's row only (an answer arrived); the whole grid when it has no row yet. */
  function update(container, state, image, onChip) {
    const old = container.querySelector('.image-row[data-id="' + image.id + '"]');
    if (!old) render(container, state, onChip);
    else container.replaceChild(row(image, state, onChip), old);
  }

  /** Redraw every canvas after a display change (no new requests). */
  function redraw(container, display) {
    container.querySelectorAll("canvas.overlay").forEach(function (c) {
      draw(c, display);
    });
  }

  CS.grid = {
    DISPLAY: DISPLAY,
    el: el,
    displaySize: displaySize,
    formatScore: formatScore,
    explanation: explanation,
    render: render,
    update: update,
    redraw: redraw,
  };
})((window.CS = window.CS || {}));
