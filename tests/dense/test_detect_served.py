"""DenseScores with detect through a real gRPC server and the Python client: the bundled
shapes_fc's detections (windows and tight boxes from shapes_gap's CAM, as its config.toml
says) equal camserve.dense.detect in process, request overrides reach the engine, and bad
settings are INVALID_ARGUMENT naming what is allowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config

from camserve.client import Client

MODELS = Path(__file__).resolve().parents[2] / "models"
pytestmark = pytest.mark.skipif(
    not (MODELS / "shapes_fc" / "1" / "model.keras").is_file(), reason="bundled models not built"
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("shapes_fc", "shapes_gap"):
        shutil.copytree(MODELS / name, root / name)
    return root


@pytest.fixture(scope="module")
def client(repo: Path):
    config = local_config(repo, max_message_mb=8.0)
    with RunningServer(config) as rs, Client(rs.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def scene():
    from camserve.datasets import shapes

    return shapes.make_scenes(1, 616_161, (256, 256), n_shapes=4)[0]


def _in_process(repo: Path, image: np.ndarray, **overrides):
    from camserve import imaging
    from camserve.datasets.detection_figures import load_detector
    from camserve.dense import detect

    entry, settings, explainer = load_detector(repo / "shapes_fc")
    x = imaging.model_input(image, entry.config, resize_to_input=False)
    return detect(entry.model, x, settings.with_overrides(**overrides), entry.config.class_names, explainer)


def _same(got, want) -> None:
    assert [d.label for d in got] == [d.label for d in want.detections]
    for g, w in zip(got, want.detections):
        assert g.score == pytest.approx(w.score, abs=1e-5) and g.scale == pytest.approx(w.scale)
        np.testing.assert_allclose(g.box, w.box, atol=1e-3)
        assert (g.tight_box is None) == (w.tight_box is None)
        if w.tight_box is not None:
            np.testing.assert_allclose(g.tight_box, w.tight_box, atol=1e-3)


def test_detections_equal_in_process(client: Client, repo: Path, scene) -> None:
    reply = client.dense(scene.image, model="shapes_fc", detect=True)
    want = _in_process(repo, scene.image)
    assert reply.background_class == "background" and reply.margin == want.settings.margin
    assert [s.scale for s in reply] == pytest.approx(list(want.settings.scales))  # the config's pyramid
    _same(reply.detections, want)
    assert len(reply.detections) >= 3 and all(d.tight_box is not None for d in reply.detections)
    plain = client.dense(scene.image, model="shapes_fc")
    assert plain.detections == [] and [s.scale for s in plain] == [1.0]


def test_overrides_reach_the_engine(client: Client, repo: Path, scene) -> None:
    reply = client.dense(scene.image, model="shapes_fc", detect=True, nms="per_class", tight_boxes=False, threshold=0.9)
    want = _in_process(repo, scene.image, nms="per_class", tight_boxes=False, threshold=0.9)
    _same(reply.detections, want)
    assert all(d.tight_box is None for d in reply.detections)


def test_bad_settings_are_invalid_argument(client: Client, scene) -> None:
    with pytest.raises(Exception) as e:
        client.dense(scene.image, model="shapes_fc", detect=True, iou=0.0)
    err = e.value
    code = err.code() if isinstance(err, grpc.RpcError) else getattr(err, "code", None)
    assert "INVALID_ARGUMENT" in str(code) or type(err).__name__ == "InvalidArgument"
    assert "iou" in str(err) and "(0, 1]" in str(err)
