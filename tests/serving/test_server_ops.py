"""Operational paths of the server: full queue, expired deadline, cancelled call, TLS + token,
SIGTERM drain through the real ``camserve serve`` command, configuration sources."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, make_repository, metric_value

from camserve import wire
from camserve.client import Client
from camserve.proto import pb, pb_grpc
from camserve.serving.config import ServerConfig


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"), corrupt=False)


def _config(root: Path, **kw) -> ServerConfig:
    return local_config(root, **{**dict(max_batch_size=1, batch_timeout_ms=0, warmup_methods=["gradcam"]), **kw})


def _request() -> pb.PredictRequest:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb.PredictRequest(model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(img)])


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Gate:
    """Wraps the server's compute: blocks batches until released, records what ran."""

    def __init__(self, rs: RunningServer) -> None:
        self.inner = rs.server.batcher.compute
        self.open = threading.Event()
        self.started = threading.Event()
        self.items = 0
        rs.server.batcher.compute = self

    def __call__(self, key, items):
        self.items += len(items)
        self.started.set()
        assert self.open.wait(60)
        return self.inner(key, items)


@pytest.fixture
def gated(repo_root: Path):
    with RunningServer(_config(repo_root, max_queued=2)) as rs:
        gate = Gate(rs)
        channel = grpc.insecure_channel(rs.target)
        yield rs, gate, pb_grpc.CamServiceStub(channel)
        gate.open.set()
        channel.close()


def test_full_queue_resource_exhausted(gated) -> None:
    rs, gate, stub = gated
    first = stub.Predict.future(_request(), timeout=60)
    assert gate.started.wait(30)
    queued = [stub.Predict.future(_request(), timeout=60) for _ in range(2)]
    _wait(lambda: rs.server.batcher.depth == 2, what="two queued requests")
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_request(), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full (2 of max_queued=2 waiting)" in e.value.details()
    gate.open.set()
    for f in [first, *queued]:
        assert len(f.result().predictions) == 1
    assert rs.server.batcher.depth == 0
    assert metric_value(rs.metrics_text(), "camserve_errors_total", method="Predict", code="RESOURCE_EXHAUSTED") == 1


def test_expired_deadline_never_computed(gated) -> None:
    rs, gate, stub = gated
    first = stub.Predict.future(_request(), timeout=60)
    assert gate.started.wait(30)
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_request(), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as e:  # a 1 ms deadline behind a busy worker
        stub.Predict(_request(), timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: rs.server.batcher.depth == 0, what="the expired requests to leave the queue")
    gate.open.set()
    first.result()
    assert gate.items == 1, "an expired request was computed"
    assert len(stub.Predict(_request(), timeout=60).predictions) == 1  # and the server serves on


def test_cancelled_call_leaves_no_queue_entry(gated) -> None:
    rs, gate, stub = gated
    first = stub.Predict.future(_request(), timeout=60)
    assert gate.started.wait(30)
    doomed = stub.Predict.future(_request(), timeout=60)
    _wait(lambda: rs.server.batcher.depth == 1, what="the request to queue")
    assert doomed.cancel()
    _wait(lambda: rs.server.batcher.depth == 0, what="the cancelled request to leave the queue")
    gate.open.set()
    first.result()
    assert gate.items == 1
    text = rs.metrics_text()
    assert metric_value(text, "camserve_dropped_total", reason="cancelled") == 1
    assert metric_value(text, "camserve_queue_depth") == 0


# ------------------------------------------------------------------ TLS and bearer token


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        pass
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs the openssl binary for a test certificate")
def test_tls_and_token(repo_root: Path, tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    cfg = _config(repo_root, tls_cert=str(cert), tls_key=str(key), token_file=str(token_file))
    with RunningServer(cfg) as rs:
        target = f"localhost:{rs.port}"
        roots = cert.read_bytes()
        with Client(target, token="s3cret", root_certificates=roots) as ok:
            assert ok.predict(np.zeros((32, 32, 3), np.uint8), model="gap").scores.shape == (1, 4)
        for token, detail in [(None, "missing bearer token"), ("wrong", "invalid bearer token")]:
            with Client(target, token=token, root_certificates=roots, retries=0) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.models()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and detail in e.value.details()
                assert c.health() == "SERVING"  # probes carry no token
                with pytest.raises(grpc.RpcError) as e:  # streaming calls are guarded too
                    list(c.explain_many([np.zeros((32, 32, 3), np.uint8)], model="gap"))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"127.0.0.1:{rs.port}", token="s3cret", retries=0, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as e:
                plain.models()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        text = rs.metrics_text()
        assert metric_value(text, "camserve_requests_total", method="ListModels", code="UNAUTHENTICATED") == 2


# ------------------------------------------------------------------ SIGTERM through `camserve serve`


def _serve_command(root: Path, *extra: str) -> list[str]:
    """``camserve serve`` on loopback, every port free (0); ``extra`` flags win over these."""
    ports = ["--port", "0", "--metrics-port", "0", "--http-port", "0"]
    return [sys.executable, "-m", "camserve", "serve", "--models", str(root), "--host", "127.0.0.1", *ports, *extra]


_CLI_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CAMSERVE_LOG_FORMAT="json")


