"""Models at run time (camserve.serving.runtime): loading, warm-up, readiness, explainers
per layer; a version whose warm-up fails is unavailable with its reason, the others serve."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, save_model, tiny_gap

from camserve import errors
from camserve.client import Client
from camserve.serving.config import ServerConfig
from camserve.serving.repository import ModelRepository, ModelUnavailable
from camserve.serving.runtime import ExplainerSettings, ModelRuntime, ModelRuntimes


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_model(root, "gap", 1, tiny_gap(1))
    save_model(root, "gap", 2, tiny_gap(2))
    return root


def test_settings_from_config() -> None:
    cfg = ServerConfig.load(
        env={}, overrides=dict(chunk_size=8, max_channels=0, max_batch_size=4, warmup_methods=["cam"])
    )
    assert ExplainerSettings.from_config(cfg) == ExplainerSettings(
        chunk_size=8, max_channels=None, max_batch_size=4, warmup_methods=("cam",)
    )


def test_load_all_warms_up_every_version(repo_root: Path) -> None:
    repo = ModelRepository(repo_root)
    runtimes = ModelRuntimes(repo, ExplainerSettings(max_batch_size=2))
    with pytest.raises(ModelUnavailable, match="is still loading|unavailable"):
        runtimes.get("gap", 1)
    events: list[tuple[str, bool]] = []

    async def on_model(name: str, available: bool) -> None:
        events.append((name, available))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        asyncio.run(runtimes.load_all(pool, on_model))
    assert events == [("gap", True)]
    assert list(runtimes.ready_versions("gap")) == [1, 2]
    rt = runtimes.get("gap")
    assert (rt.name, rt.version, rt.ready) == ("gap", 2, True)
    assert "cam" in rt.methods and "last_conv" in rt.layers
    assert rt.default_explainer.layer_name == "last_conv"
    first = rt.layers[0]
    ex = rt.explainer(first)
    assert ex.layer_name == first and rt.explainer(first) is ex  # built once, then cached
    with pytest.raises(errors.NotFound, match="unknown layer 'nope'"):
        rt.explainer("nope")


def test_runtime_not_warmed_up_is_unavailable(repo_root: Path) -> None:
    repo = ModelRepository(repo_root)
    repo.load()
    runtimes = ModelRuntimes(repo, ExplainerSettings())
    with pytest.raises(ModelUnavailable, match="model 'gap' version 2 is warming up; retry shortly"):
        runtimes.get("gap")
    with pytest.raises(errors.NotFound, match="unknown model 'other'"):
        runtimes.get("other")


def test_failed_warm_up_makes_only_that_version_unavailable(repo_root: Path, monkeypatch) -> None:
    real = ModelRuntime.warm_up

    def warm_up(self: ModelRuntime) -> None:
        if self.version == 1:
            raise RuntimeError("out of device memory")
        real(self)

    monkeypatch.setattr(ModelRuntime, "warm_up", warm_up)
    cfg = local_config(repo_root, metrics_port=-1, http_port=-1)
    with RunningServer(cfg) as rs, Client(rs.target, retries=0, timeout=30) as c:
        info = c.model("gap")
        assert info["available"] and info["available_versions"] == ["2"]
        assert "version 1: warm-up failed: RuntimeError: out of device memory" in info["reason"]
        with pytest.raises(grpc.RpcError) as e:
            c.predict(np.zeros((32, 32, 3), np.uint8), model="gap", version=1)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "warm-up failed" in e.value.details()
        assert c.predict(np.zeros((32, 32, 3), np.uint8), model="gap").model == ("gap", 2)
        assert c.health("gap") == "SERVING"
        status = rs.server.repository.status("gap")
        assert sorted(status.entries) == [2] and 1 in status.errors


def test_explainers_per_layer_are_bounded_least_recently_used_first(repo_root: Path) -> None:
    """Issue 9: an explainer (and its compiled graphs) was kept for every layer ever asked for."""
    repo = ModelRepository(repo_root)
    runtimes = ModelRuntimes(repo, ExplainerSettings(max_batch_size=2, max_layers_cached=2))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        asyncio.run(runtimes.load_all(pool))
    rt = runtimes.get("gap")
    a, b, c = rt.layers[:3]
    ex_a = rt.explainer(a)
    rt.explainer(b)
    assert rt.explainer(a) is ex_a  # a used last
    rt.explainer(c)  # b goes
    assert [k for k in rt.explainers if k] == [a, c]
    assert rt.explainer(a) is ex_a and rt.explainers[""] is rt.default_explainer
    assert rt.dense is not None and rt.dense.window == (32, 32)
