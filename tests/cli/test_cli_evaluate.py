"""`camserve evaluate` on the bundled shapes_gap with scenes from the generator: the table's
numbers against computations written here (IoU and pointing by hand from the heatmaps, the
confidence measures from the model's own predict on the masked images, deletion AUC and ROAD
from the library functions on the same maps), the plot, and clear errors."""

import json

import numpy as np
import pytest

from camserve import Explainer, imaging
from camserve.cli import main
from camserve.cli.evaluate import COLOURS
from camserve.datasets.shapes import write_samples
from camserve.evaluation import deletion_auc, road
from camserve.serving.repository import load_model_dir


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, repo_root):
    d = tmp_path_factory.mktemp("scenes")
    paths = write_samples(d, seed=3)  # six scenes and their ground_truth.json (the generator's boxes)
    return paths, d / "ground_truth.json", repo_root / "models" / "shapes_gap"


def iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_evaluate_table_plot_and_json(scenes, tmp_path, capsys):
    paths, truth_file, model_dir = scenes
    out = tmp_path / "out"
    args = ["evaluate", *map(str, paths), "--model", str(model_dir), "--boxes", str(truth_file)]
    assert main([*args, "--method", "gradcam", "--method", "guidedbackprop", "--steps", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = {r["method"]: r for r in json.loads((out / "evaluation.json").read_text())["results"]}
    assert list(results) == ["gradcam", "guidedbackprop"]

    entry = load_model_dir(model_dir)
    cfg, model = entry.config, entry.model
    truth = json.loads(truth_file.read_text())
    x = np.stack([imaging.model_input(imaging.read_image(p), cfg) for p in paths])  # 64 px: image = input size
    ex = Explainer(model, layer=cfg.default_layer, class_names=cfg.class_names)
    for method, r in results.items():
        explained = [e[0] for e in ex.explain(x, methods=(method,))]
        hits, points = [], []
        for p, e in zip(paths, explained):
            boxes = [b for lab, b in zip(truth[p.name]["labels"], truth[p.name]["boxes"]) if lab == e.label]
            hits.append(e.box is not None and any(iou(e.box, b) >= 0.5 for b in boxes))
            y, xx = np.unravel_index(np.argmax(e.heatmap), e.heatmap.shape)
            points.append(any(b[0] <= xx < b[2] and b[1] <= y < b[3] for b in boxes))
        assert r["localization"] == pytest.approx(np.mean(hits))
        assert r["pointing"] == pytest.approx(np.mean(points))

        probs = model.predict(x, verbose=0)
        masked = model.predict(x * np.stack([e.heatmap for e in explained])[..., None], verbose=0)
        c = [e.class_index for e in explained]
        y0, o = probs[np.arange(len(x)), c], masked[np.arange(len(x)), c]
        assert r["average_drop"] == pytest.approx(100 * np.mean(np.maximum(0, y0 - o) / y0), rel=1e-3, abs=1e-3)
        assert r["increase_in_confidence"] == pytest.approx(100 * np.mean(o > y0))

        def score(b, k):
            return model.predict(b, verbose=0)[:, k]

        aucs = [deletion_auc(lambda b, k=k: score(b, k), img, e.heatmap, steps=8) for img, e, k in zip(x, explained, c)]
        assert r["deletion_auc"] == pytest.approx(np.mean(aucs), abs=1e-4)
        roads = [road(lambda b, k=k: score(b, k), img, e.heatmap).combined for img, e, k in zip(x, explained, c)]
        assert r["road"] == pytest.approx(np.mean(roads), abs=1e-4)
        assert -1.0 <= r["sanity"] <= 1.0
        row = next(line for line in printed.splitlines() if line.startswith(method + " "))
        assert f"{r['localization']:.3f}" in row and f"{r['road']:.3f}" in row

    assert results["gradcam"]["localization"] >= 0.5  # the bundled model localises its shapes
    plot = imaging.read_image(out / "curves.png")
    assert plot.shape == (420, 900, 3)
    for colour in COLOURS[:2]:  # one curve colour per method (RGB in the PNG, BGR in COLOURS)
        assert (np.abs(plot.astype(int) - colour[::-1]).sum(axis=-1) < 30).sum() > 100


def test_evaluate_without_boxes_leaves_localization_out(scenes, tmp_path, capsys):
    paths, _, model_dir = scenes
    out = tmp_path / "out"
    assert (
        main(["evaluate", str(paths[0]), "--model", str(model_dir), "--steps", "4", "--no-sanity", "--out", str(out)])
        == 0
    )
    result = json.loads((out / "evaluation.json").read_text())["results"][0]
    assert "localization" not in result and "sanity" not in result and "road" in result
    assert capsys.readouterr().out.splitlines()[2].split()[1:3] == ["-", "-"]


def test_evaluate_without_scipy_leaves_road_out_and_says_so(scenes, tmp_path, capsys, monkeypatch, caplog):
    """A core install has no SciPy: the table comes without ROAD ('-') and a warning says how
    to add it, instead of the whole command failing."""
    from camserve.cli import evaluate

    paths, _, model_dir = scenes
    out = tmp_path / "out"
    monkeypatch.setattr(evaluate, "road_available", lambda: False)
    argv = ["evaluate", str(paths[0]), "--model", str(model_dir), "--steps", "4", "--no-sanity", "--out", str(out)]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    result = json.loads((out / "evaluation.json").read_text())["results"][0]
    assert "road" not in result and "deletion_auc" in result
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert row.split()[header.split().index("ROAD↑")] == "-"
    assert "camserve[eval]" in caplog.text


def test_evaluate_errors_are_clear(scenes, tmp_path, capsys):
    paths, truth_file, model_dir = scenes
    other = tmp_path / "other.png"
    other.write_bytes(paths[0].read_bytes())
    base = ["--model", str(model_dir), "--out", str(tmp_path / "o")]
    assert main(["evaluate", str(other), "--boxes", str(truth_file), *base]) == 2
    assert "has no entry for ['other.png']" in capsys.readouterr().err
    assert main(["evaluate", str(paths[0]), "--method", "nosuch", *base]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_randomised_model_is_explained_at_the_same_layers_with_the_same_prefix_tokens(tmp_path):
    """The sanity check explains the randomised copy like the folder's model: same (fused) layers,
    class names and prefix tokens (a config.toml setting)."""
    from camserve.explain.folder import FolderExplainer

    folder = FolderExplainer.load("models/shapes_gap", layer=["conv3b", "last_conv"])
    copy = folder.explainer_for(folder.entry.model)
    assert copy.layer_names == folder.explainer.layer_names == ("conv3b", "last_conv")
    assert copy.class_names == folder.explainer.class_names
    assert [s.prefix for s in copy.sites] == [s.prefix for s in folder.explainer.sites]
