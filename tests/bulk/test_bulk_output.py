"""camserve.bulk.output: parts hold whole images and appear atomically; what a crash leaves
(temporary files, a truncated part) is removed on resume; a repeated image is kept once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from camserve.bulk import output


def rows_for(image: str, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        output.row(
            image,
            method="gradcam",
            class_index=i,
            label=f"c{i}",
            score=float(rng.random()),
            box=[1, 2, 3, 4],
            height=8,
            width=8,
            **output.map_columns(rng.random((3, 5), dtype=np.float32)),
        )
        for i in range(n)
    ]


def test_rows_round_trip_through_a_part(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    rows = rows_for("a.png", 2) + [output.error_row("b.png", "corrupt PNG")]
    name = output.write_part(out, rows)
    assert name == output.part_name(["a.png", "b.png"])
    table = output.read_explanations(out)
    assert table.schema.equals(output.schema())
    back = table.to_pylist()
    assert [r["image"] for r in back] == ["a.png", "a.png", "b.png"]
    for want, got in zip(rows, back):
        assert {k: got[k] for k in ("method", "class_index", "label", "score", "box", "error")} == {
            k: want[k] for k in ("method", "class_index", "label", "score", "box", "error")
        }
    np.testing.assert_array_equal(output.raw_map(back[1]), np.frombuffer(rows[1]["raw"], np.float32).reshape(3, 5))
    assert back[2]["raw"] is None and back[2]["error"] == "corrupt PNG"
    assert output.done_images(out) == {"a.png": name, "b.png": name}


def test_done_images_removes_what_a_crash_left(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    good = output.write_part(out, rows_for("a.png", 3))
    folder = tmp_path / "out" / output.DATASET
    whole = (folder / good).read_bytes()
    # A part cut short (a file system without atomic renames), and a temporary file mid-write.
    truncated = folder / output.part_name(["b.png"])
    truncated.write_bytes(whole[: len(whole) // 2])
    (folder / f".{output.part_name(['c.png'])}.tmp").write_bytes(whole[:100])
    assert output.done_images(out) == {"a.png": good}
    assert sorted(p.name for p in folder.iterdir()) == [good]
    with pytest.raises(Exception, match="(?i)parquet"):  # the truncated copy was unreadable indeed
        pq.read_table(pq.BufferReader(whole[: len(whole) // 2]))


def test_a_batch_written_again_replaces_its_part(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = output.write_part(out, rows_for("a.png", 2, seed=1) + rows_for("b.png", 1))
    again = output.write_part(out, rows_for("a.png", 2, seed=2) + rows_for("b.png", 1))
    assert first == again
    assert output.read_explanations(out).num_rows == 3


def test_remove_duplicates_keeps_each_image_in_one_part(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    output.write_part(out, rows_for("a.png", 2) + rows_for("b.png", 2))
    output.write_part(out, rows_for("b.png", 2) + rows_for("c.png", 1))  # b.png again, with other company
    assert output.remove_duplicates(out) == 1
    images = output.read_explanations(out).column("image").to_pylist()
    assert sorted(images) == ["a.png", "a.png", "b.png", "b.png", "c.png"]
    assert output.remove_duplicates(out) == 0


def test_overlay_names_are_unique_per_image_as_given() -> None:
    a = output.overlay_name("x/cat.png", "cat", "gradcam++")
    b = output.overlay_name("y/cat.png", "cat", "gradcam++")
    assert a != b and a.startswith("cat-") and a.endswith(".cat.gradcampp.png")
    assert "/" not in output.overlay_name("s3://b/a b/ü.png", "a/b", "cam")


def test_failed_images_can_be_dropped_for_a_retry(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    mixed = output.write_part(out, rows_for("a.png", 2) + [output.error_row("b.png", "cannot read")])
    alone = output.write_part(out, [output.error_row("c.png", "corrupt PNG")])
    failed = output.failed_images(out)
    assert failed == {"b.png": mixed, "c.png": alone}
    output.drop_images(out, failed)
    assert output.done_images(out) == {"a.png": mixed}  # c.png's part, now empty, is gone
    assert output.read_explanations(out).column("image").to_pylist() == ["a.png", "a.png"]


def test_out_may_be_a_uri(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/remote"
    name = output.write_part(out, rows_for("s3-like.png", 2))
    output.write_file(output.join(out, output.OVERLAYS, "x.png"), b"png bytes")
    assert (tmp_path / "remote" / output.DATASET / name).is_file()
    assert (tmp_path / "remote" / output.OVERLAYS / "x.png").read_bytes() == b"png bytes"
    assert output.done_images(out) == {"s3-like.png": name}
    assert output.read_explanations(out).num_rows == 2
