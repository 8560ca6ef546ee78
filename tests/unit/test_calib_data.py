"""Calibration data readers: every layout, labels, preprocessing, split, and one-line errors for bad data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from trtglm.calib.data import InputSpec, batch_count, input_specs, open_dataset, split
from trtglm.errors import ConfigError, DataError


def make_model(mask: bool = False, shape=("N", 1, 8, 8)) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    nodes = [helper.make_node("Identity", ["input"], ["out"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8]))
        outputs.append(helper.make_tensor_value_info("mask_out", TensorProto.INT64, None))
        nodes.append(helper.make_node("Identity", ["mask"], ["mask_out"]))
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def specs(mask: bool = False, shape=("N", 1, 8, 8)) -> list[InputSpec]:
    return input_specs(make_model(mask, shape))


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def write_npy_dir(d, n=10, mask=False, labels=False):
    d.mkdir(exist_ok=True)
    x = samples(n)
    np.save(d / "input.npy", x)
    if mask:
        np.save(d / "mask.npy", np.arange(n * 8, dtype=np.int64).reshape(n, 8))
    if labels:
        np.save(d / "labels.npy", np.arange(n) % 3)
    return x


def assert_data_error(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ----------------------------------------------------------------------------------------------- specs, split


def test_input_specs_skips_initializers_and_keeps_symbolic_and_unknown_dims():
    model = make_model(mask=True)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
    model.graph.initializer.append(helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0]))
    model.graph.input.append(helper.make_tensor_value_info("u", TensorProto.FLOAT16, [None, 4]))
    got = input_specs(model)
    assert [s.name for s in got] == ["input", "mask", "u"]
    assert got[0] == InputSpec("input", ("N", 1, 8, 8), np.dtype(np.float32))
    assert got[1].dtype == np.int64 and got[1].shape == ("N", 8)
    assert got[2].shape == (None, 4) and got[2].dtype == np.float16


def test_split_is_disjoint_deterministic_and_seeded():
    cal, ev = split(100)
    assert sorted(cal + ev) == list(range(100)) and not set(cal) & set(ev)
    assert len(ev) == 20 and ev == sorted(ev) and cal == sorted(cal)
    assert split(100) == (cal, ev)
    assert split(100, seed=1) != (cal, ev)
    assert split(1) == ([0], []) and split(0) == ([], [])
    assert split(2) == ([0], [1]) or split(2) == ([1], [0])
    assert split(10, eval_fraction=0.0) == (list(range(10)), [])


# ----------------------------------------------------------------------------------------------- .npy layout


def test_npy_dir_batches_values_order_and_short_last_batch(tmp_path):
    x = write_npy_dir(tmp_path / "d", n=10, mask=True)
    np.save(tmp_path / "d" / "mask.npy", np.arange(80, dtype=np.int32).reshape(10, 8))  # int32 -> int64 cast
    ds = open_dataset(tmp_path / "d", specs(mask=True))
    assert len(ds) == 10 and not ds.has_labels and "10 samples" in ds.source
    batches = list(ds.batches(range(10), 4))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2] == [b["mask"].shape[0] for b in batches]
    assert batch_count(ds, range(10), 4) == 3
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    for b in batches:
        assert b["input"].dtype == np.float32 and b["input"].flags.c_contiguous
        assert b["mask"].dtype == np.int64 and b["mask"].flags.c_contiguous
    (b,) = ds.batches([7, 2, 5], 8)
    np.testing.assert_array_equal(b["input"], x[[7, 2, 5]])
    np.testing.assert_array_equal(b["mask"], np.arange(80).reshape(10, 8)[[7, 2, 5]])
    assert ds.labels([1, 2]) is None


def test_npy_float64_is_cast_and_labels_follow_batch_order(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    x = samples(6).astype(np.float64)
    np.save(d / "input.npy", x)
    np.save(d / "labels.npy", np.array([5, 4, 3, 2, 1, 0]))
    ds = open_dataset(d, specs())
    assert ds.has_labels
    (b,) = ds.batches([4, 0, 2], 3)
    assert b["input"].dtype == np.float32
    np.testing.assert_allclose(b["input"], x[[4, 0, 2]].astype(np.float32))
    np.testing.assert_array_equal(ds.labels([4, 0, 2]), [1, 5, 3])


def test_static_batch_axis_overrides_batch_size_and_drops_short_batch(tmp_path):
    write_npy_dir(tmp_path / "d", n=7, labels=True)
    ds = open_dataset(tmp_path / "d", specs(shape=(2, 1, 8, 8)))
    assert [b["input"].shape[0] for b in ds.batches(range(7), 32)] == [2, 2, 2]
    assert len(ds.labels(range(7))) == 6 and batch_count(ds, range(7), 32) == 3


# ----------------------------------------------------------------------------------------------- .npz layout


def test_npz_dir_yields_each_file_as_a_batch_sorted_by_name(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    a, b = samples(3, 1), samples(5, 2)
    np.savez(d / "b.npz", input=b, mask=np.ones((5, 8), np.int64), labels=np.arange(5))
    np.savez(d / "a.npz", input=a.astype(np.float64), mask=np.zeros((3, 8), np.int64), labels=np.arange(3) + 10)
    ds = open_dataset(d, specs(mask=True))
    assert len(ds) == 2 and ds.has_labels
    batches = list(ds.batches([0, 1], batch_size=1))  # batch_size is ignored for whole batches
    assert [x["input"].shape[0] for x in batches] == [3, 5] and batch_count(ds, [0, 1], 1) == 2
    np.testing.assert_array_equal(batches[0]["input"], a)
    np.testing.assert_array_equal(batches[1]["input"], b)
    assert batches[0]["input"].dtype == np.float32 and batches[0]["mask"].dtype == np.int64
    np.testing.assert_array_equal(ds.labels([1, 0]), [0, 1, 2, 3, 4, 10, 11, 12])


def test_npz_dynamic_dims_accept_any_size(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.savez(d / "00.npz", input=np.zeros((2, 1, 5, 7), np.float32))
    ds = open_dataset(d, specs(shape=("N", 1, "H", None)))
    assert next(ds.batches([0], 1))["input"].shape == (2, 1, 5, 7)


# ----------------------------------------------------------------------------------------------- images


def write_images(d, n=3, size=(12, 10), mode="RGB"):
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr, mode).save(d / f"{i:02d}.png")
        arrays.append(arr)
    return arrays


def reference(path, mode, resize, crop, mean, std):
    im = Image.open(path).convert(mode)
    w, h = im.size
    rw, rh = (resize, round(h * resize / w)) if w <= h else (round(w * resize / h), resize)
    im = im.resize((rw, rh), Image.Resampling.BILINEAR)
    left, top = (rw - crop) // 2, (rh - crop) // 2
    a = np.asarray(im.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
    return (a.reshape(crop, crop, -1) - np.float32(mean)) / np.float32(std)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_rgb_images_resize_crop_normalize(tmp_path, layout):
    write_images(tmp_path / "img", n=3, size=(12, 10))
    shape = ("N", 3, 8, 8) if layout == "NCHW" else ("N", 8, 8, 3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = f"resize=9,crop=8,mean={';'.join(map(str, mean))},std={';'.join(map(str, std))},layout={layout}"
    ds = open_dataset(tmp_path / "img", specs(shape=shape), preprocess=pre)
    assert len(ds) == 3 and not ds.has_labels
    batches = list(ds.batches(range(3), 2))
    assert [b["input"].shape for b in batches] == [(2,) + shape[1:], (1,) + shape[1:]]
    got = np.concatenate([b["input"] for b in batches])
    assert got.dtype == np.float32 and got.flags.c_contiguous
    for i in range(3):
        want = reference(tmp_path / "img" / f"{i:02d}.png", "RGB", 9, 8, mean, std)
        np.testing.assert_allclose(got[i], want.transpose(2, 0, 1) if layout == "NCHW" else want, atol=1e-6)


def test_grayscale_model_converts_rgb_images_to_l_and_reads_labels(tmp_path):
    write_images(tmp_path / "img", n=4, size=(8, 8), mode="RGB")
    np.save(tmp_path / "img" / "labels.npy", np.array([3, 1, 2, 0]))
    ds = open_dataset(tmp_path / "img", specs(), preprocess="mean=0.5,std=0.25")
    (b,) = ds.batches([2, 0], 4)
    assert b["input"].shape == (2, 1, 8, 8)
    want = (np.asarray(Image.open(tmp_path / "img" / "02.png").convert("L"), np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(b["input"][0, 0], want, atol=1e-6)
    np.testing.assert_array_equal(ds.labels([2, 0]), [2, 3])


def test_grayscale_images_without_preprocess(tmp_path):
    arrays = write_images(tmp_path / "img", n=2, size=(8, 8), mode="L")
    ds = open_dataset(tmp_path / "img", specs())
    (b,) = ds.batches([1], 1)
    np.testing.assert_allclose(b["input"][0, 0], arrays[1] / 255.0, atol=1e-6)


@pytest.mark.parametrize("pre,expect", [("size=8", "'size'"), ("resize", "key=value"), ("resize=-3", "resize"),
                                        ("crop=a", "crop"), ("mean=x;y", "mean"), ("std=0", "std"),
                                        ("layout=NCWH", "layout"), ("mean=1;2", "mean")])
def test_bad_preprocess_is_a_one_line_config_error(tmp_path, pre, expect):
    write_images(tmp_path / "img", n=1, size=(8, 8))
    with pytest.raises(ConfigError) as e:
        open_dataset(tmp_path / "img", specs(), preprocess=pre)
    assert_data_error(e, "--preprocess", expect)


def test_image_size_mismatch_names_the_image(tmp_path):
    write_images(tmp_path / "img", n=2, size=(12, 10))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "img", specs(shape=("N", 3, 8, 8)))
    assert_data_error(e, "00.png", "'input'", "10x12", "8x8")
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "img", specs(shape=("N", 3, 8, 8)), preprocess="crop=11")
    assert_data_error(e, "00.png", "'input'", "crop 11x11")


def test_corrupt_image(tmp_path):
    write_images(tmp_path / "img", n=2, size=(8, 8))
    (tmp_path / "img" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "img", specs(shape=("N", 3, 8, 8)))
    assert_data_error(e, "01.png", "unreadable")


# ----------------------------------------------------------------------------------------------- script


def test_script_loader_materializes_batches(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def load():\n"
        "    CALLS.append(1)\n"
        "    for i in range(3):\n"
        "        yield {'input': np.full((i + 1, 1, 8, 8), i, np.float64), 'labels': np.arange(i + 1)}\n"
    )
    ds = open_dataset(None, specs(), script=f"{script}:load")
    assert len(ds) == 3 and ds.has_labels
    for _ in range(2):  # iterating twice works: the generator was materialized once
        batches = list(ds.batches(range(3), 100))
        assert [b["input"].shape[0] for b in batches] == [1, 2, 3]
        assert batches[2]["input"].dtype == np.float32 and float(batches[2]["input"][0, 0, 0, 0]) == 2.0
    np.testing.assert_array_equal(ds.labels([2, 0]), [0, 1, 2, 0])


def test_script_errors(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import numpy as np\ndef load():\n    return [{'input': np.zeros((1, 1, 8, 8), np.float32),"
                      " 'foo': np.zeros(1)}]\ndef boom():\n    raise RuntimeError('no data\\nsecond line')\n")
    with pytest.raises(DataError) as e:
        open_dataset(None, specs(), script=f"{script}:load")
    assert_data_error(e, "bad.py", "batch 0", "unknown input 'foo'", "model inputs are: input")
    with pytest.raises(DataError) as e:
        open_dataset(None, specs(), script=f"{script}:boom")
    assert_data_error(e, "bad.py", "no data")
    with pytest.raises(DataError) as e:
        open_dataset(None, specs(), script=f"{script}:missing")
    assert_data_error(e, "bad.py", "missing")
    with pytest.raises(DataError) as e:
        open_dataset(None, specs(), script=f"{tmp_path / 'nope.py'}:load")
    assert_data_error(e, "nope.py", "not found")


# ----------------------------------------------------------------------------------------------- bad data


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "nothere", specs())
    assert_data_error(e, "nothere", "not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "empty", specs())
    assert_data_error(e, "empty/", "no .npy, .npz or image files found")


def test_npy_unknown_and_missing_inputs(tmp_path):
    write_npy_dir(tmp_path / "d")
    np.save(tmp_path / "d" / "foo.npy", samples(10))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs())
    assert_data_error(e, "foo.npy", "unknown input 'foo'", "model inputs are: input")
    (tmp_path / "d" / "foo.npy").unlink()
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs(mask=True))
    assert_data_error(e, "mask.npy", "'mask' missing")


@pytest.mark.parametrize("array,expect", [
    (np.zeros((4, 1, 8), np.float32), "samples of shape (1, 8), model expects (1, 8, 8) per sample"),
    (np.zeros((4, 2, 8, 8), np.float32), "samples of shape (2, 8, 8)"),
    (np.zeros((4, 1, 8, 8), np.int64), "dtype int64, model expects float32"),
    (np.zeros((0, 1, 8, 8), np.float32), "no samples"),
])
def test_npy_bad_shape_or_dtype(tmp_path, array, expect):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "input.npy", array)
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs())
    assert_data_error(e, "input.npy", "'input'", expect)


def test_float_data_for_int64_input(tmp_path):
    write_npy_dir(tmp_path / "d")
    np.save(tmp_path / "d" / "mask.npy", np.zeros((10, 8), np.float32))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs(mask=True))
    assert_data_error(e, "mask.npy", "'mask'", "dtype float32, model expects int64")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npy_nan_or_inf_names_first_bad_sample(tmp_path, bad):
    (tmp_path / "d").mkdir()
    x = samples(10)
    x[6, 0, 3, 3] = bad
    x[8, 0, 0, 0] = bad
    np.save(tmp_path / "d" / "input.npy", x)
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs())
    assert_data_error(e, "input.npy", "'input'", "NaN or Inf", "sample 6")


def test_npy_differing_sample_counts_and_label_count(tmp_path):
    write_npy_dir(tmp_path / "d", n=10)
    np.save(tmp_path / "d" / "mask.npy", np.zeros((9, 8), np.int64))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs(mask=True))
    assert_data_error(e, "input.npy: 10", "mask.npy: 9", "different sample counts")
    np.save(tmp_path / "d" / "mask.npy", np.zeros((10, 8), np.int64))
    np.save(tmp_path / "d" / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs(mask=True))
    assert_data_error(e, "labels.npy", "7 labels for 10 samples")
    np.save(tmp_path / "d" / "labels.npy", np.zeros(10, np.float32))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs(mask=True))
    assert_data_error(e, "labels.npy", "integer")


def test_corrupt_npy_and_npz(tmp_path):
    write_npy_dir(tmp_path / "d")
    (tmp_path / "d" / "input.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs())
    assert_data_error(e, "input.npy", "unreadable")
    (tmp_path / "z").mkdir()
    np.savez(tmp_path / "z" / "00.npz", input=samples(2))
    (tmp_path / "z" / "01.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "z", specs())
    assert_data_error(e, "01.npz", "unreadable")


def write_npz(d, name, **arrays):
    d.mkdir(exist_ok=True)
    np.savez(d / name, **arrays)


@pytest.mark.parametrize("arrays,expect", [
    (dict(input=np.zeros((3, 32, 32), np.float32)), "input 'input' has shape (3, 32, 32), model expects (N, 1, 8, 8)"),
    (dict(input=np.zeros((2, 3, 8, 8), np.float32)), "has shape (2, 3, 8, 8)"),
    (dict(input=np.zeros((2, 1, 8, 8), np.int32)), "'input' has dtype int32, model expects float32"),
    (dict(input=np.zeros((2, 1, 8, 8), np.float32), foo=np.zeros(2)), "unknown input 'foo'"),
    (dict(labels=np.zeros(2, np.int64)), "model input 'input' missing"),
    (dict(input=np.zeros((2, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64)), "3 labels for 2 samples"),
])
def test_npz_bad_batch(tmp_path, arrays, expect):
    write_npz(tmp_path / "data", "00.npz", input=samples(2))
    write_npz(tmp_path / "data", "07.npz", **arrays)
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "data", specs())
    assert_data_error(e, "calibration sample", "07.npz", expect)


def test_npz_inf_and_int64_mask_as_float(tmp_path):
    x = samples(4)
    x[2, 0, 1, 1] = np.inf
    write_npz(tmp_path / "data", "03.npz", input=x, mask=np.zeros((4, 8), np.int64))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "data", specs(mask=True))
    assert_data_error(e, "03.npz", "'input'", "NaN or Inf", "sample 2")
    write_npz(tmp_path / "data", "03.npz", input=samples(4), mask=np.zeros((4, 8), np.float64))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "data", specs(mask=True))
    assert_data_error(e, "03.npz", "'mask'", "float64")


def test_preprocess_on_non_image_dir_and_mixed_layouts(tmp_path):
    write_npy_dir(tmp_path / "d")
    with pytest.raises(ConfigError):
        open_dataset(tmp_path / "d", specs(), preprocess="resize=8")
    np.savez(tmp_path / "d" / "x.npz", input=samples(1))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d", specs())
    assert_data_error(e, "d/", "mixes npy and npz")
