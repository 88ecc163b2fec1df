"""`camserve dense` on a model folder: heatmaps, arg-max map and a JSON that match the
classifier on every crop."""

import json

import cv2
import numpy as np
import pytest
from fcn_nets import crops_reference, flatten_net

from camserve import imaging
from camserve.cli import main
from camserve.dense import DetectionSettings, detect
from camserve.explain import Explainer

NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def model():
    return flatten_net("valid")


@pytest.fixture()
def model_dir(tmp_path, model):
    d = tmp_path / "repo" / "fc"
    (d / "2").mkdir(parents=True)
    model.save(d / "2" / "model.keras")
    (d / "config.toml").write_text(
        f'class_names = {json.dumps(NAMES)}\ninput_size = [20, 20]\npreprocessing = "scale_0_1"\n'
    )
    return d


def _write_images(tmp_path, sizes):
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(p)
    return paths


def test_dense_writes_heatmaps_argmax_and_json(tmp_path, model_dir, model):
    paths = _write_images(tmp_path, [(36, 44), (28, 28)])
    out = tmp_path / "out"
    code = main(
        [
            "dense",
            *map(str, paths),
            "--model",
            str(model_dir),
            "--stride",
            "2",
            "--scales",
            "1,0.8",
            "--threshold",
            "0.3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "dense.json").read_text())
    assert (report["model"], report["version"], report["class_names"]) == ("fc", 2, NAMES)
    for path, entry in zip(paths, report["images"]):
        rgb = imaging.read_image(path)
        x = imaging.preprocess(rgb, "scale_0_1")
        assert (entry["image"], entry["height"], entry["width"]) == (str(path), *rgb.shape[:2])
        assert (entry["mode"], entry["exact"], entry["stride"], entry["window"]) == ("fcn", True, [2, 2], [20, 20])
        # Independent: the classifier on every crop of the image at scale 1.
        want = crops_reference(model, x, 2)
        level = entry["scales"][0]
        assert level["grid"] == list(want.shape[:2])
        assert level["argmax"] == np.argmax(want, -1).tolist()
        np.testing.assert_allclose(level["max_score"], want.max(-1), atol=2e-6)
        assert [s["scale"] for s in entry["scales"]] == [1.0, 0.8]
        # Detections are the library's, over both scales.
        settings = DetectionSettings(threshold=0.3, iou=0.3, scales=(1.0, 0.8), stride=2)
        lib = detect(model, x, settings, NAMES, explainer=Explainer(model, class_names=NAMES)).detections
        assert [(d["label"], d["box"], d["tight_box"]) for d in entry["detections"]] == [
            (d.label, [round(v, 2) for v in d.box], d.tight_box and [round(v, 2) for v in d.tight_box]) for d in lib
        ]
        assert sorted(entry["heatmaps"]) == NAMES
        for png in [*entry["heatmaps"].values(), entry["argmax_map"]]:
            assert imaging.read_image(out / png).shape == rgb.shape


def test_dense_crops_mode_and_class_selection(tmp_path, model_dir, model):
    (path,) = _write_images(tmp_path, [(30, 26)])
    out = tmp_path / "o"
    assert (
        main(
            [
                "dense",
                str(path),
                "--model",
                str(model_dir),
                "--mode",
                "crops",
                "--stride",
                "3",
                "--classes",
                "b,4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    entry = json.loads((out / "dense.json").read_text())["images"][0]
    want = crops_reference(model, imaging.preprocess(imaging.read_image(path), "scale_0_1"), 3)
    assert entry["exact"] is True and entry["scales"][0]["argmax"] == np.argmax(want, -1).tolist()
    assert sorted(entry["heatmaps"]) == ["b", "e"]


def test_dense_errors_name_the_problem(tmp_path, model_dir, capsys):
    (small,) = _write_images(tmp_path, [(12, 30)])
    assert main(["dense", str(small), "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "img0.png" in err and "smaller than the 20x20 window" in err
    (ok,) = _write_images(tmp_path, [(24, 24)])
    assert main(["dense", str(ok), "--model", str(model_dir), "--classes", "zebra", "--out", str(tmp_path / "o")]) == 2
    assert "unknown class 'zebra'; allowed: a, b, c, d, e" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dense", str(ok), "--model", str(model_dir), "--scales", "1,-2", "--out", str(tmp_path / "o")])
    assert "scales must be comma-separated positive numbers" in capsys.readouterr().err


def test_dense_boxes_prints_metrics_of_the_bundled_model(tmp_path, capsys):
    """`--boxes` on generated 256 px four-shape scenes (a seed not used in training) with the
    bundled shapes_fc and its config's defaults: the printed and written figures are
    camserve.evaluation's on the detections in dense.json."""
    from pathlib import Path

    from camserve.datasets import shapes
    from camserve.evaluation.detection import window_and_tight_report

    models = Path(__file__).resolve().parents[2] / "models"
    truth, paths = {}, []
    for i, scene in enumerate(shapes.make_scenes(3, 777_001, (256, 256), n_shapes=4)):
        path = tmp_path / f"scene{i}.png"
        path.write_bytes(imaging.encode_png(scene.image))
        truth[path.name] = {"labels": scene.names, "boxes": [list(b) for b in scene.boxes]}
        paths.append(path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(truth))
    out = tmp_path / "out"
    assert (
        main(
            ["dense", *map(str, paths), "--model", str(models / "shapes_fc"), "--boxes", str(labels), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "dense.json").read_text())
    assert report["background_class"] == "background"
    assert all(d["label"] != "background" for e in report["images"] for d in e["detections"])
    from types import SimpleNamespace

    found = [
        [
            SimpleNamespace(
                label=d["label"],
                score=d["score"],
                box=tuple(d["box"]),
                tight_box=tuple(d["tight_box"]) if d["tight_box"] else None,
            )
            for d in e["detections"]
        ]
        for e in report["images"]
    ]
    expected = [[(l, tuple(b)) for l, b in zip(truth[p.name]["labels"], truth[p.name]["boxes"])] for p in paths]
    want = window_and_tight_report(found, expected)
    assert report["metrics"]["windows"]["precision"] == pytest.approx(want["windows"]["precision"], abs=1e-3)
    assert f"recall {want['windows']['recall']:.3f}" in printed and "AP@0.5" in printed
    assert want["windows"]["recall"] >= 0.8 and want["windows"]["precision"] >= 0.7  # 12 objects: loose floors
