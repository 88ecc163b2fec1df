"""The data plane's bounds (issue 9 item 4): a per-request work budget, answers too large
refused before compute, compute that stops when nobody waits any more (deadline, server
stopping), ExplainStream backpressure, layer look-ups off the event loop, DenseScores
converted at warm-up, health NOT_SERVING without any model.

A slow engine call is simulated by a fake ``camserve.dense.dense_scores`` that takes the
engine's ``checkpoint`` keyword (called between chunks) and counts its chunks, so that "the
computation stopped" is an event count, not a timing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, make_repository, metric_value, write_config
from test_server_ops import Gate

from camserve import wire
from camserve.client import Client
from camserve.proto import pb, pb_grpc
from camserve.serving.config import ServerConfig

RNG = np.random.default_rng(21)
GAP, FC = pb.ModelSpec(name="gap"), pb.ModelSpec(name="fc")


def _config(root: Path, **kw) -> ServerConfig:
    base = dict(max_batch_size=4, batch_timeout_ms=2, max_images=8, max_message_mb=0.25, stream_inflight=4)
    return local_config(root, **{**base, "log_level": "ERROR", **kw})


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _explain(n: int = 1, size: int = 32, **kw) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=GAP, images=[wire.image_to_proto(_rgb(size, size)) for _ in range(n)], **kw)


def _dense(size: int = 40, **kw) -> pb.DenseScoresRequest:
    return pb.DenseScoresRequest(model=FC, image=wire.image_to_proto(_rgb(size, size)), **kw)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"), corrupt=False)


@pytest.fixture(scope="module")
def served(repo: Path):
    with RunningServer(_config(repo)) as rs:
        yield rs


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


def _code(call, *args, **kw) -> tuple[str, str]:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


class Counted:
    """Wraps the server's compute: counts the jobs it was given."""

    def __init__(self, rs: RunningServer) -> None:
        self.batcher = rs.server.batcher
        self.inner = self.batcher.compute
        self.jobs = 0
        self.batcher.compute = self

    def __call__(self, key, jobs):
        self.jobs += len(jobs)
        return self.inner(key, jobs)

    def restore(self) -> None:
        self.batcher.compute = self.inner


class SlowDense:
    """A fake ``dense_scores``: ``chunks`` chunks of 10 ms, calling the engine's checkpoint
    between them (as the engine does between its batches), then the real result."""

    def __init__(self, chunks: int) -> None:
        import camserve.dense

        self.real = camserve.dense.dense_scores
        self.chunks = chunks
        self.done = 0
        self.started = threading.Event()
        self.ended = threading.Event()
        self.raised: BaseException | None = None

    def __call__(self, model, image, stride=None, scales=(1.0,), mode="fcn", checkpoint=None, **kw):
        self.started.set()
        try:
            for _ in range(self.chunks):
                if checkpoint is not None:
                    checkpoint()
                time.sleep(0.01)
                self.done += 1
            return self.real(model, image, stride=stride, scales=scales, mode=mode, **kw)
        except BaseException as e:
            self.raised = e
            raise
        finally:
            self.ended.set()


# ------------------------------------------------------------------ the work budget


@pytest.fixture(scope="module")
def budgeted(repo: Path):
    with RunningServer(_config(repo, max_work_units=200)) as rs:
        channel = grpc.insecure_channel(rs.target)
        yield rs, pb_grpc.CamServiceStub(channel)
        channel.close()


def test_dense_request_over_the_budget_alone_is_invalid_argument_naming_it(budgeted) -> None:
    rs, stub = budgeted
    counted = Counted(rs)
    try:
        # fc: window 32, total stride 2; stride 1 on 64x64: 33 x 33 = 1089 windows (4 shifted passes).
        code, details = _code(stub.DenseScores, _dense(64, stride=1), timeout=30)
    finally:
        counted.restore()
    assert code == "INVALID_ARGUMENT", details
    assert details.startswith("this request needs 1089 work units (1089 windows of 32x32 at stride 1 over 1 scale")
    assert "4 shifted passes at the total stride 2" in details
    assert "max_work_units=200" in details and "coarser stride" in details
    assert counted.jobs == 0
    assert _code(stub.DenseScores, _dense(40, stride=2), timeout=30)[0] == "OK"  # 5 x 5 = 25 windows fit


