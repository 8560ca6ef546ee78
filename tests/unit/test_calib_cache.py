"""TensorRT calibration cache: known encoding, exact round trip, errors that name the file and line."""

import numpy as np
import pytest

from trtglm.calib.cache import hex_from_scale, read_trt_cache, write_trt_cache
from trtglm.calib.methods import Scales
from trtglm.errors import DataError


def test_known_encoding(tmp_path):
    assert hex_from_scale(1.0) == "3f800000"
    path = write_trt_cache(Scales({"b": 127.0, "a": 254.0}, {"a": "minmax", "b": "minmax"}), tmp_path / "c.cache")
    assert path.read_text() == "TRT-101601-EntropyCalibration2\na: 40000000\nb: 3f800000\n"


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    amax = {f"t{i}: odd/name.{i}": float(np.float32(v)) for i, v in enumerate(rng.lognormal(0, 4, size=200))}
    scales = Scales(amax, {n: "entropy" for n in amax})
    first = write_trt_cache(scales, tmp_path / "one.cache", header="TRT-8601-EntropyCalibration2")
    back = read_trt_cache(first)
    assert set(back.amax) == set(amax)
    for name in amax:
        assert back.scale(name) == scales.scale(name)
        assert back.method[name] == "cache"
    second = write_trt_cache(back, tmp_path / "two.cache", header="TRT-8601-EntropyCalibration2")
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary behind


@pytest.mark.parametrize("line", ["conv1_out 3f800000", "conv1_out: 3f80000", "conv1_out: zzzzzzzz", ": 3f800000",
                                  "conv1_out: 00000000", "conv1_out: 7fc00000"])
def test_malformed_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "bad.cache"
    path.write_text(f"TRT-101601-EntropyCalibration2\nok: 3f800000\n{line}\n")
    with pytest.raises(DataError, match=rf"bad\.cache:3"):
        read_trt_cache(path)


def test_missing_or_empty_cache(tmp_path):
    with pytest.raises(DataError, match="nope.cache"):
        read_trt_cache(tmp_path / "nope.cache")
    (tmp_path / "empty.cache").write_text("")
    with pytest.raises(DataError, match="empty.cache: empty"):
        read_trt_cache(tmp_path / "empty.cache")
