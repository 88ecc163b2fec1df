"""Metrics and logs (camserve.serving.observability)."""

from __future__ import annotations

import json
import logging
import sys

from camserve.serving.jobs import DenseKey, ExplainKey, PredictKey
from camserve.serving.observability import JsonFormatter, ServerMetrics, configure_logging


def _sample(m: ServerMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_batcher_hooks_label_batches_by_operation() -> None:
    m = ServerMetrics()
    hooks = m.batcher_hooks()
    hooks.batch(PredictKey("gap", 1, (32, 32, 3)), 3)
    hooks.batch(DenseKey("fc", 1, (40, 48, 3), None, (1.0,), "fcn"), 1)
    hooks.queue_time(ExplainKey("gap", 1, "last_conv", ("gradcam",), (32, 32, 3), 1), 0.002)
    hooks.dropped(PredictKey("gap", 1, (32, 32, 3)), "deadline")
    hooks.queue_depth(5)
    assert _sample(m, "camserve_batch_size_sum", operation="predict") == 3
    assert _sample(m, "camserve_batch_size_count", operation="dense") == 1
    assert _sample(m, "camserve_queue_time_seconds_count", operation="explain") == 1
    assert _sample(m, "camserve_dropped_total", reason="deadline") == 1
    assert _sample(m, "camserve_queue_depth") == 5


def test_record_counts_requests_errors_and_latency() -> None:
    m = ServerMetrics()
    m.record("Predict", "OK", 0.01)
    m.record("Predict", "INVALID_ARGUMENT", 0.002)
    assert _sample(m, "camserve_requests_total", method="Predict", code="OK") == 1
    assert _sample(m, "camserve_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert _sample(m, "camserve_errors_total", method="Predict", code="OK") == 0
    assert _sample(m, "camserve_errors_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert _sample(m, "camserve_request_latency_seconds_count", method="Predict") == 2
    m.model_is_ready("gap", 2)
    assert _sample(m, "camserve_model_ready", model="gap", version="2") == 1


def test_metrics_served_over_http() -> None:
    import urllib.request

    m = ServerMetrics()
    port = m.serve_http("127.0.0.1", 0)
    try:
        m.record("GetModel", "NOT_FOUND", 0.001)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'camserve_errors_total{code="NOT_FOUND",method="GetModel"} 1.0' in text
    finally:
        m.close()


def test_json_lines_carry_extra_fields_and_the_traceback() -> None:
    try:
        raise KeyError("boom")
    except KeyError:
        rec = logging.LogRecord("camserve.x", logging.ERROR, __file__, 1, "internal error", (), sys.exc_info())
    rec.request_id = "abc"
    out = json.loads(JsonFormatter().format(rec))
    assert (out["level"], out["logger"], out["msg"], out["request_id"]) == (
        "ERROR",
        "camserve.x",
        "internal error",
        "abc",
    )
    assert out["exc"].startswith("Traceback") and "KeyError: 'boom'" in out["exc"]


def test_configure_logging_writes_json_lines_to_stderr(capsys) -> None:
    root = logging.getLogger("camserve")
    handlers, level, propagate = root.handlers[:], root.level, root.propagate
    try:
        configure_logging("info", "json")
        logging.getLogger("camserve.serving.test").info("listening", extra={"port": 1234})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["port"] == 1234 and root.propagate is False
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        root.propagate = propagate
