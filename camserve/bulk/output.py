"""The output of ``camserve bulk``: ``OUT/explanations.parquet``, a Parquet dataset (a folder of
part files that pyarrow, pandas, Ray, Spark and DuckDB read as one table) with one row per
(image, target, method), and PNG overlays in ``OUT/overlays/``.

Columns (:data:`SCHEMA`): ``image`` (as given), ``method``, ``class_index``, ``label``, ``score``,
``box`` (x0, y0, x1, y1 in the image's pixels, x1/y1 exclusive, or null), ``raw`` (the float32
map, little-endian bytes) with ``raw_shape``, ``height`` / ``width`` of the image, ``overlay``
(the PNG's name under ``overlays/``, or null) and ``error`` (null, or what was wrong: then the
image has this one row). ``--dense`` adds rows with method ``dense``: ``raw`` is the class's
sliding-window score grid, ``score`` and ``box`` those of its best window.

A part holds whole images only and is written to a temporary name then renamed, so a crash
leaves no partial rows; :func:`done_images` (what a resumed job skips) removes leftovers.

>>> row = error_row("a.png", "corrupt PNG")
>>> row["image"], row["method"], row["error"]
('a.png', None, 'corrupt PNG')
>>> raw_map({"raw": np.eye(2, dtype=np.float32).tobytes(), "raw_shape": [2, 2]})[1, 1]
np.float32(1.0)
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from camserve.bulk.inputs import filesystem

DATASET = "explanations.parquet"
OVERLAYS = "overlays"
_PART = re.compile(r"^part-[0-9a-f]{16}\.parquet$")

#: Column names in order; the Arrow types are in :func:`schema`.
COLUMNS = (
    "image",
    "method",
    "class_index",
    "label",
    "score",
    "box",
    "raw",
    "raw_shape",
    "height",
    "width",
    "overlay",
    "error",
)


def schema() -> Any:
    """The Arrow schema of ``explanations.parquet``."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image", pa.string()),
            ("method", pa.string()),
            ("class_index", pa.int32()),
            ("label", pa.string()),
            ("score", pa.float64()),
            ("box", pa.list_(pa.int32(), 4)),
            ("raw", pa.binary()),
            ("raw_shape", pa.list_(pa.int32())),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("overlay", pa.string()),
            ("error", pa.string()),
        ]
    )


def join(location: str, *names: str) -> str:
    """``location``/``names`` for a local path or a URI.

    >>> join("s3://b/out", "explanations.parquet")
    's3://b/out/explanations.parquet'
    """
    return "/".join([location.rstrip("/"), *names])


def row(image: str, **values: Any) -> dict[str, Any]:
    """One output row: ``image`` and the given columns, the others null.

    >>> r = row("a.png", method="cam", score=0.5)
    >>> r["method"], r["score"], r["box"], list(r) == list(COLUMNS)
    ('cam', 0.5, None, True)
    """
    out: dict[str, Any] = dict.fromkeys(COLUMNS)
    out.update(values, image=image)
    return out


