"""Accelerator settings of the server (issue 9 item 7): GPU memory growth at start-up for every
visible GPU (fake GPUs here: a no-op on this CPU machine), device names, and the precision /
XLA / device / memory-growth settings as flags, environment and TOML, down to the explainers
the server builds; TensorFlow's thread pools (intra_op_threads / inter_op_threads, TF Serving's
--tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism) set before TensorFlow
starts, and a warning, not a crash, when it already has."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from camserve import accelerator
from camserve.cli import build_parser
from camserve.errors import InvalidArgument
from camserve.serving import config as server_config


class FakeGPU:
    def __init__(self, name: str) -> None:
        self.name = name
        self.device_type = "GPU"


@pytest.fixture
def growth_calls(monkeypatch):
    """set_memory_growth calls recorded (TensorFlow's own would refuse a fake device)."""
    calls: list[tuple[str, bool]] = []

    def record(device, enable):
        if device.name.endswith("busy"):
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        calls.append((device.name, enable))

    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", record)
    return calls


def test_memory_growth_is_set_for_every_visible_gpu(monkeypatch, growth_calls) -> None:
    fakes = [FakeGPU("/physical_device:GPU:0"), FakeGPU("/physical_device:GPU:1")]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fakes if kind == "GPU" else [])
    assert accelerator.configure(gpu_memory_growth=True) == [f.name for f in fakes]
    assert growth_calls == [(f.name, True) for f in fakes]
    growth_calls.clear()
    assert accelerator.configure(gpu_memory_growth=False) == [] and growth_calls == []


def test_a_gpu_already_initialised_is_skipped_not_fatal(growth_calls) -> None:
    fakes = [FakeGPU("/physical_device:GPU:0-busy"), FakeGPU("/physical_device:GPU:1")]
    assert accelerator.set_memory_growth(fakes) == ["/physical_device:GPU:1"]
    assert growth_calls == [("/physical_device:GPU:1", True)]


def test_no_gpu_is_a_no_op(monkeypatch, growth_calls) -> None:
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert accelerator.configure() == [] and growth_calls == []


def test_the_server_sets_memory_growth_before_loading_models(monkeypatch, growth_calls, tmp_path: Path) -> None:
    from camserve.serving.server import CamServer

    fakes = [FakeGPU("/physical_device:GPU:0")]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fakes if kind == "GPU" else [])
    loaded: list[int] = []
    import camserve.serving.server as server_module

    class Repo(server_module.ModelRepository):
        def __init__(self, *args, **kwargs):
            loaded.append(len(growth_calls))  # how many GPUs were set when the repository was made
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(server_module, "ModelRepository", Repo)
    CamServer(server_config.ServerConfig(models=str(tmp_path), port=0, metrics_port=-1))
    assert growth_calls == [("/physical_device:GPU:0", True)] and loaded == [1]
    growth_calls.clear()
    CamServer(server_config.ServerConfig(models=str(tmp_path), port=0, metrics_port=-1, gpu_memory_growth=False))
    assert growth_calls == []


def test_device_names() -> None:
    assert accelerator.check_device("gpu:0") == "/GPU:0" and accelerator.check_device("/CPU:0") == "/CPU:0"
    assert accelerator.check_device("auto") == "auto" and accelerator.check_device("") is None
    assert accelerator.resolve_device("auto", visible_gpus=[]) is None  # the CPU, TensorFlow's placement
    assert accelerator.resolve_device("auto", visible_gpus=[FakeGPU("g")]) == "/GPU:0"
    assert accelerator.resolve_device("/GPU:1", visible_gpus=[FakeGPU("a"), FakeGPU("b")]) == "/GPU:1"
    with pytest.raises(InvalidArgument, match="1 GPU"):
        accelerator.resolve_device("/GPU:1", visible_gpus=[FakeGPU("a")])
    for bad in ("gpu", "/TPU:0", "/GPU:-1", "cuda:0"):
        with pytest.raises(InvalidArgument, match="device must be auto"):
            accelerator.check_device(bad)


