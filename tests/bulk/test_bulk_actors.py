"""camserve.bulk.actors in this process (no Ray): an ExplainActor's rows equal the in-process
Explainer's explanations (scores, raw maps, boxes scaled to the image), error rows for bad
images, dense rows equal dense_scores, and the actor resources chosen per cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from camserve import Explainer, imaging
from camserve.bulk import output
from camserve.bulk.actors import BulkSettings, ExplainActor, actor_resources, default_batch_size, model_batch_size


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """shapes_gap loaded independently of camserve.bulk, and its Explainer."""
    import keras

    from camserve.serving.repository import ModelConfig

    cfg = ModelConfig.from_toml(model_dir / "config.toml")
    model = keras.models.load_model(model_dir / "1" / "model.keras", compile=False)
    return cfg, model, Explainer(model, layer=cfg.default_layer, class_names=cfg.class_names)


def test_rows_equal_the_in_process_explainer(images: Path, tmp_path: Path, model_dir: Path, reference) -> None:
    cfg, _, ex = reference
    big = images / "star_big.png"  # another size: boxes are scaled to its pixels
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(images / "star.png")), (96, 80)))
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    paths = [str(images / n) for n in ("circle.png", "bad.png", "star_big.png", "three_shapes.png")]
    settings = BulkSettings(
        model_dir=str(model_dir), out=str(tmp_path / "out"), methods=("gradcam", "cam"), top_k=2, batch_size=4
    )
    actor = ExplainActor(settings)
    summary = actor({"image": np.array(paths, object), "location": np.array(paths, object)})
    assert list(summary["rows"]) == [4, 1, 4, 4]
    assert list(summary["failed"]) == [False, True, False, False]

    rows = output.read_explanations(settings.out).to_pylist()
    assert sorted({r["image"] for r in rows}) == sorted(paths)
    (bad,) = [r for r in rows if r["image"].endswith("bad.png")]
    assert bad["error"].startswith(f"{paths[1]}: corrupt or truncated PNG") and bad["method"] is None
    for path in paths[:1] + paths[2:]:
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        x = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        expected = ex.explain(x[None], methods=("gradcam", "cam"), top_k=2)[0]
        got = [r for r in rows if r["image"] == path]
        assert [(r["method"], r["class_index"], r["label"]) for r in got] == [
            (e.method, e.class_index, e.label) for e in expected
        ]
        for r, e in zip(got, expected):
            assert r["error"] is None and (r["height"], r["width"]) == rgb.shape[:2]
            assert r["score"] == pytest.approx(e.score, abs=1e-6)
            np.testing.assert_allclose(output.raw_map(r), e.raw, rtol=1e-5, atol=1e-6)
            # the pixels covering the heatmap's box, by hand: floor of the first edges, ceil of the last
            (h, w), (x0, y0, x1, y1) = rgb.shape[:2], e.box
            expected_box = [x0 * w // 64, y0 * h // 64, -(-x1 * w // 64), -(-y1 * h // 64)]
            assert r["box"] == expected_box


def test_targets_overlays_and_dense_rows(images: Path, tmp_path: Path, model_dir: Path, reference) -> None:
    from camserve.dense import dense_scores

    cfg, model, ex = reference
    wide = images / "wide.png"  # larger than the window: a grid of windows
    cv2.imwrite(str(wide), np.concatenate([cv2.imread(str(images / n)) for n in ("star.png", "cross.png")], axis=1))
    settings = BulkSettings(
        model_dir=str(model_dir),
        out=str(tmp_path / "out"),
        targets=("cross", 3),
        batch_size=2,
        overlays=True,
        dense=True,
    )
    path = str(wide)
    ExplainActor(settings)({"image": np.array([path], object), "location": np.array([path], object)})
    rows = output.read_explanations(settings.out).to_pylist()
    assert [(r["method"], r["label"]) for r in rows] == [
        ("gradcam", "cross"),
        ("gradcam", "star"),
        ("dense", "cross"),
        ("dense", "star"),
    ]
    rgb = imaging.read_image(wide)
    explained = ex.explain(imaging.model_input(rgb, cfg)[None], targets=[[4, 3]])[0]
    for r, e in zip(rows[:2], explained):
        png = imaging.read_image(tmp_path / "out" / "overlays" / r["overlay"])
        np.testing.assert_array_equal(png, imaging.overlay(rgb, e.heatmap, box=e.box))
    x = rgb.astype(np.float32) / 255.0
    level = dense_scores(model, x)[0]
    assert level.scores.shape[:2] != (1, 1)
    for r in rows[2:]:
        grid = level.scores[..., r["class_index"]]
        np.testing.assert_allclose(output.raw_map(r), grid, rtol=1e-5, atol=1e-6)
        assert r["score"] == pytest.approx(float(grid.max()), abs=1e-6)
        best = np.unravel_index(np.argmax(grid), grid.shape)
        assert r["box"] == [int(v) for v in level.boxes[best]]


def test_actor_resources_and_batch_size(model_dir: Path) -> None:
    assert actor_resources({"CPU": 16.0, "GPU": 4.0}, 2) == {"num_cpus": 1, "num_gpus": 1, "min_size": 1, "max_size": 4}
    assert actor_resources({"CPU": 16.0}, 4) == {"num_cpus": 4, "num_gpus": 0, "min_size": 1, "max_size": 4}
    assert actor_resources({"CPU": 16.0}, 4, max_actors=8)["max_size"] == 8
    assert actor_resources({"CPU": 16.0}, 4, min_actors=2)["min_size"] == 2
    assert actor_resources({"CPU": 16.0}, 4, min_actors=9)["min_size"] == 4  # never above the largest pool
    assert actor_resources({"CPU": 1.0}, 4) == {"num_cpus": 1, "num_gpus": 0, "min_size": 1, "max_size": 1}
    for shape in [(64, 64, 3), (224, 224, 3), (512, 512, 3), (4000, 4000, 3)]:
        size = default_batch_size(shape)
        values = size * int(np.prod(shape))
        assert size == 1 or values <= 1 << 22
        assert size in (1, 2, 4, 8, 16, 32, 64) and (size == 64 or 2 * values > 1 << 22)
    settings = BulkSettings(model_dir=str(model_dir), out="o")
    assert model_batch_size(settings) == default_batch_size((64, 64, 3))


def test_targets_layers_and_smoothing_as_camserve_explain(images: Path, tmp_path: Path, model_dir: Path, reference):
    from camserve.cli.options import parse_targets

    cfg, model, _ = reference
    targets = tuple(parse_targets(["regression:3", "circle"]))
    settings = BulkSettings(
        model_dir=str(model_dir),
        out=str(tmp_path / "out"),
        targets=targets,
        layer=("conv3b_relu", "last_conv"),
        aug_smooth=True,
        batch_size=2,
    )
    path = str(images / "star.png")
    ExplainActor(settings)({"image": np.array([path], object), "location": np.array([path], object)})
    rows = output.read_explanations(settings.out).to_pylist()
    fused = Explainer(model, layer=["conv3b_relu", "last_conv"], class_names=cfg.class_names)
    x = imaging.model_input(imaging.read_image(path), cfg)[None]
    expected = fused.explain(x, targets=[list(targets)], aug_smooth=True)[0]
    assert [(r["class_index"], r["label"]) for r in rows] == [(e.class_index, e.label) for e in expected]
    for r, e in zip(rows, expected):
        assert r["score"] == pytest.approx(e.score, abs=1e-6)
        np.testing.assert_allclose(output.raw_map(r), e.raw, rtol=1e-5, atol=1e-6)


def reshape_head_model(folder: Path) -> Path:
    """A classifier whose head (Reshape → Dense) cannot be made fully convolutional."""
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_conv")(inp)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Reshape((6 * 6 * 4,), name="reshape")(x))
    (folder / "1").mkdir(parents=True)
    keras.Model(inp, out).save(folder / "1" / "model.keras")
    (folder / "config.toml").write_text('class_names = ["a", "b", "c"]\ninput_size = [8, 8]\n')
    return folder


def test_an_actor_that_cannot_start_writes_nothing_and_sends_its_error(tmp_path: Path, model_dir: Path) -> None:
    import pickle

    from camserve.cli.options import parse_targets
    from camserve.errors import CamserveError

    reshape = reshape_head_model(tmp_path / "reshape")
    for bad, says in [
        (BulkSettings(model_dir=str(model_dir), out="a", targets=tuple(parse_targets(["regression:9"]))), "9"),
        (BulkSettings(model_dir=str(model_dir), out="b", layer="no_such_layer"), "no_such_layer"),
        (BulkSettings(model_dir=str(reshape), out="c", dense=True), "cannot convert head layer 'reshape'"),
    ]:
        actor = ExplainActor(dataclasses.replace(bad, out=str(tmp_path / bad.out)))
        summary = actor({"image": np.array(["x.png"], object), "location": np.array(["x.png"], object)})
        error = pickle.loads(summary["setup_error"][0])
        assert isinstance(error, CamserveError) and says in str(error)
        assert not (tmp_path / bad.out).exists()


def test_segmentation_masks_are_resized_to_the_output_as_camserve_explain_does(tmp_path: Path) -> None:
    """A mask PNG of twice the output's size (2 × 2 blocks): the actor explains the mask that
    nearest-neighbour resizing gives, i.e. every other pixel, as Explainer does with that mask."""
    import keras

    from camserve.cli.options import parse_targets
    from camserve.targets import SegmentationTarget

    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="feat")(inp)
    model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Conv2D(3, 1, name="seg_logits")(x)))
    folder = tmp_path / "seg"
    (folder / "1").mkdir(parents=True)
    model.save(folder / "1" / "model.keras")
    (folder / "config.toml").write_text(
        'class_names = ["a", "b", "c"]\ninput_size = [16, 16]\npreprocessing = "scale_0_1"\ndefault_layer = "feat"\n'
    )
    small = np.zeros((16, 16), np.float32)
    small[3:11, 5:14] = 1.0
    mask_png = tmp_path / "mask.png"
    cv2.imwrite(str(mask_png), np.repeat(np.kron(small, np.ones((2, 2)))[..., None] * 255, 3, axis=-1))
    image = tmp_path / "img.png"
    rgb = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(image), rgb[..., ::-1])

    targets = tuple(parse_targets([f"segmentation:b:{mask_png}"]) or ())
    settings = BulkSettings(model_dir=str(folder), out=str(tmp_path / "out"), targets=targets, batch_size=1)
    summary = ExplainActor(settings)({"image": np.array([str(image)], object), "location": np.array([str(image)])})
    assert not summary["setup_error"][0] and list(summary["rows"]) == [1]
    (got,) = output.read_explanations(settings.out).to_pylist()
    x = cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    (expected,) = Explainer(model, layer="feat").explain(x[None], targets=[[SegmentationTarget(1, small)]])[0]
    assert got["error"] is None and got["class_index"] == 1
    assert got["score"] == pytest.approx(expected.score, rel=1e-5)
    np.testing.assert_allclose(output.raw_map(got), expected.raw, rtol=1e-5, atol=1e-6)