def test_dense_detection_counts_the_candidates_explained_for_tight_boxes(budgeted) -> None:
    """With tight boxes each window may give one candidate per class (per-class NMS; fc has 4
    classes, no background), each explained on its crop: windows x (1 + 4) units; without tight
    boxes, or with class-agnostic NMS (one candidate a window), fewer."""
    rs, stub = budgeted
    answer = stub.DenseScores(_dense(48, stride=2, detect=True, nms="per_class", tight_boxes=False), timeout=30)
    windows = sum(s.scores.shape[0] * s.scores.shape[1] for s in answer.scales)
    assert 200 < windows * 5 and windows * 2 <= 200  # refused per class, admitted agnostic
    code, details = _code(stub.DenseScores, _dense(48, stride=2, detect=True, nms="per_class"), timeout=30)
    assert code == "INVALID_ARGUMENT", details
    assert details.startswith(f"this request needs {windows * 5} work units ({windows} windows of 32x32"), details
    assert "each with up to 4 candidates explained for its tight box" in details and "tight boxes off" in details
    assert _code(stub.DenseScores, _dense(48, stride=2, detect=True, nms="agnostic"), timeout=30)[0] == "OK"


def test_score_cam_counts_the_layers_channels(budgeted) -> None:
    rs, stub = budgeted
    # tiny_gap's last_conv has 16 channels: 8 images x (1 target x gradcam + 16 x scorecam) = 136 fit ...
    assert _code(stub.Explain, _explain(8, methods=["gradcam", "scorecam"]), timeout=60)[0] == "OK"
    # ... 8 x (16 + 16) = 256 do not.
    code, details = _code(stub.Explain, _explain(8, methods=["scorecam", "ablationcam"]), timeout=60)
    assert code == "INVALID_ARGUMENT", details
    assert "needs 256 work units (8 images × 1 target × 2 methods, scorecam, ablationcam by 16 channels" in details


def test_work_that_could_fit_later_is_resource_exhausted(budgeted) -> None:
    rs, stub = budgeted
    gate = Gate(rs)
    try:
        request = _explain(4, methods=["scorecam", "ablationcam"])  # 4 x 32 = 128 units
        first = stub.Explain.future(request, timeout=60)
        assert gate.started.wait(30)
        code, details = _code(stub.Explain, request, timeout=60)
        assert code == "RESOURCE_EXHAUSTED", details
        assert "needs 128 work units" in details and "128 of the server's work budget max_work_units=200" in details
        assert "retry later" in details
    finally:
        gate.open.set()
        rs.server.batcher.compute = gate.inner
    assert len(first.result().images) == 4
    assert rs.server.dataplane.budget.in_use == 0
    assert _code(stub.Explain, request, timeout=60)[0] == "OK"  # the budget was given back


# ------------------------------------------------------------------ answers too large


def test_oversize_answer_refused_before_compute_and_counted_as_an_error(served, stub) -> None:
    before = served.metrics_text()
    counted = Counted(served)
    try:
        # 4 images x 4 targets x 6 methods x (raw 8x8 + heatmap 32x32 floats) > 0.25 MiB
        request = _explain(4, methods=["cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"], top_k=4)
        request.return_raw = request.return_heatmap = True
        code, details = _code(stub.Explain, request, timeout=60)
    finally:
        counted.restore()
    assert code == "RESOURCE_EXHAUSTED", details
    assert counted.jobs == 0, "the answer was computed before it was refused"
    after = served.metrics_text()
    count = lambda text, **labels: metric_value(text, "camserve_requests_total", method="Explain", **labels)
    assert count(after, code="OK") == count(before, code="OK"), "the refused answer was counted as OK"
    assert count(after, code="RESOURCE_EXHAUSTED") == count(before, code="RESOURCE_EXHAUSTED") + 1
    assert "the answer (4 images × 4 targets × 6 methods with raw, heatmap) would be about" in details


def test_oversize_dense_answer_refused_before_compute(served, stub) -> None:
    counted = Counted(served)
    try:
        # 128x128 at stride 1: 97 x 97 windows x (4 scores + 4 box values) x 4 bytes > 0.25 MiB
        code, details = _code(stub.DenseScores, _dense(128, stride=1), timeout=60)
    finally:
        counted.restore()
    assert code == "RESOURCE_EXHAUSTED", details
    assert counted.jobs == 0, "the answer was computed before it was refused"
    assert "the answer (scores and boxes of 9409 windows) would be about" in details