def _start_cli(root: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        _serve_command(root, *extra), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_CLI_ENV
    )
    lines: list[str] = []
    listening: dict = {}

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("msg") == "listening":
                    listening.update(rec)

    threading.Thread(target=read, daemon=True).start()
    try:
        _wait(lambda: listening or proc.poll() is not None, 120, "the server to listen")
    except AssertionError:
        proc.kill()
        raise
    assert listening, "".join(lines)[-3000:]
    listening["log"] = lines
    return proc, listening


def _slow_dense(size: int) -> pb.DenseScoresRequest:
    """DenseScores in crops mode at stride 1 on ``size`` x ``size``: (size - 31)² forward passes of
    the tiny classifier, seconds of compute (about 6 s at 384 px on the 2-core machine of the
    recorded runs)."""
    img = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=wire.image_to_proto(img), stride=1, mode="crops")


def test_sigterm_drains_accepted_requests_then_exits_0(repo_root: Path) -> None:
    """A long DenseScores call holds the batch worker; 8 Predicts queue behind it; SIGTERM:
    health NOT_SERVING, new calls UNAVAILABLE, every accepted call answered, exit 0."""
    import urllib.request

    proc, info = _start_cli(repo_root, "--max-batch-size", "64", "--drain-timeout-s", "120")
    try:
        target = f"127.0.0.1:{info['port']}"
        with Client(target, retries=0, timeout=120) as c, grpc.insecure_channel(target) as ch:
            _wait(lambda: _health(c) == "SERVING", 180, "SERVING")

            def depth() -> float:
                with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=5) as r:
                    return metric_value(r.read().decode(), "camserve_queue_depth")

            slow = pb_grpc.CamServiceStub(ch).DenseScores.future(_slow_dense(384), timeout=300)
            results: list = [None] * 8
            img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)

            def one(i: int) -> None:
                try:
                    results[i] = c.predict(img, model="gap").scores
                except grpc.RpcError as e:
                    results[i] = e

            time.sleep(0.5)  # the dense call first
            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            _wait(lambda: depth() == 8, 30, "8 queued requests")  # behind the dense call
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: _health(c) != "SERVING", 10, "NOT_SERVING while draining")
            with pytest.raises(grpc.RpcError) as e:
                c.predict(img, model="gap")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            for t in threads:
                t.join(120)
            dense = slow.result()
        assert proc.wait(60) == 0
        assert all(isinstance(r, np.ndarray) and r.shape == (1, 4) for r in results), results
        np.testing.assert_allclose(np.concatenate(results), np.repeat(results[0], 8, axis=0), rtol=1e-6)
        assert list(dense.scales[0].scores.shape) == [353, 353, 4]
        logs = [json.loads(line) for line in info["log"] if line.startswith("{")]
        assert any(r["msg"] == "stopped" for r in logs)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deadline_stops_a_long_dense_call_and_the_next_request_is_served_at_once(repo_root: Path) -> None:
    """Issue 9: work went on after the deadline (a 1 s DenseScores call delayed the next
    request by 13 s). A call of several seconds with a 1 s deadline: DEADLINE_EXCEEDED, the
    batch worker is free again at once, the next request is answered."""
    with RunningServer(_config(repo_root)) as rs, grpc.insecure_channel(rs.target) as ch:
        stub = pb_grpc.CamServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.DenseScores(_slow_dense(512), timeout=1.0)  # about 11 s of compute
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait(lambda: not rs.server.batcher.busy, 5, "the expired call to stop computing")
        assert len(stub.Predict(_request(), timeout=5).predictions) == 1


