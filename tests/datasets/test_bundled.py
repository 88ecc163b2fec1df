"""The committed bundled models: loading, configs, accuracy and CAM localization on fresh scenes,
and the training command's determinism (on a tiny recipe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from camserve.datasets import bundled, shapes  # noqa: E402
from camserve.serving.repository import load_model_dir  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"
FRESH_SEED = 424_242  # never used by train-bundled (its seeds are 1000 * seed + 0..4 and 500..504)


@pytest.fixture(scope="module", params=["shapes_gap", "shapes_fc"])
def entry(request):
    return load_model_dir(MODELS / request.param)  # safe_mode=True


def test_config_matches_model(entry) -> None:
    cfg, model = entry.config, entry.model
    assert cfg.name == entry.name
    recipe = bundled.RECIPES[entry.name]
    assert list(cfg.class_names) == list(shapes.CLASS_NAMES) + ([recipe.background] if recipe.background else [])
    assert cfg.extra.get("background_class") == recipe.background
    assert tuple(model.input_shape[1:]) == (*cfg.input_size, cfg.channels)
    assert model.output_shape[-1] == len(cfg.class_names)
    assert cfg.preprocessing == "scale_0_1"
    assert not any(isinstance(layer, keras.layers.Rescaling) for layer in model.layers)
    model.get_layer(cfg.default_layer)  # raises if the configured layer is missing
    metrics = cfg.extra["metrics"]
    # shapes_fc: single centred shapes of 16-48 px, where a small one called background counts as wrong
    assert metrics["test_accuracy"] >= (0.93 if recipe.background else 0.95)
    assert cfg.extra["training"]["command"].startswith("camserve train-bundled")


def test_accuracy_on_fresh_scenes(entry) -> None:
    data = bundled.RECIPES[entry.name].data  # shapes_fc: roughly centred shapes, as trained
    x, y, _ = shapes.make_dataset(300, seed=FRESH_SEED, **data)
    assert bundled.accuracy(entry.model, x, y) >= 0.9


def test_shapes_fc_rejects_background_windows() -> None:
    """Windows from fresh scenes (generator labels): centred shapes get their class, windows
    with no centred shape (empty, partly inside, off-centre, reaching past the border) the
    background class, as trained."""
    entry = load_model_dir(MODELS / "shapes_fc")
    background = list(entry.config.class_names).index(entry.config.extra["background_class"])
    x, y = shapes.make_windows(300, seed=FRESH_SEED + 3, **bundled.RECIPES["shapes_fc"].windows)
    probs = entry.model.predict(bundled.to_input(x), verbose=0)
    pos = y >= 0
    assert pos.sum() >= 60 and (~pos).sum() >= 60
    assert np.mean(probs[pos].argmax(axis=1) == y[pos]) >= 0.9
    assert np.mean(probs[~pos].argmax(axis=1) == background) >= 0.9


def test_shapes_fc_is_all_valid_padding() -> None:
    model = load_model_dir(MODELS / "shapes_fc").model
    padded = [l.name for l in model.layers if getattr(l, "padding", "valid") != "valid"]
    assert padded == []
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds[-4:] == ["Flatten", "Dense", "Dropout", "Dense"] or kinds[-3:] == ["Flatten", "Dense", "Dense"]


def test_shapes_gap_head_and_cam_localization() -> None:
    entry = load_model_dir(MODELS / "shapes_gap")
    model = entry.model
    assert isinstance(model.layers[-2], keras.layers.GlobalAveragePooling2D)
    assert isinstance(model.layers[-1], keras.layers.Dense)
    assert model.get_layer(entry.config.default_layer).output.shape[1:3] == (16, 16)
    x, _, boxes = shapes.make_dataset(300, seed=FRESH_SEED + 1)
    loc = bundled.cam_localization(model, x, boxes)
    assert loc["localization_accuracy"] >= 0.85  # 0.9 is the goal measured on 2000 scenes


def test_box_map_loss_equals_a_loop_over_cells() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 16, 16, 5)).astype(np.float32)
    targets = np.array([[2, 5, 9, 30, 41], [0, 0, 0, 64, 64], [4, 13, 17, 20, 23]], np.float32)
    got = np.asarray(bundled._box_map_loss((64, 64))(targets, maps))
    for i, (label, x0, y0, x1, y1) in enumerate(targets):
        s = maps[i, :, :, int(label)]
        total, count = 0.0, 0
        for r in range(16):
            for q in range(16):
                cx, cy = 4 * q, 4 * r  # the cell covers [cx, cx + 4) x [cy, cy + 4)
                if x0 <= cx and cx + 4 <= x1 and y0 <= cy and cy + 4 <= y1:  # inside: target 1
                    total, count = total - np.log(1 / (1 + np.exp(-s[r, q]))), count + 1
                elif cx + 4 <= x0 or cx >= x1 or cy + 4 <= y0 or cy >= y1:  # outside: target 0
                    total, count = total - np.log(1 - 1 / (1 + np.exp(-s[r, q]))), count + 1
        assert got[i] == pytest.approx(total / count, rel=1e-5)


def test_training_is_deterministic_and_writes_a_repository(tmp_path) -> None:
    tiny = {"n_train": 64, "n_val": 16, "n_test": 32, "n_loc": 32, "batch_size": 32}
    runs = []
    for out in ("a", "b"):
        bundled.train_bundled(tmp_path / out, seed=3, epochs=1, names=["shapes_gap"], overrides=tiny)
        runs.append(load_model_dir(tmp_path / out / "shapes_gap"))
    a, b = runs
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert a.config.extra["training"]["seed"] == 3
    assert "cam_localization_accuracy" in a.config.extra["metrics"]


def test_unknown_model_name_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="shapes_gap"):
        bundled.train_bundled(tmp_path, names=["shapes_xyz"])


def test_cli_parses_and_refuses_bad_epochs(capsys) -> None:
    from camserve.cli import build_parser, main

    args = build_parser().parse_args(["train-bundled", "--out", "x", "--seed", "2", "--only", "shapes_fc"])
    assert (args.out, args.seed, args.only, args.epochs) == ("x", 2, ["shapes_fc"], None)
    assert callable(args.func)
    assert main(["train-bundled", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
