/* camserve viewer: where data comes from.
 *
 * Server mode: the camserve.v1 RPCs as JSON (POST camserve.v1.CamService/<Method>, protobuf
 * JSON mapping), relative to the page so a path prefix in front of the server keeps working.
 * Static mode (`camserve explain --html`): the report embedded in the page as
 * <script type="application/json" id="camserve-report">, because file:// pages cannot fetch.
 */
(function (CS) {
  "use strict";

  const SERVICE = "camserve.v1.CamService/";

  /** An error from the server, with its HTTP status and the message it sent. */
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** The message in a JSON error body, whatever shape the server chose for it. */
  function errorMessage(body, fallback) {
    if (body == null) return fallback;
    if (typeof body === "string") return body || fallback;
    const err = body.error !== undefined ? body.error : body;
    if (typeof err === "string") return err;
    const message = err.message || body.message || body.detail;
    const code = err.code || err.status || body.code;
    if (message) return code && typeof code === "string" ? code + ": " + message : message;
    return fallback;
  }

  let token = "";

  function setToken(value) {
    token = value || "";
  }

  async function post(path, body) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, { method: "POST", headers: headers, body: JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "the server did not answer (" + e.message + ")");
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : {};
    } catch (e) {
      json = null;
    }
    if (!response.ok) {
      const fallback = (text || response.statusText || "").slice(0, 500);
      throw new ApiError(response.status, "HTTP " + response.status + ": " + errorMessage(json, fallback));
    }
    if (json === null) throw new ApiError(response.status, "the server's answer is not JSON: " + text.slice(0, 200));
    return json;
  }

  /** Call one camserve.v1 RPC with a JSON request; resolves to the JSON response. */
  function call(method, request) {
    return post(SERVICE + method, request);
  }

  async function getJson(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers: headers });
    if (!response.ok) throw new ApiError(response.status, "HTTP " + response.status + " for " + path);
    return response.json();
  }

  async function getBytes(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers: headers });
    if (!response.ok) throw new ApiError(response.status, "HTTP " + response.status + " for " + path);
    return new Uint8Array(await response.arrayBuffer());
  }

  /** The bundled sample images the server offers: [{name, url}]. */
  async function samples() {
    const json = await getJson("viewer/samples");
    return json.samples || [];
  }

  /** The embedded static report, or null in server mode. */
  function report() {
    const node = document.getElementById("camserve-report");
    if (!node) return null;
    return JSON.parse(node.textContent);
  }

  CS.api = {
    ApiError: ApiError,
    errorMessage: errorMessage,
    setToken: setToken,
    call: call,
    getBytes: getBytes,
    samples: samples,
    report: report,
  };
})((window.CS = window.CS || {}));
