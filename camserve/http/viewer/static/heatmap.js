/* camserve viewer: float maps from the JSON API, resizing, colorizing and drawing overlays.
 *
 * A FloatMap in the protobuf JSON mapping is {shape: ["64", "64"], data: "<base64>"}: the
 * values as little-endian float32 bytes (or, from old servers, {values: [...]}).
 */
(function (CS) {
  "use strict";

  /** Protobuf JSON field: lowerCamelCase as servers write it, or the proto name. Absent
   * fields (proto3 defaults are omitted) read as `fallback`. */
  function field(obj, camel, snake, fallback) {
    if (obj == null) return fallback;
    if (obj[camel] !== undefined) return obj[camel];
    if (snake && obj[snake] !== undefined) return obj[snake];
    return fallback;
  }

  function base64ToBytes(text) {
    const bin = atob(text);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  function bytesToBase64(bytes) {
    let bin = "";
    const step = 0x8000;
    for (let i = 0; i < bytes.length; i += step) {
      bin += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
    }
    return btoa(bin);
  }

  /** {shape: [..numbers], data: Float32Array} from a FloatMap's JSON, or null when absent. */
  function decodeFloatMap(map) {
    if (!map) return null;
    const shape = (map.shape || []).map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    let data;
    if (map.data) {
      const bytes = base64ToBytes(map.data);
      if (bytes.length !== 4 * count) {
        throw new Error("malformed float map: shape " + shape.join("x") + " needs " + 4 * count +
          " bytes, got " + bytes.length);
      }
      const view = new DataView(bytes.buffer);
      data = new Float32Array(count);
      for (let i = 0; i < count; i++) data[i] = view.getFloat32(4 * i, true);
    } else {
      data = Float32Array.from(map.values || []);
      if (data.length !== count) throw new Error("malformed float map: " + data.length + " values for shape " + shape);
    }
    return { shape: shape, data: data };
  }

  /** Bilinear resize of a (h, w) map to (outH, outW) with OpenCV's INTER_LINEAR pixel-centre
   * convention (src = (dst + 0.5) * scale - 0.5, clamped at the edges). */
  function resizeBilinear(map, outH, outW) {
    const h = map.shape[0], w = map.shape[1], src = map.data;
    const out = new Float32Array(outH * outW);
    const sy = h / outH, sx = w / outW;
    const xs0 = new Int32Array(outW), xs1 = new Int32Array(outW), fx = new Float32Array(outW);
    for (let x = 0; x < outW; x++) {
      let s = (x + 0.5) * sx - 0.5;
      if (s < 0) s = 0;
      let x0 = Math.floor(s);
      if (x0 > w - 1) x0 = w - 1;
      xs0[x] = x0;
      xs1[x] = Math.min(x0 + 1, w - 1);
      fx[x] = Math.min(1, s - x0);
    }
    for (let y = 0; y < outH; y++) {
      let s = (y + 0.5) * sy - 0.5;
      if (s < 0) s = 0;
      let y0 = Math.floor(s);
      if (y0 > h - 1) y0 = h - 1;
      const y1 = Math.min(y0 + 1, h - 1), fy = Math.min(1, s - y0);
      for (let x = 0; x < outW; x++) {
        const a = src[y0 * w + xs0[x]], b = src[y0 * w + xs1[x]];
        const c = src[y1 * w + xs0[x]], d = src[y1 * w + xs1[x]];
        const top = a + (b - a) * fx[x], bottom = c + (d - c) * fx[x];
        out[y * outW + x] = top + (bottom - top) * fy;
      }
    }
    return { shape: [outH, outW], data: out };
  }

  /** ImageData of a (h, w) map in [0, 1] through a colormap's lookup table (opaque). */
  function colorize(map, lutName) {
    const lut = CS.colormaps.lut(lutName);
    const h = map.shape[0], w = map.shape[1];
    const img = new ImageData(w, h);
    const px = img.data;
    for (let i = 0; i < h * w; i++) {
      const k = 3 * CS.colormaps.index(map.data[i]);
      px[4 * i] = lut[k];
      px[4 * i + 1] = lut[k + 1];
      px[4 * i + 2] = lut[k + 2];
      px[4 * i + 3] = 255;
    }
    return img;
  }

  /** Draw `source` (an image) with the heatmap blended on top at `opacity`, and the box
   * (heatmap coordinates [x0, y0, x1, y1], x1/y1 exclusive) when given. The heatmap is resized
   * to the canvas here, so hover values and pixels refer to the same grid. Returns the
   * resized map (for hover read-outs). */
  function drawOverlay(canvas, source, heatmap, options) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    if (source) ctx.drawImage(source, 0, 0, W, H);
    let resized = null;
    if (heatmap) {
      resized = resizeBilinear(heatmap, H, W);
      const layer = document.createElement("canvas");
      layer.width = W;
      layer.height = H;
      layer.getContext("2d").putImageData(colorize(resized, options.colormap), 0, 0);
      ctx.save();
      ctx.globalAlpha = options.opacity;
      ctx.drawImage(layer, 0, 0);
      ctx.restore();
      if (options.box && options.showBox) {
        const sx = W / heatmap.shape[1], sy = H / heatmap.shape[0];
        const b = options.box;
        ctx.save();
        ctx.strokeStyle = "#ffffff";
        ctx.lineWidth = 2;
        ctx.strokeRect(b[0] * sx + 1, b[1] * sy + 1, (b[2] - b[0]) * sx - 2, (b[3] - b[1]) * sy - 2);
        ctx.restore();
      }
    }
    return resized;
  }

  /** [x0, y0, x1, y1] from a Box's JSON (absent coordinates are 0), or null. */
  function box(json) {
    if (!json) return null;
    return [json.x0 || 0, json.y0 || 0, json.x1 || 0, json.y1 || 0];
  }

  CS.heatmap = {
    field: field,
    base64ToBytes: base64ToBytes,
    bytesToBase64: bytesToBase64,
    decodeFloatMap: decodeFloatMap,
    resizeBilinear: resizeBilinear,
    colorize: colorize,
    drawOverlay: drawOverlay,
    box: box,
  };
})((window.CS = window.CS || {}));
