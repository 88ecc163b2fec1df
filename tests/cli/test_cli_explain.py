"""`camserve explain` on a model folder: overlays and a JSON that match the library."""

import json

import cv2
import numpy as np
import pytest

from camserve import Explainer, imaging
from camserve.cli import main


@pytest.fixture()
def model_dir(tmp_path, gap_model):
    d = tmp_path / "repo" / "tiny"
    (d / "3").mkdir(parents=True)
    gap_model.save(d / "3" / "model.keras")
    (d / "config.toml").write_text(
        'class_names = ["a", "b", "c", "d"]\ninput_size = [32, 32]\npreprocessing = "scale_0_1"\n'
    )
    return d


def test_explain_writes_overlays_and_json(tmp_path, model_dir, gap_model):
    rng = np.random.default_rng(5)
    paths = []
    for i, (h, w) in enumerate([(32, 32), (48, 64)]):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(p)
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            *map(str, paths),
            "--model",
            str(model_dir),
            "--method",
            "gradcam",
            "--method",
            "gradcam++",
            "--top-k",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "explanations.json").read_text())
    assert [r["image"] for r in report] == [str(p) for p in paths]

    ex = Explainer(gap_model, class_names=["a", "b", "c", "d"])
    for path, entry in zip(paths, report):
        rgb = imaging.read_image(path)
        x = imaging.preprocess(imaging.resize(rgb, (32, 32)), "scale_0_1")[None]
        expected = ex.explain(x, methods=("gradcam", "gradcam++"), top_k=2)[0]
        assert len(entry["explanations"]) == 4
        for e, got in zip(expected, entry["explanations"]):
            assert (got["method"], got["class_index"], got["label"]) == (e.method, e.class_index, e.label)
            assert got["score"] == pytest.approx(e.score, abs=1e-5)
            png = imaging.read_image(out / got["overlay"])
            assert png.shape == rgb.shape  # overlays are drawn on the original image
            if e.box is not None:
                sy, sx = rgb.shape[0] / 32, rgb.shape[1] / 32
                assert got["box"] == [
                    round(e.box[0] * sx),
                    round(e.box[1] * sy),
                    round(e.box[2] * sx),
                    round(e.box[3] * sy),
                ]


def test_explain_reports_bad_input(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    code = main(["explain", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "bad.png" in capsys.readouterr().err
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((8, 8, 3), np.uint8))
    code = main(["explain", str(good), "--model", str(model_dir), "--method", "nope", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
