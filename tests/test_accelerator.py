"""Accelerator settings of the server (issue 9 item 7): GPU memory growth at start-up for every
visible GPU (fake GPUs here: a no-op on this CPU machine), device names, and the precision /
XLA / device / memory-growth settings as flags, environment and TOML, down to the explainers
the server builds."""

from __future__ import annotations

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