# ------------------------------------------------------------------ deadlines and stopping


def test_deadline_stops_a_long_dense_call_and_the_next_request_is_served(served, stub, monkeypatch) -> None:
    slow = SlowDense(chunks=1000)  # 10 s unless stopped
    monkeypatch.setattr("camserve.dense.dense_scores", slow)
    code, _ = _code(stub.DenseScores, _dense(40), timeout=0.5)
    assert code == "DEADLINE_EXCEEDED"
    assert slow.ended.wait(5), "the computation went on after the deadline"
    assert slow.done < 300, f"{slow.done} chunks computed after a 0.5 s deadline"
    assert type(slow.raised).__name__ == "BatchDeadlineExceeded"
    monkeypatch.undo()
    got = stub.DenseScores(_dense(40), timeout=30)  # the worker is free again
    assert len(got.scales) == 1


def test_stop_during_a_long_call_ends_it_within_the_drain_time(repo: Path, monkeypatch) -> None:
    rs = RunningServer(_config(repo, drain_timeout_s=1.0))
    slow = SlowDense(chunks=6000)  # a minute unless stopped
    monkeypatch.setattr("camserve.dense.dense_scores", slow)
    result: dict = {}

    def call() -> None:
        with grpc.insecure_channel(rs.target) as ch:
            result["code"] = _code(pb_grpc.CamServiceStub(ch).DenseScores, _dense(40), timeout=120)

    t = threading.Thread(target=call)
    t.start()
    try:
        assert slow.started.wait(30)
        rs.stop(grace=1.0)
        assert slow.ended.wait(10), "the server stopped but the computation went on"
        assert slow.done < 1500
        assert type(slow.raised).__name__ == "Stopped"
        t.join(30)
        assert result["code"][0] in ("UNAVAILABLE", "CANCELLED"), result
    finally:
        rs.stop()
        t.join(30)


# ------------------------------------------------------------------ ExplainStream backpressure


def test_stream_client_that_does_not_read_cannot_pile_up_answers(served) -> None:
    """40 requests whose answers are ~200 KB overlays, and a client that reads none: the server
    computes at most ``stream_inflight`` (4) answers and then stops reading the stream. (The
    client's channel probes no bandwidth-delay product: with BDP probing on, gRPC's client
    transport itself widens its window and takes a few MB of answers into its own buffers,
    which is the client's memory, bounded by gRPC.)"""
    counted = Counted(served)
    requests = [_explain(1, size=256, return_overlay=True, request_id=str(i)) for i in range(40)]
    channel = grpc.insecure_channel(served.target, options=[("grpc.http2.bdp_probe", 0)])
    try:
        call = pb_grpc.CamServiceStub(channel).ExplainStream(iter(requests), timeout=120)
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 2.0:  # until the count stops moving for 2 s
            if counted.jobs != last:
                last, stable_since = counted.jobs, time.monotonic()
            time.sleep(0.1)
        computed = counted.jobs
        assert computed <= 5, f"{computed} answers computed for a client that read none"
        assert served.server.servicer.streams.unsent <= 4
        answers = [r.request_id for r in call]  # now read them all
    finally:
        counted.restore()
        channel.close()
    assert sorted(answers, key=int) == [str(i) for i in range(40)]
    assert served.server.servicer.streams.unsent == 0


# ------------------------------------------------------------------ layers, warm-up, health


def test_layer_lookups_run_off_the_event_loop(served, stub, monkeypatch) -> None:
    import camserve.keras_graph as graph

    real, threads = graph.resolve_layer, []

    def spy(model, name=None):
        threads.append(threading.current_thread())
        return real(model, name)

    monkeypatch.setattr(graph, "resolve_layer", spy)
    other = next(n for n in served.server.runtimes.get("gap").layers if n != "last_conv")
    assert _code(stub.Explain, _explain(layer=other), timeout=30)[0] == "OK"
    code, details = _code(stub.Explain, _explain(layer="L" * 500), timeout=30)
    assert code in ("NOT_FOUND", "INVALID_ARGUMENT") and "layer" in details, details
    assert threads and served.thread not in threads, "a layer look-up ran on the event loop"


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_dense_model_converted_at_warm_up_not_in_a_batch_worker(repo: Path, monkeypatch, precision: str) -> None:
    import camserve.dense.scores as scores

    real, threads = scores.to_fully_convolutional, []

    def spy(*args, **kw):
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(scores, "to_fully_convolutional", spy)
    with RunningServer(_config(repo, precision=precision)) as rs, grpc.insecure_channel(rs.target) as ch:
        converted_at_start = len(threads)
        assert len(pb_grpc.CamServiceStub(ch).DenseScores(_dense(40), timeout=30).scales) == 1
    assert converted_at_start >= 1, "no model was converted for DenseScores at warm-up"
    assert not [t for t in threads if t.startswith("camserve-batch")], threads


