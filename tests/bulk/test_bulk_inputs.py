"""camserve.bulk.inputs: files, folders, globs, Parquet / CSV tables and URIs resolve to the
images they name, each once, in order; reading errors name the image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from camserve import imaging
from camserve.bulk.inputs import load_rgb, read_table_paths, resolve_inputs
from camserve.errors import InvalidArgument, NotFound


def test_folders_globs_and_files_resolve_in_order_each_once(images: Path, samples: list[Path]) -> None:
    (images / "sub").mkdir()
    (images / "sub" / "deep.png").write_bytes((images / "star.png").read_bytes())
    (images / "notes.txt").write_text("not an image")
    names = sorted(p.name for p in samples)
    folder = resolve_inputs([str(images)])
    assert folder == sorted([str(images / n) for n in names] + [str(images / "sub" / "deep.png")])
    star = str(images / "star.png")
    mixed = resolve_inputs([star, str(images / "c*.png"), str(images)])
    assert mixed[:3] == [star, str(images / "circle.png"), str(images / "cross.png")]
    assert len(mixed) == len(set(mixed)) == len(folder)  # each image once
    assert resolve_inputs([str(images / "**" / "deep.png")]) == [str(images / "sub" / "deep.png")]


def test_a_missing_file_is_kept_for_an_error_row_but_empty_globs_and_folders_are_errors(tmp_path: Path) -> None:
    assert resolve_inputs([str(tmp_path / "gone.png")]) == [str(tmp_path / "gone.png")]
    with pytest.raises(NotFound, match=r"no files match"):
        resolve_inputs([str(tmp_path / "*.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match=r"no images"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(InvalidArgument, match="no input"):
        resolve_inputs([])


def test_parquet_and_csv_tables_list_their_path_column(images: Path, tmp_path: Path) -> None:
    paths = [str(images / "star.png"), "relative/a.png", str(images / "cross.png")]
    table = pa.table({"id": [1, 2, 3], "path": paths})
    pq.write_table(table, tmp_path / "list.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "list.csv")
    assert resolve_inputs([str(tmp_path / "list.parquet")]) == paths
    assert resolve_inputs([str(tmp_path / "list.csv")]) == paths
    pq.write_table(table.rename_columns(["id", "file"]), tmp_path / "other.parquet")
    assert read_table_paths(str(tmp_path / "other.parquet"), "file") == paths
    with pytest.raises(InvalidArgument, match=r"no column 'path'.*\['id', 'file'\]"):
        resolve_inputs([str(tmp_path / "other.parquet")])
    pq.write_table(pa.table({"path": [paths[0], None]}), tmp_path / "holes.parquet")
    with pytest.raises(InvalidArgument, match=r"empty in 1 row"):
        resolve_inputs([str(tmp_path / "holes.parquet")])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidArgument, match=r"bad.parquet: not a readable Parquet"):
        resolve_inputs([str(tmp_path / "bad.parquet")])


def test_uris_are_listed_and_read_through_pyarrow(images: Path, samples: list[Path]) -> None:
    uri = f"file://{images}"
    found = resolve_inputs([uri])
    assert found == [f"file://{images}/{p.name}" for p in samples]
    assert resolve_inputs([f"{uri}/s*.png"]) == [f"{uri}/square.png", f"{uri}/star.png"]
    np.testing.assert_array_equal(load_rgb(f"{uri}/star.png"), imaging.read_image(images / "star.png"))


def test_read_errors_name_the_image_as_given(images: Path) -> None:
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(imaging.ImageError, match=r"^shown.png: corrupt or truncated PNG"):
        load_rgb(str(images / "bad.png"), name="shown.png")
    with pytest.raises(imaging.ImageError, match=r"^gone.png: cannot read"):
        load_rgb(os.fspath(images / "gone.png"), name="gone.png")
