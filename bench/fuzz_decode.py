"""Fuzz target for the image decoding path: ``camserve.wire`` header checks and decoding
(``camserve.imaging.decode_image`` through :func:`camserve.wire.decode_image_proto`), with
atheris (libFuzzer for Python).

    pip install atheris                              # or: pip install -e '.[dev]' (Linux)
    python bench/fuzz_decode.py -runs=100000         # seeds written to a temporary corpus
    python bench/fuzz_decode.py CORPUS_DIR -max_total_time=600 -rss_limit_mb=2048
    python bench/fuzz_decode.py --replay crash-1234abcd ...   # re-run inputs (no atheris needed)

The first input byte picks a mode: an encoded image (the other bytes), or a wire Tensor whose
dtype, shape and data are drawn from the bytes. :func:`check` is the property; any exception
it lets out is a finding (libFuzzer saves the input as ``crash-<sha1>``):

- only :class:`camserve.errors.InvalidArgument` (ImageError) may escape, never a numpy /
  OpenCV / struct error;
- a decoded image is RGB uint8 with at most ``MAX_PIXELS`` pixels, and no more pixels than
  its header declared (otherwise the header check could be bypassed: a decompression bomb);
- a decoded tensor has the declared height and width, and float tensors are finite.

Results of the runs made here: ``bench/results/fuzz.md``.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")

#: Pixel limit given to decode_image_proto: small, so that decodes stay fast and any header
#: that declares more must be refused before decoding.
MAX_PIXELS = 256 * 256

MODES = ("encoded", "tensor")
_DTYPES = ("uint8", "float32", "float64", "int16", "", "uint8 ", "float16", "bool", "object", "U8")


def _modules():
    from camserve import wire
    from camserve.errors import InvalidArgument
    from camserve.proto import pb

    return wire, InvalidArgument, pb


def tensor_from_bytes(data: bytes):
    """A wire Tensor drawn from ``data``: dtype index, rank, dims (small and wild ones), payload."""
    _, _, pb = _modules()
    if len(data) < 2:
        return pb.Tensor()
    dtype = _DTYPES[data[0] % len(_DTYPES)]
    rank = data[1] % 5
    rest = data[2:]
    shape = []
    for _i in range(rank):
        chunk = rest[:9].ljust(9, b"\0")
        rest = rest[9:]
        kind = chunk[0] % 4
        if kind == 0:  # small
            shape.append(chunk[1] % 40)
        elif kind == 1:  # 16-bit
            shape.append(struct.unpack("<H", chunk[1:3])[0])
        elif kind == 2:  # any int64, negative included
            shape.append(struct.unpack("<q", chunk[1:9])[0])
        else:  # a power of two (overflow hunting)
            shape.append(1 << (chunk[1] % 63))
    return pb.Tensor(dtype=dtype, shape=shape, data=rest)


def check(data: bytes) -> None:
    """Run one fuzz input through the decoding path; raise AssertionError (or whatever the
    code under test raised) when a property fails, return quietly otherwise.

    >>> check(b"\\x00not an image")
    """
    wire, InvalidArgument, pb = _modules()
    import numpy as np

    if not data:
        return
    mode = MODES[data[0] % len(MODES)]
    body = data[1:]
    if mode == "encoded":
        msg = pb.Image(encoded=body)
        try:
            declared = wire.encoded_size(body)
        except InvalidArgument:
            declared = None
    else:
        msg = pb.Image(tensor=tensor_from_bytes(body))
        declared = None
    try:
        img = wire.decode_image_proto(msg, MAX_PIXELS)
    except InvalidArgument as e:
        assert str(e), "an error without a message"
        return
    a = img.array
    assert a.ndim == 3, f"decoded array of shape {a.shape}"
    h, w = a.shape[:2]
    assert 0 < h * w <= MAX_PIXELS, f"decoded {w}x{h} image passed a limit of {MAX_PIXELS} pixels"
    if mode == "encoded":
        assert declared is not None, "decoded an image whose header encoded_size refuses"
        fmt, dw, dh = declared
        assert h * w <= dw * dh, f"{fmt} header declares {dw}x{dh} but {w}x{h} pixels were decoded"
        assert a.dtype == np.uint8 and a.shape[2] == 3 and not img.preprocessed
    else:
        t = msg.tensor
        assert (h, w) == (t.shape[0], t.shape[1]), f"tensor {list(t.shape)} decoded as {a.shape}"
        if img.preprocessed:
            assert a.dtype == np.float32 and bool(np.isfinite(a).all())
        else:
            assert a.dtype == np.uint8 and a.shape[2] == 3


# ------------------------------------------------------------------ seeds


def seeds() -> dict[str, bytes]:
    """Small valid inputs of every mode and format (the fuzzer mutates from these)."""
    import cv2
    import numpy as np

    from camserve.imaging import encode_png

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    out = {}
    for ext in (".png", ".jpg", ".bmp", ".webp"):
        ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        out[f"rgb{ext}"] = b"\x00" + buf.tobytes()
    ok, buf = cv2.imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless (VP8L)
    out["lossless.webp"] = b"\x00" + buf.tobytes()
    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    out["progressive.jpg"] = b"\x00" + buf.tobytes()
    out["grey.png"] = b"\x00" + encode_png(np.repeat(rgb[..., :1], 3, axis=2))
    ok, buf = cv2.imencode(".png", np.dstack([rgb, rgb[..., :1]]))  # RGBA
    out["rgba.png"] = b"\x00" + buf.tobytes()
    # OS/2 BMP (12-byte BITMAPCOREHEADER), 4x3, 24 bit.
    w, h = 4, 3
    row = bytes(w * 3).ljust((w * 3 + 3) // 4 * 4, b"\0")
    off = 14 + 12
    out["os2.bmp"] = (
        b"\x00BM"
        + struct.pack("<IHHI", off + len(row) * h, 0, 0, off)
        + struct.pack("<IHHHH", 12, w, h, 1, 24)
        + row * h
    )

    # Tensors: uint8 (5, 6, 3) and float32 (4, 4, 3).
    def tensor_seed(dtype_index: int, dims: tuple[int, ...], payload: bytes) -> bytes:
        return b"\x01" + bytes([dtype_index, len(dims)]) + b"".join(bytes([0, d]) + b"\0" * 7 for d in dims) + payload

    out["uint8.tensor"] = tensor_seed(0, (5, 6, 3), bytes(range(90)))
    out["float32.tensor"] = tensor_seed(1, (4, 4, 3), np.linspace(-1, 1, 48, dtype=np.float32).tobytes())
    return out


def write_seeds(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / name).write_bytes(data)
    return folder


# ------------------------------------------------------------------ entry point


def _replay(paths: list[str]) -> int:
    failures = 0
    for p in paths:
        try:
            check(Path(p).read_bytes())
            print(f"{p}: ok")
        except Exception as e:  # noqa: BLE001 - report every finding
            failures += 1
            print(f"{p}: {type(e).__name__}: {e}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if argv[1:2] == ["--replay"]:
        return _replay(argv[2:])
    try:
        import atheris
    except ImportError:
        print(
            "atheris is not installed. Install it with `pip install atheris` (binary wheels for Linux "
            "x86-64, CPython 3.8-3.11; elsewhere it builds from source and needs clang with libFuzzer), "
            "or `pip install -e '.[dev]'`. Without it, `--replay FILE...` still re-runs saved inputs.",
            file=sys.stderr,
        )
        return 2
    with atheris.instrument_imports(include=["camserve"]):
        import camserve.imaging
        import camserve.wire  # noqa: F401
    args = list(argv)
    folders = [a for a in args[1:] if not a.startswith("-")]
    if not folders:  # no corpus folder given: seed a temporary one
        args.append(str(write_seeds(Path(tempfile.mkdtemp(prefix="camserve-fuzz-")))))
    elif Path(folders[0]).is_dir() and not any(Path(folders[0]).iterdir()):  # an empty corpus: seed it
        write_seeds(Path(folders[0]))

    def one(data: bytes) -> None:
        check(data)

    atheris.Setup(args, one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