def test_settings_from_flags_environment_and_toml(tmp_path: Path) -> None:
    default = server_config.ServerConfig()
    assert (default.precision, default.xla, default.device, default.gpu_memory_growth) == (
        "float32",
        False,
        "auto",
        True,
    )
    args = build_parser().parse_args(
        ["serve", "--xla", "--precision", "mixed_float16", "--device", "/GPU:0", "--gpu-memory-growth", "false"]
    )
    cfg = server_config.from_args(args, env={})
    assert (cfg.precision, cfg.xla, cfg.device, cfg.gpu_memory_growth) == ("mixed_float16", True, "/GPU:0", False)
    assert server_config.from_args(build_parser().parse_args(["serve", "--xla", "false"]), env={}).xla is False
    env = {"CAMSERVE_PRECISION": "mixed_bfloat16", "CAMSERVE_XLA": "true", "CAMSERVE_DEVICE": "/CPU:0"}
    cfg = server_config.ServerConfig.load(env=env)
    assert (cfg.precision, cfg.xla, cfg.device) == ("mixed_bfloat16", True, "/CPU:0")
    toml = tmp_path / "serve.toml"
    toml.write_text('precision = "mixed_float16"\nxla = true\ngpu_memory_growth = false\n')
    cfg = server_config.ServerConfig.load(toml, env={})
    assert (cfg.precision, cfg.xla, cfg.gpu_memory_growth) == ("mixed_float16", True, False)
    with pytest.raises(InvalidArgument, match="unknown precision 'float16'"):
        server_config.ServerConfig.load(env={"CAMSERVE_PRECISION": "float16"})
    with pytest.raises(InvalidArgument, match="device must be auto"):
        server_config.ServerConfig.load(overrides={"device": "gpu"})
    with pytest.raises(InvalidArgument, match="max_graphs must be >= 1"):
        server_config.ServerConfig.load(env={"CAMSERVE_MAX_GRAPHS": "0"})


def test_the_runtime_builds_explainers_with_the_settings(tmp_path: Path) -> None:
    from helpers_serving import make_repository

    from camserve.serving.repository import ModelRepository
    from camserve.serving.runtime import ExplainerSettings, ModelRuntime

    cfg = server_config.ServerConfig.load(
        env={},
        overrides={"precision": "mixed_float16", "xla": True, "device": "/CPU:0", "max_batch_size": 2, "max_graphs": 5},
    )
    settings = ExplainerSettings.from_config(cfg)
    assert settings.dense_options() == {"precision": "mixed_float16", "device": "/CPU:0"}
    repo = ModelRepository(make_repository(tmp_path / "models", corrupt=False))
    repo.load(["gap"])
    runtime = ModelRuntime(repo.get("gap", 1), settings)
    runtime.warm_up()
    ex = runtime.default_explainer
    assert (ex.precision, ex.jit_compile, ex.device, ex.max_graphs) == ("mixed_float16", True, "/CPU:0", 5)
    assert ex.model is not runtime.entry.model and ex.source_model is runtime.entry.model
    assert runtime.dense is not None and runtime.dense.stride is not None  # DenseScores warmed up in half


def test_thread_settings_from_flags_environment_and_toml(tmp_path: Path) -> None:
    default = server_config.ServerConfig()
    assert (default.intra_op_threads, default.inter_op_threads) == (0, 0)
    args = build_parser().parse_args(["serve", "--intra-op-threads", "1", "--inter-op-threads", "2"])
    cfg = server_config.from_args(args, env={})
    assert (cfg.intra_op_threads, cfg.inter_op_threads) == (1, 2)
    cfg = server_config.ServerConfig.load(env={"CAMSERVE_INTRA_OP_THREADS": "3", "CAMSERVE_INTER_OP_THREADS": "4"})
    assert (cfg.intra_op_threads, cfg.inter_op_threads) == (3, 4)
    toml = tmp_path / "serve.toml"
    toml.write_text("intra_op_threads = 5\ninter_op_threads = 6\n")
    cfg = server_config.ServerConfig.load(toml, env={"CAMSERVE_INTER_OP_THREADS": "7"})
    assert (cfg.intra_op_threads, cfg.inter_op_threads) == (5, 7)  # the environment wins over the file
    with pytest.raises(InvalidArgument, match=r"intra_op_threads must be >= 0 \(0: TensorFlow's choice\), got -1"):
        server_config.ServerConfig.load(env={"CAMSERVE_INTRA_OP_THREADS": "-1"})
    with pytest.raises(InvalidArgument, match=r"inter_op_threads must be >= 0 \(0: TensorFlow's choice\), got -2"):
        server_config.from_args(build_parser().parse_args(["serve", "--inter-op-threads", "-2"]), env={})
    with pytest.raises(InvalidArgument, match="CAMSERVE_INTER_OP_THREADS: 'two' is not a valid int"):
        server_config.ServerConfig.load(env={"CAMSERVE_INTER_OP_THREADS": "two"})


