"""``camserve bulk`` on a local Ray (2 CPUs, one session for the module): the Parquet equals
``camserve explain`` on the same images; a corrupt file gets an error row and stops nothing;
a second run and a run after a crash add nothing twice; Parquet and CSV inputs work."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from camserve.bulk import output
from camserve.bulk.actors import BulkSettings
from camserve.bulk.job import run_bulk
from camserve.cli import main

METHODS = ("gradcam", "cam")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for the module (its start-up is the slow part); shut down at the end."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def by_image(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in output.read_explanations(str(out)).to_pylist():
        rows.setdefault(r["image"], []).append(r)
    return rows


def test_bulk_equals_camserve_explain_with_error_rows(images: Path, tmp_path: Path, model_dir: Path) -> None:
    (images / "corrupt.png").write_bytes((images / "star.png").read_bytes()[:60])
    good = sorted(str(p) for p in images.glob("*.png") if p.name != "corrupt.png")
    out = tmp_path / "bulk"
    argv = [f"--method={m}" for m in METHODS] + ["--model", str(model_dir), "--top-k", "2"]
    assert (
        main(["bulk", str(images), *argv, "--out", str(out), "--batch-size", "4", "--overlays", "--no-progress"]) == 0
    )
    assert main(["explain", *good, *argv, "--out", str(tmp_path / "explain")]) == 0
    reference = json.loads((tmp_path / "explain" / "explanations.json").read_text())

    rows = by_image(out)
    assert sorted(rows) == sorted([*good, str(images / "corrupt.png")])  # every input, once
    (corrupt,) = rows[str(images / "corrupt.png")]
    assert corrupt["method"] is None and "corrupt.png: corrupt or truncated PNG" in corrupt["error"]
    for entry in reference:
        got = rows[entry["image"]]
        assert len(got) == len(entry["explanations"]) == 2 * len(METHODS)
        for r, e in zip(got, entry["explanations"]):
            assert (r["method"], r["class_index"], r["label"], r["box"]) == (
                e["method"],
                e["class_index"],
                e["label"],
                e["box"],
            )
            assert r["score"] == pytest.approx(e["score"], abs=2e-6)  # the JSON rounds to 6 places
            assert r["raw_shape"] == [16, 16] and r["error"] is None
            assert (out / "overlays" / r["overlay"]).is_file()


def test_resume_adds_nothing_twice_also_after_a_crash(images: Path, tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    settings = BulkSettings(model_dir=str(model_dir), out=str(out), methods=METHODS, batch_size=2)
    first = run_bulk([str(images)], settings, progress=False, cpus_per_actor=1, min_actors=2)  # two writers
    assert (first.done, first.skipped, first.failed, first.missing) == (6, 0, 0, 0)
    before = output.read_explanations(str(out))
    again = run_bulk([str(images)], settings, progress=False)
    assert (again.done, again.skipped) == (0, 6)
    assert output.read_explanations(str(out)).equals(before)

    # A crash: one part lost mid-write on a file system without atomic renames (truncated),
    # another lost before its rename (a temporary file), a third never written.
    folder = out / output.DATASET
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 3  # 6 images, 2 per batch
    data = parts[0].read_bytes()
    parts[0].write_bytes(data[: len(data) // 3])
    parts[1].rename(folder / f".{parts[1].name}.tmp")
    parts[2].unlink()
    lost = {r["image"] for r in before.to_pylist()} - set(output.done_images(str(out)))
    assert len(lost) == 6
    resumed = run_bulk([str(images)], settings, progress=False)
    assert (resumed.done, resumed.skipped, resumed.missing) == (6, 0, 0)
    key = [("image", "ascending"), ("method", "ascending"), ("class_index", "ascending")]
    after = output.read_explanations(str(out)).sort_by(key)
    before = before.sort_by(key)
    assert after.num_rows == before.num_rows == 6 * len(METHODS)  # each (image, target, method) once
    columns = ["image", "method", "class_index", "label", "box", "raw_shape"]
    assert after.select(columns).equals(before.select(columns))
    np.testing.assert_allclose(after.column("score").to_numpy(), before.column("score").to_numpy(), rtol=1e-6)
    assert not list(folder.glob(".*.tmp"))


def test_parquet_and_csv_tables_with_a_path_column(images: Path, tmp_path: Path, model_dir: Path) -> None:
    names = ["star.png", "missing.png", "circle.png"]
    table = pa.table({"path": [str(images / n) for n in names], "split": ["val"] * 3})
    pq.write_table(table, tmp_path / "list.parquet")
    pyarrow.csv.write_csv(table.rename_columns(["file", "split"]), tmp_path / "list.csv")
    settings = BulkSettings(model_dir=str(model_dir), out=str(tmp_path / "pq"), batch_size=4)
    summary = run_bulk([str(tmp_path / "list.parquet")], settings, progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    from_parquet = by_image(tmp_path / "pq")
    assert sorted(from_parquet) == sorted(table.column("path").to_pylist())
    assert "cannot read" in from_parquet[str(images / "missing.png")][0]["error"]
    shutil.copy(images / "cross.png", images / "missing.png")  # there now: --retry-failed explains it
    retried = run_bulk([str(tmp_path / "list.parquet")], settings, progress=False, retry_failed=True)
    assert (retried.done, retried.skipped, retried.failed) == (1, 2, 0)
    again = by_image(tmp_path / "pq")
    assert [(r["label"], r["error"]) for r in again[str(images / "missing.png")]] == [("cross", None)]
    assert {k: v for k, v in again.items() if "missing" not in k} == {
        k: v for k, v in from_parquet.items() if "missing" not in k
    }
    from_parquet = again

    shutil.copy(images / "star.png", tmp_path / "relative.png")  # a path relative to the working directory
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        pyarrow.csv.write_csv(pa.table({"file": ["relative.png", *table.column("path").to_pylist()]}), "more.csv")
        csv = BulkSettings(model_dir=str(model_dir), out="csv", batch_size=4)
        assert run_bulk(["more.csv"], csv, path_column="file", progress=False).done == 4
    from_csv = by_image(tmp_path / "csv")
    assert sorted(from_csv) == sorted(["relative.png", *from_parquet])
    for image, rows in from_parquet.items():
        assert [(r["class_index"], r["score"], r["box"], r["raw"]) for r in rows] == [
            (r["class_index"], r["score"], r["box"], r["raw"]) for r in from_csv[image]
        ]
    assert [r["raw"] for r in from_csv["relative.png"]] == [r["raw"] for r in from_csv[str(images / "star.png")]]


def test_bad_settings_are_clear_errors(images: Path, tmp_path: Path, model_dir: Path, capsys) -> None:
    base = ["bulk", str(images), "--model", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--target", "dog"]) == 2
    assert "unknown class; allowed: circle, square" in capsys.readouterr().err
    assert main([*base, "--method", "nosuch"]) == 2  # found by the actor: its error reaches the user
    assert "unknown method 'nosuch'" in capsys.readouterr().err
