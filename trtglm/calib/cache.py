"""TensorRT calibration cache files: the interchange format for scales.

TensorRT 10 (implicit INT8), ModelOpt and older tools read and write this text format, so trtglm writes one beside
its Q/DQ model and can start from one instead of calibration data. Layout:

    TRT-101601-EntropyCalibration2
    conv1_out: 3c010204

one line per tensor, `<name>: <scale>`, the scale (amax / 127) as the 8 hex digits of its big-endian IEEE
float32 bytes. A name may itself contain ": ", so a line is split at its last ": ".
"""

from __future__ import annotations

import struct
from pathlib import Path

from trtglm.calib.methods import Scales
from trtglm.errors import DataError
from trtglm.onnx_io import atomic_path

DEFAULT_HEADER = "TRT-101601-EntropyCalibration2"


def hex_from_scale(scale: float) -> str:
    """Big-endian float32 bytes as 8 lowercase hex digits: 1.0 -> '3f800000'."""
    return struct.pack(">f", scale).hex()


def scale_from_hex(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0]


def write_trt_cache(scales: Scales, path: Path, header: str = DEFAULT_HEADER) -> Path:
    """Write the cache atomically, tensors sorted by name."""
    lines = [header] + [f"{name}: {hex_from_scale(scales.scale(name))}" for name in sorted(scales.amax)]
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_trt_cache(path: Path) -> Scales:
    """Read a cache; amax = scale * 127 exactly (float64), so writing it back gives the same bytes.

    The first line is the header (TensorRT's version and calibrator); it does not change the meaning of scales.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"calibration cache {path}: cannot read it ({e})") from e
    if not lines:
        raise DataError(f"calibration cache {path}: empty file; expected a header line such as '{DEFAULT_HEADER}'")
    amax: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        value = value.strip()
        if not sep or not name or len(value) != 8 or not _is_hex(value):
            raise DataError(f"calibration cache {path}:{number}: malformed line {line!r}; expected "
                            "'<tensor name>: <8 hex digits of the float32 scale>'")
        scale = scale_from_hex(value)
        if not scale > 0 or scale == float("inf"):
            raise DataError(f"calibration cache {path}:{number}: tensor '{name}' has scale {scale}; scales must "
                            "be positive and finite")
        amax[name] = scale * 127.0
    return Scales(amax, {name: "cache" for name in amax})


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