def test_serve_help_lists_the_thread_settings(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, tf_serving in (
        ("--intra-op-threads", "--tensorflow_intra_op_parallelism"),
        ("--inter-op-threads", "--tensorflow_inter_op_parallelism"),
    ):
        assert flag in shown and tf_serving in shown


def test_thread_pools_are_set_before_tensorflow_starts() -> None:
    """A fresh process: configure() before any op, then TensorFlow runs with those pools (and
    OpenCV with intra_op_threads threads per call)."""
    code = (
        "from camserve import accelerator\n"
        "assert accelerator.configure(gpu_memory_growth=False, intra_op_threads=1, inter_op_threads=2) == []\n"
        "import tensorflow as tf\n"
        "tf.reduce_sum(tf.ones((4, 4))).numpy()\n"  # the runtime starts with them
        "import cv2\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads(), cv2.getNumThreads())\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "2", "1"]  # OpenCV's threads per call follow intra_op_threads


@pytest.fixture(autouse=True)
def _opencv_threads_restored():
    """set_threads sets OpenCV's process-wide thread count: give later tests theirs back."""
    import cv2

    before = cv2.getNumThreads()
    yield
    cv2.setNumThreads(before)


@pytest.fixture
def accelerator_log(monkeypatch, caplog):
    """camserve.accelerator's records (configure_logging elsewhere may stop camserve.* propagating)."""
    monkeypatch.setattr(logging.getLogger("camserve"), "propagate", True)
    caplog.set_level(logging.INFO, logger="camserve.accelerator")
    return caplog


def test_a_thread_setting_refused_after_start_is_a_warning(accelerator_log) -> None:
    tf.reduce_sum(tf.ones((2, 2))).numpy()  # TensorFlow's runtime has started in this process
    current = tf.config.threading.get_intra_op_parallelism_threads()
    wish = current + 3
    assert accelerator.configure(gpu_memory_growth=False, intra_op_threads=wish) == []
    assert tf.config.threading.get_intra_op_parallelism_threads() == current
    (record,) = [r for r in accelerator_log.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert f"intra_op_threads = {wish} not applied" in message and f"started with {current}" in message
    assert "before TensorFlow starts" in message
    assert (record.setting, record.asked, record.in_effect) == ("intra_op_threads", wish, current)


def test_a_refused_setting_already_in_effect_is_silent(monkeypatch, accelerator_log) -> None:
    def refuse(n):
        raise RuntimeError("Inter op parallelism cannot be modified after initialization.")

    monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", refuse)
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 2)
    assert accelerator.set_threads(inter_op_threads=2) == {}
    assert not [r for r in accelerator_log.records if r.levelno >= logging.WARNING]
    assert accelerator.set_threads(inter_op_threads=1) == {}
    (record,) = [r for r in accelerator_log.records if r.levelno == logging.WARNING]
    assert "inter_op_threads = 1 not applied: TensorFlow already started with 2" in record.getMessage()


def test_the_server_sets_the_thread_pools_from_its_config(monkeypatch, tmp_path: Path) -> None:
    from camserve.serving.server import CamServer

    calls: list[tuple[str, int]] = []
    for pool in ("intra", "inter"):
        name = f"set_{pool}_op_parallelism_threads"
        monkeypatch.setattr(tf.config.threading, name, lambda n, name=name: calls.append((name, n)))
    cfg = dict(models=str(tmp_path), port=0, metrics_port=-1, gpu_memory_growth=False)
    CamServer(server_config.ServerConfig(**cfg, intra_op_threads=1, inter_op_threads=3))
    assert calls == [("set_intra_op_parallelism_threads", 1), ("set_inter_op_parallelism_threads", 3)]
    calls.clear()
    CamServer(server_config.ServerConfig(**cfg))  # 0 and 0: TensorFlow's choice, nothing set
    assert calls == []