def test_health_not_serving_when_no_model_could_be_loaded(tmp_path: Path) -> None:
    write_config(tmp_path / "broken", "broken")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.keras").write_bytes(b"not a zip file")
    with RunningServer(_config(tmp_path)) as rs, Client(rs.target, retries=0, timeout=10) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("camserve.v1.CamService") == "NOT_SERVING"
        assert c.health("broken") == "NOT_SERVING"


@pytest.mark.parametrize(
    "outputs",
    [
        dict(),
        dict(raw=True),
        dict(heatmap=True),
        dict(heatmap_png=True),
        dict(overlay=True),
        dict(raw=True, heatmap=True, overlay=True),
    ],
    ids=lambda o: "+".join(o) or "labels only",
)
def test_answer_size_estimate_bounds_the_real_answer(served, outputs) -> None:
    """The estimate checked before compute is an upper bound of the answer, and not a loose one
    (it must not refuse answers that fit)."""
    from camserve.serving import convert
    from camserve.serving.budget import Outputs

    images = [wire.image_to_proto(_rgb(48, 40)), wire.image_to_proto(_rgb(32, 32))]
    result = served.run(
        served.server.dataplane.explain(
            "gap", 0, images, methods=["gradcam", "cam"], top_k=2, outputs=Outputs(**outputs)
        )
    )
    size = convert.explain_response(result, **outputs).ByteSize()
    assert size <= result.answer_bytes <= 3 * size + 4096, (size, result.answer_bytes)


@pytest.mark.parametrize("stride,scales", [(0, ()), (1, (1.0, 0.8)), (2, (1.5,))])
def test_dense_answer_size_estimate_bounds_the_real_answer(served, stride, scales) -> None:
    from camserve.serving import convert

    image = wire.image_to_proto(_rgb(48, 56))
    result = served.run(served.server.dataplane.dense_scores("fc", 0, image, stride=stride, scales=scales))
    size = convert.dense_response(result).ByteSize()
    assert size <= result.answer_bytes <= 3 * size + 4096, (size, result.answer_bytes)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.8)])
def test_dense_answer_size_estimate_bounds_an_answer_with_every_window_detected(served, scales) -> None:
    """With detect, the estimate counts detections: at threshold 0, no tight boxes and an NMS
    that suppresses nothing (IoU > 1 never happens), every window is a detection, the most an
    answer can hold; the estimate still bounds it."""
    from camserve.serving import convert

    image = wire.image_to_proto(_rgb(48, 56))
    detection = dict(threshold=0.0, iou=1.0, nms="per_class", tight_boxes=False)
    result = served.run(served.server.dataplane.dense_scores("fc", 0, image, scales=scales, detection=detection))
    windows = sum(int(np.prod(s.scores.shape[:2])) for s in result.result)
    assert len(result.detections) == min(windows * len(result.class_names), 100)  # max_detections' default
    size = convert.dense_response(result).ByteSize()
    assert size <= result.answer_bytes <= 3 * size + 4096, (size, result.answer_bytes)


@pytest.mark.parametrize("top_k", [0, 1])
def test_predict_answer_size_estimate_bounds_the_real_answer(served, top_k) -> None:
    """Predict's answer carries every class's score as one map whatever top_k is: the estimate
    counts it."""
    from camserve.serving import budget, convert

    dataplane = served.server.dataplane
    images = [wire.image_to_proto(_rgb(32, 32)) for _ in range(3)]
    result = served.run(dataplane.predict("gap", 0, images, top_k=top_k))
    size = convert.predict_response(result, top_k).ByteSize()
    rt = dataplane.runtime("gap", 0)
    classes = len(rt.entry.config.class_names)
    estimate = budget.predict_response_bytes(3, top_k or classes, rt.label_bytes, classes)
    assert size <= estimate <= 3 * size + 4096, (size, estimate)
