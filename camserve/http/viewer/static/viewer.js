/* camserve viewer: state, controls and the calls behind them.
 *
 * Server mode: models from ListModels; for every image Predict (top-k chips) then Explain
 * (the chosen or best class, every checked method, return_heatmap) - one request per image,
 * so a bad image fails alone (the server's batcher merges them anyway). Static mode: the
 * embedded report (see api.js); model controls are hidden and chips switch between the
 * targets the report holds.
 */
(function (CS) {
  "use strict";

  const $ = function (id) {
    return document.getElementById(id);
  };

  const state = {
    static: false,
    models: [],
    methods: [],
    images: [],
    display: { opacity: 0.45, colormap: "jet", showBox: true },
  };
  CS.state = state;
  let nextId = 1;

  function showError(message) {
    const box = $("error");
    if (!message) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    box.textContent = message;
    box.hidden = false;
  }
  CS.showError = showError;

  /** Redraw the grid (image = null) or one image's row, and the summary. */
  function render(image) {
    if (image) CS.grid.update($("grid"), state, image, retarget);
    else CS.grid.render($("grid"), state, retarget);
    const done = state.images.filter((i) => !i.busy).length;
    $("summary").textContent = state.images.length
      ? done + " of " + state.images.length + " images explained"
      : state.static ? "" : "add images to explain them";
    if (CS.dense) CS.dense.images(state.images);
  }

  // ------------------------------------------------------------------ model controls

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value) || null;
  }

  function modelSpec() {
    const spec = { name: $("model").value };
    if ($("version").value) spec.version = $("version").value;
    return spec;
  }

  function fillSelect(select, values, selected, labels) {
    select.textContent = "";
    values.forEach(function (v, i) {
      const o = document.createElement("option");
      o.value = String(v);
      o.textContent = labels ? labels[i] : String(v);
      if (String(v) === String(selected)) o.selected = true;
      select.appendChild(o);
    });
  }

  function onModelChange() {
    const f = CS.heatmap.field;
    const m = currentModel();
    if (!m) return;
    const versions = f(m, "availableVersions", "available_versions", []);
    fillSelect($("version"), [""].concat(versions), "", ["newest"].concat(versions.map(String)));
    const layers = f(m, "targetLayers", "target_layers", []);
    const def = f(m, "defaultLayer", "default_layer", "");
    fillSelect($("layer"), [""].concat(layers), "", [def ? "default (" + def + ")" : "automatic"].concat(layers));
    const methodsBox = $("methods");
    const previous = checkedMethods();
    methodsBox.textContent = "";
    (m.methods || []).forEach(function (name) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = name;
      box.name = "method";
      box.checked = previous.length ? previous.indexOf(name) >= 0 : name === "gradcam";
      box.addEventListener("change", scheduleRerun);
      label.appendChild(box);
      label.appendChild(document.createTextNode(" " + name));
      methodsBox.appendChild(label);
    });
    const classes = f(m, "classNames", "class_names", []);
    fillSelect($("target"), [""].concat(classes.map((_, i) => i)), "", ["best class"].concat(classes));
    if (!m.available) showError("model " + m.name + " is not available: " + (m.reason || "unknown reason"));
    else showError("");
    scheduleRerun();
  }

  function checkedMethods() {
    return Array.from(document.querySelectorAll("#methods input:checked")).map((b) => b.value);
  }

  // ------------------------------------------------------------------ requests

  function topK() {
    const k = parseInt($("topk").value, 10);
    return k > 0 ? k : 1;
  }

  async function explainImage(image) {
    const generation = (image.generation = (image.generation || 0) + 1);
    const methods = state.methods.slice();
    if (!methods.length) {
      showError("check at least one method to explain the images");
      render(image);
      return;
    }
    image.busy = true;
    image.error = null;
    render(image);
    try {
      if (!image.top) {
        const p = await CS.api.call("Predict", { model: modelSpec(), images: [{ encoded: image.b64 }], topK: topK() });
        if (generation !== image.generation) return;
        const pred = (p.predictions || [])[0] || {};
        image.top = (pred.top || []).map((c) => ({ index: c.index || 0, label: c.label || "", score: c.score || 0 }));
      }
      let target = image.pinned;
      if (target === null || target === undefined) target = $("target").value === "" ? null : Number($("target").value);
      if (target === null) target = image.top.length ? image.top[0].index : 0;
      const request = {
        model: modelSpec(),
        images: [{ encoded: image.b64 }],
        methods: methods,
        targets: [{ targets: [{ index: target }] }],
        returnHeatmap: true,
        returnRaw: true,
      };
      if ($("layer").value) request.layer = $("layer").value;
      const r = await CS.api.call("Explain", request);
      if (generation !== image.generation) return;
      const first = (r.images || [])[0] || {};
      const byMethod = {};
      (first.explanations || []).forEach(function (json) {
        const e = CS.grid.explanation(json);
        byMethod[e.method] = e;
      });
      image.byTarget[target] = byMethod;
      image.target = target;
      image.layer = r.layer || "";
    } catch (e) {
      if (generation !== image.generation) return;
      image.error = e.message;
      showError(image.name + ": " + e.message);
    } finally {
      if (generation === image.generation) image.busy = false;
    }
    render(image);
  }

  function rerunAll(resetTop) {
    state.methods = checkedMethods();
    state.images.forEach(function (image) {
      image.byTarget = {};
      if (resetTop) image.top = null;
    });
    showError("");
    state.images.forEach(explainImage);
    render();
  }

  let rerunTimer = null;
  function scheduleRerun() {
    clearTimeout(rerunTimer);
    document.body.dataset.pending = "true"; // a re-run is coming (tests wait for it)
    rerunTimer = setTimeout(function () {
      delete document.body.dataset.pending;
      rerunAll(true);
    }, 100);
  }

  function retarget(image, classIndex) {
    image.pinned = classIndex;
    if (state.static || image.byTarget[classIndex]) {
      image.target = classIndex;
      render(image);
      return;
    }
    explainImage(image);
  }

  // ------------------------------------------------------------------ images

  function loadImage(url) {
    return new Promise(function (resolve) {
      const img = new Image();
      img.onload = function () {
        resolve(img);
      };
      img.onerror = function () {
        resolve(null); // the server says what is wrong with it
      };
      img.src = url;
    });
  }

  async function addImage(name, bytes, type) {
    const url = URL.createObjectURL(new Blob([bytes], { type: type || "application/octet-stream" }));
    const source = await loadImage(url);
    const image = {
      id: nextId++,
      name: name,
      b64: CS.heatmap.bytesToBase64(bytes),
      url: url,
      source: source,
      height: source ? source.naturalHeight : 0,
      width: source ? source.naturalWidth : 0,
      top: null,
      target: null,
      pinned: null,
      byTarget: {},
      error: null,
      busy: false,
    };
    state.images.push(image);
    state.methods = checkedMethods();
    explainImage(image);
    return image;
  }
  CS.addImage = addImage;

  async function addFiles(files) {
    for (const file of Array.from(files)) {
      await addImage(file.name, new Uint8Array(await file.arrayBuffer()), file.type);
    }
  }

  async function addSample(sample) {
    try {
      await addImage(sample.name, await CS.api.getBytes(sample.url), "");
    } catch (e) {
      showError("sample " + sample.name + ": " + e.message);
    }
  }

  // ------------------------------------------------------------------ wiring

  function wireDisplay() {
    $("error").title = "click to dismiss";
    $("error").addEventListener("click", function () {
      showError("");
    });
    fillSelect($("colormap"), CS.colormaps.names(), state.display.colormap);
    $("opacity").addEventListener("input", function () {
      state.display.opacity = Number($("opacity").value);
      $("opacity-value").textContent = $("opacity").value;
      CS.grid.redraw($("grid"), state.display);
    });
    $("colormap").addEventListener("change", function () {
      state.display.colormap = $("colormap").value;
      CS.grid.redraw($("grid"), state.display);
      if (CS.dense) CS.dense.redraw();
    });
    $("boxes").addEventListener("change", function () {
      state.display.showBox = $("boxes").checked;
      CS.grid.redraw($("grid"), state.display);
    });
  }

  function wireServer() {
    $("token").value = sessionStorage.getItem("camserve-token") || "";
    CS.api.setToken($("token").value);
    $("token").addEventListener("change", function () {
      sessionStorage.setItem("camserve-token", $("token").value);
      CS.api.setToken($("token").value);
      loadModels();
    });
    $("model").addEventListener("change", onModelChange);
    ["version", "layer", "target", "topk"].forEach(function (id) {
      $(id).addEventListener("change", function () {
        state.images.forEach((i) => (i.pinned = null));
        scheduleRerun();
      });
    });
    $("files").addEventListener("change", function () {
      addFiles($("files").files);
      $("files").value = "";
    });
    const drop = $("drop");
    drop.addEventListener("dragover", function (ev) {
      ev.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", function () {
      drop.classList.remove("over");
    });
    drop.addEventListener("drop", function (ev) {
      ev.preventDefault();
      drop.classList.remove("over");
      addFiles(ev.dataTransfer.files);
    });
    // a file dropped beside the zone must not navigate away from the page
    ["dragover", "drop"].forEach(function (type) {
      document.addEventListener(type, function (ev) {
        ev.preventDefault();
      });
    });
    $("add-sample").addEventListener("click", function () {
      const s = state.samples.find((x) => x.name === $("sample").value);
      if (s) addSample(s);
    });
    $("add-all-samples").addEventListener("click", async function () {
      for (const s of state.samples) await addSample(s);
    });
    $("clear").addEventListener("click", function () {
      state.images.forEach((i) => URL.revokeObjectURL(i.url));
      state.images = [];
      showError("");
      render();
    });
    $("rerun").addEventListener("click", function () {
      rerunAll(true);
    });
    document.querySelectorAll(".tab").forEach(function (tab) {
      tab.addEventListener("click", function () {
        document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
        $("explain-tab").hidden = tab.dataset.tab !== "explain";
        $("dense-tab").hidden = tab.dataset.tab !== "dense";
        document.querySelectorAll(".explain-only").forEach((n) => (n.hidden = tab.dataset.tab !== "explain"));
      });
    });
  }

  async function loadModels() {
    try {
      const r = await CS.api.call("ListModels", {});
      state.models = r.models || [];
      const first = state.models.find((m) => m.available) || state.models[0];
      fillSelect($("model"), state.models.map((m) => m.name), first ? first.name : "");
      onModelChange();
    } catch (e) {
      showError("listing the models failed: " + e.message);
    }
    try {
      state.samples = await CS.api.samples();
    } catch (e) {
      state.samples = [];
    }
    fillSelect($("sample"), state.samples.map((s) => s.name), "");
  }

  /** Static mode: images, explanations and chips from the embedded report. */
  function loadReport(report) {
    state.static = true;
    document.body.classList.add("static");
    $("mode").textContent = "static report" + (report.model ? " - model " + report.model : "") +
      (report.layer ? ", layer " + report.layer : "");
    state.methods = report.methods || [];
    const pending = (report.images || []).map(async function (r) {
      const source = r.src ? await loadImage(r.src) : null;
      const image = {
        id: nextId++,
        name: r.name,
        source: source,
        height: r.height || (source ? source.naturalHeight : 0),
        width: r.width || (source ? source.naturalWidth : 0),
        top: [],
        target: null,
        pinned: null,
        byTarget: {},
        error: r.error || null,
        busy: false,
      };
      (r.explanations || []).forEach(function (json) {
        const e = CS.grid.explanation(json);
        if (!image.byTarget[e.classIndex]) {
          image.byTarget[e.classIndex] = {};
          image.top.push({ index: e.classIndex, label: e.label, score: e.score });
        }
        image.byTarget[e.classIndex][e.method] = e;
        if (state.methods.indexOf(e.method) < 0) state.methods.push(e.method);
      });
      image.target = image.top.length ? image.top[0].index : null;
      return image;
    });
    Promise.all(pending).then(function (images) {
      state.images = images;
      render();
      document.body.dataset.ready = "true";
    });
  }

  function start() {
    wireDisplay();
    let report = null;
    try {
      report = CS.api.report();
    } catch (e) {
      showError("the embedded report is not valid JSON: " + e.message);
      return;
    }
    if (report) {
      loadReport(report);
      return;
    }
    $("mode").textContent = "server";
    wireServer();
    if (CS.dense) CS.dense.wire({ modelSpec: modelSpec, display: state.display });
    loadModels().then(function () {
      document.body.dataset.ready = "true";
    });
    render();
  }

  document.addEventListener("DOMContentLoaded", start);
})((window.CS = window.CS || {}));
