"""Loading and saving: checker errors, external data for models over the protobuf limit, atomic writes."""

import numpy as np
import onnx
import pytest

from tests import models
from trtglm import onnx_io
from trtglm.errors import ModelError, TrtglmError


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    model = models.build_cnn_classifier()
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 1024)  # stand-in for 2 GiB: every model here is "large"
    path = onnx_io.save_model(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "big.onnx.data").stat().st_size
    # the caller's proto still holds its weights
    assert all(init.raw_data or init.float_data for init in model.graph.initializer)
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 2**31 - 1)
    loaded = onnx_io.load_model(path)
    feeds = models.random_inputs(model)
    np.testing.assert_array_equal(models.run_ort(model, feeds)[0], models.run_ort(loaded, feeds)[0])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError):
        with onnx_io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_saved_files_are_not_private(tmp_path):
    path = onnx_io.save_model(models.build_mlp(), tmp_path / "m.onnx")
    assert path.stat().st_mode & 0o044  # readable by group/others under the usual umask


def test_checker_failure_names_the_file(tmp_path):
    model = models.build_mlp()
    model.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="broken.onnx"):
        onnx_io.load_model(path)


def test_unwritable_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrtglmError, match="cannot write"):
        onnx_io.save_model(models.build_mlp(), tmp_path / "file" / "m.onnx")
