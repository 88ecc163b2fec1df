"""What ``camserve bulk`` explains: image files, folders, globs, and Parquet / CSV tables with a
path column, as local paths or any URI pyarrow can open (``s3://``, ``gs://``, ``hdfs://``...).

>>> is_uri("s3://bucket/cats/1.png"), is_uri("samples/star.png")
(True, False)
>>> resolve_inputs(["samples/star.png", "samples/star.png"])   # each image once
['samples/star.png']
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camserve import imaging
from camserve.errors import InvalidArgument, NotFound

#: File endings read as images when a folder or glob is expanded.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: File endings read as tables of image paths.
TABLE_SUFFIXES = (".parquet", ".pq", ".csv")
DEFAULT_PATH_COLUMN = "path"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations (read through pyarrow's file systems)."""
    return bool(_URI.match(location))


def filesystem(location: str) -> tuple[Any, str]:
    """The pyarrow file system of a local path or URI, and the path inside it.

    >>> type(filesystem("samples")[0]).__name__
    'LocalFileSystem'
    """
    from pyarrow import fs

    if is_uri(location):
        try:
            return fs.FileSystem.from_uri(location)
        except (ValueError, OSError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
            raise InvalidArgument(f"{location}: not a location pyarrow can open ({e})") from None
    return fs.LocalFileSystem(), os.path.abspath(location)


def _with_scheme(location: str, inner: str) -> str:
    """``inner`` (a path inside ``location``'s file system) written as ``location`` is."""
    if not is_uri(location):
        return inner
    scheme = location.split("://", 1)[0]
    return f"{scheme}://{inner.lstrip('/')}" if scheme != "file" else f"file://{inner}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_images(location: str) -> list[str]:
    if not is_uri(location):
        return sorted(
            str(p) for p in Path(location).rglob("*") if p.is_file() and _is_image(p.name)
        )  # paths as the user would write them, below the given folder
    from pyarrow import fs as pafs

    fs, inner = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(_with_scheme(location, i.path) for i in infos if i.type == pafs.FileType.File and _is_image(i.path))


def _glob_images(pattern: str) -> list[str]:
    if not is_uri(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    from pyarrow import fs as pafs

    fs, inner = filesystem(pattern)
    root = inner
    while any(c in root for c in "*?["):
        root = root.rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        _with_scheme(pattern, i.path)
        for i in infos
        if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, inner)
    )


def read_table_paths(location: str, column: str = DEFAULT_PATH_COLUMN) -> list[str]:
    """The image paths in column ``column`` of a Parquet or CSV file (local or URI)."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    fs, inner = filesystem(location)
    try:
        if location.lower().endswith(".csv"):
            with fs.open_input_stream(inner) as f:
                table = pyarrow.csv.read_csv(f)
        else:
            table = pq.read_table(inner, filesystem=fs)
    except FileNotFoundError:
        raise NotFound(f"{location}: no such table") from None
    except (ValueError, OSError) as e:  # pyarrow.lib.ArrowInvalid (a ValueError) for a bad file
        raise InvalidArgument(
            f"{location}: not a readable {'CSV' if location.lower().endswith('.csv') else 'Parquet'} table ({e})"
        ) from None
    if column not in table.column_names:
        raise InvalidArgument(
            f"{location} has no column {column!r}; its columns: {table.column_names} (choose one with --path-column)"
        )
    values = table.column(column).to_pylist()
    missing = [i for i, v in enumerate(values) if v is None or str(v) == ""]
    if missing:
        raise InvalidArgument(
            f"{location}: column {column!r} is empty in {len(missing)} row(s), first row {missing[0]}"
        )
    return [str(v) for v in values]


def _expand(location: str, column: str) -> list[str]:
    if location.lower().endswith(TABLE_SUFFIXES):
        return read_table_paths(location, column)
    if any(c in location for c in "*?["):
        found = _glob_images(location)
        if not found:
            raise NotFound(f"no files match {location!r}")
        return found
    if is_uri(location):
        from pyarrow import fs as pafs

        fs, inner = filesystem(location)
        if fs.get_file_info(inner).type == pafs.FileType.Directory:
            return _folder_images(location)
        return [location]
    if os.path.isdir(location):
        return _folder_images(location)
    return [location]  # a file, or a missing one: it gets an error row, it stops nothing


def resolve_inputs(inputs: Sequence[str], path_column: str = DEFAULT_PATH_COLUMN) -> list[str]:
    """Every image named by ``inputs``, in order, each once: files as given, folders (recursively,
    files ending in :data:`IMAGE_SUFFIXES`), globs (``**`` recursive), and tables
    (:data:`TABLE_SUFFIXES`) whose ``path_column`` lists images. A folder without images and a
    glob matching nothing are errors; a missing file is not (it becomes an error row)."""
    if not inputs:
        raise InvalidArgument("no input given: name image files, folders, globs or Parquet/CSV tables")
    images: dict[str, None] = {}
    for location in inputs:
        found = _expand(str(location), path_column)
        if not found:
            raise NotFound(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {location}")
        images.update(dict.fromkeys(found))
    return list(images)


def read_image_bytes(image: str) -> bytes:
    """The bytes of an image given as a local path or a URI."""
    if not is_uri(image):
        return Path(image).read_bytes()
    fs, inner = filesystem(image)
    with fs.open_input_stream(inner) as f:
        return bytes(f.read())


def load_rgb(location: str, name: str | None = None) -> np.ndarray:
    """Read and decode one image (local path or URI) to RGB uint8 (:func:`camserve.imaging.decode_image`);
    errors (:class:`~camserve.imaging.ImageError`, also for a file that cannot be read) start
    with ``name`` (default: ``location``).

    >>> load_rgb("/nowhere/x.png", name="x.png")
    Traceback (most recent call last):
    camserve.imaging.ImageError: x.png: cannot read: No such file or directory
    """
    name = name or location
    try:
        data = read_image_bytes(location)
    except OSError as e:
        raise imaging.ImageError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        return imaging.decode_image(data)
    except imaging.ImageError as e:
        raise imaging.ImageError(f"{name}: {e}") from None


def local_location(image: str) -> str:
    """Where a worker finds ``image``: a URI as it is, a local path made absolute (workers may
    run in another folder).

    >>> local_location("s3://b/x.png")
    's3://b/x.png'
    """
    return image if is_uri(image) else os.path.abspath(image)