def test_sigterm_during_a_long_call_exits_within_the_drain_timeout(repo_root: Path) -> None:
    """A DenseScores call of about half a minute; SIGTERM with a 2 s drain time: the call is
    stopped at the engine's next checkpoint (UNAVAILABLE) and the process exits 0 long before
    the call would have ended (issue 9: a 1 s call used to delay exit by 15 s)."""
    proc, info = _start_cli(repo_root, "--drain-timeout-s", "2")
    try:
        target = f"127.0.0.1:{info['port']}"
        with Client(target, retries=0, timeout=60) as c, grpc.insecure_channel(target) as ch:
            _wait(lambda: _health(c) == "SERVING", 180, "SERVING")
            slow = pb_grpc.CamServiceStub(ch).DenseScores.future(_slow_dense(768), timeout=600)
            time.sleep(2.0)  # computing
            assert not slow.done()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            exit_s = time.monotonic() - t0
            with pytest.raises(grpc.RpcError) as e:
                slow.result()
        assert code == 0
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e.value
        assert exit_s < 12, f"exit took {exit_s:.1f} s after SIGTERM with drain_timeout_s=2"
    finally:
        if proc.poll() is None:
            proc.kill()


def _health(c: Client) -> str:
    try:
        return c.health(timeout=2)
    except grpc.RpcError as e:
        return e.code().name


# ------------------------------------------------------------------ configuration sources


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_a_port_in_use_is_named_and_nothing_is_left_running(repo_root: Path, flag: str) -> None:
    """A port already taken: exit 2 with one line naming the address and the flag. For the
    metrics and HTTP ports it said only "[Errno 98] Address already in use" (the HTTP API's
    8080 is taken by a second server started with only --port changed), and the gRPC server
    already started was left behind: a traceback at exit ("Event loop is closed")."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            _serve_command(repo_root, flag, str(port)), capture_output=True, text=True, env=_CLI_ENV, timeout=300
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"camserve serve: error: could not listen on 127.0.0.1:{port} ({flag}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "never awaited" not in done.stderr, done.stderr[-2000:]


def _tracked(obj) -> bool:
    """Whether ``obj`` is in one of the garbage collector's generations (not frozen)."""
    return any(o is obj for o in gc.get_objects())


def test_heap_frozen_once_warm_and_given_back_on_stop(repo_root: Path) -> None:
    """A full garbage collection walks every object alive holding the GIL: with the models
    loaded, ~0.1 s (one small model) during which no request moves, and the first came
    seconds after serving began (a 150 ms stall in the bench's first run). With gc_freeze (the
    default) what is alive at readiness, the loaded models among it, is left out of later
    collections; stop() gives it back, so a process that goes on can free the models.
    gc_freeze=false leaves the collector as it was."""
    gc.unfreeze()
    with RunningServer(_config(repo_root)) as rs:
        model = rs.server.runtimes.ready_versions("gap")[2].default_explainer.model
        assert gc.get_freeze_count() > 0 and not _tracked(model)
        with Client(rs.target, timeout=30) as client:  # made after the freeze: collected as usual
            assert client.predict([np.zeros((32, 32, 3), np.uint8)], "gap").scores.shape == (1, 4)
    assert gc.get_freeze_count() == 0 and _tracked(model)
    with RunningServer(_config(repo_root, gc_freeze=False)) as rs:
        model = rs.server.runtimes.ready_versions("gap")[2].default_explainer.model
        assert gc.get_freeze_count() == 0 and _tracked(model)


def test_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nport = 9100\nmax_batch_size = 16\nwarmup_methods = ["gradcam", "cam"]\n')
    cfg = ServerConfig.load(
        toml, env={"CAMSERVE_MAX_BATCH_SIZE": "8", "CAMSERVE_BATCH_TIMEOUT_MS": "2.5"}, overrides={"max_batch_size": 4}
    )
    assert (cfg.port, cfg.max_batch_size, cfg.batch_timeout, cfg.warmup_methods) == (
        9100,
        4,
        0.0025,
        ["gradcam", "cam"],
    )
    env_only = ServerConfig.load(env={"CAMSERVE_CONFIG": str(toml), "CAMSERVE_WARMUP_METHODS": "cam, layercam"})
    assert env_only.port == 9100 and env_only.warmup_methods == ["cam", "layercam"]


@pytest.mark.parametrize(
    "source,match",
    [
        ({"env": {"CAMSERVE_PORT": "eighty"}}, "CAMSERVE_PORT: 'eighty' is not a valid int"),
        ({"overrides": {"max_batch_size": 0}}, "max_batch_size must be >= 1"),
        ({"overrides": {"tls_cert": "c.pem"}}, "TLS needs both"),
        ({"overrides": {"nonsense": 1}}, "unknown setting 'nonsense'"),
    ],
)
def test_config_errors(source: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig.load(env=source.get("env", {}), overrides=source.get("overrides"))


def test_config_toml_typo_rejected(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_batch = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'max_batch'"):
        ServerConfig.load(toml, env={})


def test_token_masked_in_public_dict() -> None:
    assert ServerConfig.load(env={}, overrides={"token": "abc"}).public_dict()["token"] == "***"