def error_row(image: str, error: str, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """The one row of an image that could not be explained."""
    return row(image, error=error, height=height, width=width)


def raw_map(r: dict[str, Any]) -> np.ndarray:
    """A row's ``raw`` bytes as the float32 array of shape ``raw_shape``."""
    return np.frombuffer(r["raw"], "<f4").reshape(r["raw_shape"])


def map_columns(raw: np.ndarray) -> dict[str, Any]:
    """``raw`` and ``raw_shape`` of a map, as little-endian float32.

    >>> map_columns(np.zeros((2, 3)))["raw_shape"], len(map_columns(np.zeros((2, 3)))["raw"])
    ([2, 3], 24)
    """
    a = np.ascontiguousarray(raw, "<f4")
    return {"raw": a.tobytes(), "raw_shape": list(a.shape)}


def overlay_name(image: str, label: str, method: str) -> str:
    """A file name under ``overlays/`` unique to (image, label, method): the image's stem, a
    hash of the image as given (two ``a.png`` in different folders stay apart), label, method.

    >>> overlay_name("x/cat.png", "cat", "gradcam++")
    'cat-4a6a3136.cat.gradcampp.png'
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", image.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:80]
    digest = hashlib.sha1(image.encode()).hexdigest()[:8]
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{label}.{method.replace('+', 'p')}")
    return f"{stem}-{digest}.{clean}.png"


def part_name(images: Sequence[str]) -> str:
    """The part file of a batch: named by its images, so a retried batch replaces its part
    instead of adding a second copy.

    >>> part_name(["a.png", "b.png"])
    'part-86c87f36a70f9762.parquet'
    """
    return f"part-{hashlib.sha1(chr(0).join(images).encode()).hexdigest()[:16]}.parquet"


def write_part(out: str, rows: list[dict[str, Any]]) -> str:
    """Write the rows of a batch of whole images as one part of ``OUT/explanations.parquet``,
    atomically (a temporary name, then a rename); returns the part's name."""
    import pyarrow as pa

    name = part_name(unique_images(rows))
    fs, inner = filesystem(join(out, DATASET))
    fs.create_dir(inner, recursive=True)
    _write_atomic(fs, f"{inner}/{name}", _parquet_bytes(pa.Table.from_pylist(rows, schema=schema())))
    return name


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _write_atomic(fs: Any, path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary name in the same folder and a rename."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_file(location: str, data: bytes) -> None:
    """Write bytes to a local path or URI (an overlay PNG), atomically where renames are."""
    fs, inner = filesystem(location)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    _write_atomic(fs, inner, data)


def unique_images(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The ``image`` of rows, in order, each once.

    >>> unique_images([{"image": "b"}, {"image": "a"}, {"image": "b"}])
    ['b', 'a']
    """
    return list(dict.fromkeys(r["image"] for r in rows))


def _parts(out: str) -> tuple[Any, str, list[str], list[str]]:
    """The dataset's file system, folder, committed parts and leftovers (temporary files)."""
    from pyarrow import fs as pafs

    fs, inner = filesystem(join(out, DATASET))
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return fs, inner, [], []
    infos = fs.get_file_info(pafs.FileSelector(inner))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return fs, inner, [n for n in names if _PART.match(n)], [n for n in names if n.endswith(".tmp")]


def _read_columns(fs: Any, inner: str, parts: list[str], columns: list[str]) -> dict[str, Any]:
    """``columns`` of each part (None for a part that cannot be read), read in parallel
    (object stores answer slowly one file at a time)."""
    import pyarrow.parquet as pq

    def read(name: str) -> Any:
        try:
            return pq.read_table(f"{inner}/{name}", columns=columns, filesystem=fs)
        except (OSError, ValueError):  # a truncated part (pyarrow.lib.ArrowInvalid is a ValueError)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(parts, pool.map(read, parts)))


def index(out: str) -> dict[str, list[str]]:
    """Every image of ``OUT`` with the parts that hold its rows (one, unless a batch was written
    twice with other companions), after removing what a crash left: temporary files and parts
    that cannot be read (their images are done again)."""
    fs, inner, parts, leftovers = _parts(out)
    for name in leftovers:
        fs.delete_file(f"{inner}/{name}")
    found: dict[str, list[str]] = {}
    for name, table in _read_columns(fs, inner, parts, ["image"]).items():
        if table is None:
            fs.delete_file(f"{inner}/{name}")
            continue
        for image in dict.fromkeys(table.column("image").to_pylist()):
            found.setdefault(image, []).append(name)
    return found


def done_images(out: str) -> dict[str, str]:
    """Images already in ``OUT``, each with its part (see :func:`index`)."""
    return {image: parts[0] for image, parts in index(out).items()}


def remove_duplicates(out: str, found: dict[str, list[str]] | None = None) -> int:
    """Rewrite parts so that each image's rows are in one part only (a batch retried with other
    companions could repeat an image); ``found``: :func:`index` if already read. Returns how
    many images were repeated."""
    fs, inner, _, _ = _parts(out)
    repeated: dict[str, set[str]] = {}
    for image, parts in (index(out) if found is None else found).items():
        for name in parts[1:]:
            repeated.setdefault(name, set()).add(image)
    _drop_from_parts(fs, inner, repeated)
    return sum(len(v) for v in repeated.values())


def failed_images(out: str) -> dict[str, str]:
    """Images of ``OUT`` whose row is an error row, each with its part."""
    fs, inner, parts, _ = _parts(out)
    failed: dict[str, str] = {}
    for name, table in _read_columns(fs, inner, parts, ["image", "error"]).items():
        if table is None:
            continue
        for image, error in zip(table.column("image").to_pylist(), table.column("error").to_pylist()):
            if error is not None:
                failed[image] = name
    return failed


def drop_images(out: str, images: dict[str, str]) -> None:
    """Remove the rows of ``images`` (image → its part, as :func:`failed_images` gives) from
    their parts, each part rewritten atomically (removed when nothing is left)."""
    fs, inner, _, _ = _parts(out)
    by_part: dict[str, set[str]] = {}
    for image, name in images.items():
        by_part.setdefault(name, set()).add(image)
    _drop_from_parts(fs, inner, by_part)


def _drop_from_parts(fs: Any, inner: str, drop: dict[str, set[str]]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for name, images in drop.items():
        table = pq.read_table(f"{inner}/{name}", filesystem=fs)
        kept = table.filter(pc.invert(pc.is_in(table.column("image"), value_set=pa.array(sorted(images)))))
        if kept.num_rows:
            _write_atomic(fs, f"{inner}/{name}", _parquet_bytes(kept))
        else:
            fs.delete_file(f"{inner}/{name}")


def read_explanations(out: str) -> Any:
    """``OUT/explanations.parquet`` as one pyarrow Table (empty with :func:`schema` if none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner, parts, _ = _parts(out)
    if not parts:
        return schema().empty_table()
    return pa.concat_tables([pq.read_table(f"{inner}/{n}", filesystem=fs, schema=schema()) for n in parts])
