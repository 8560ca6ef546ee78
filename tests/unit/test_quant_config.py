"""quant_config.json: written by every build, fed back with --quant-config, checked entry by entry."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests import models
from trtglm import quant_config
from trtglm.cli import main
from trtglm.errors import ConfigError


@pytest.fixture()
def mlp(tmp_path):
    """The MLP with calibration inputs whose channel 0 is an outlier (so SmoothQuant has work to do)."""
    model = models.build_mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32)
    x[:, 0] *= 40.0
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "input.npy", x)
    return path, tmp_path / "calib"


def _build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


def test_build_writes_decisions_and_feeding_them_back_reproduces_the_model(mlp, tmp_path):
    model, calib = mlp
    assert _build(model, "--calib", calib, "--out", tmp_path / "a").exit_code == 0
    cfg = json.loads((tmp_path / "a" / "quant_config.json").read_text())
    assert cfg["format"] == quant_config.FORMAT
    assert [layer["node"] for layer in cfg["layers"]] == ["fc1", "fc2"]
    assert all(layer["precision"] == "int8" for layer in cfg["layers"])
    first = next(a for a in cfg["activations"] if a["tensor"] == "input")
    assert first["smoothquant"] is not None and "none" in first["alpha_errors"]  # searched, and it smoothed
    result = _build(model, "--calib", calib, "--quant-config", tmp_path / "a" / "quant_config.json",
                    "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "model.int8.qdq.onnx").read_bytes() == (tmp_path / "b" / "model.int8.qdq.onnx").read_bytes()


def test_edited_config_pins_precision_smoothing_and_method(mlp, tmp_path):
    model, calib = mlp
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({"format": quant_config.FORMAT,
                                  "layers": [{"node": "fc2", "precision": "float"}],
                                  "activations": [{"tensor": "input", "smoothquant": None, "method": "minmax"}]}))
    result = _build(model, "--calib", calib, "--quant-config", edited, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert "fc2" in rep["quantization"]["kept_float"]
    assert rep["passes"]["smooth_quant"] == 0
    assert rep["tensors"]["input"]["method"] == "minmax"
    int8 = onnx.load(tmp_path / "c" / "model.int8.qdq.onnx")
    fc2 = next(n for n in int8.graph.node if n.name == "fc2")
    producers = {o: n.op_type for n in int8.graph.node for o in n.output}
    assert all(producers.get(t) != "DequantizeLinear" for t in fc2.input)
    assert rep["quantization"]["int8_mac_fraction"] == pytest.approx(16 * 32 / (16 * 32 + 32 * 8), abs=1e-4)


@pytest.mark.parametrize("content, needle", [
    ("not json", "not a JSON file"),
    ('{"format": "other"}', "trtglm-quant-config/1"),
    ('{"format": "trtglm-quant-config/1", "layers": [{"node": "nope", "precision": "float"}]}', "'nope' is not in"),
    ('{"format": "trtglm-quant-config/1", "layers": [{"node": "fc1", "precision": "int4"}]}', "precision 'int4'"),
    ('{"format": "trtglm-quant-config/1", "activations": [{"tensor": "input", "smoothquant": 2}]}', "smoothquant 2"),
    ('{"format": "trtglm-quant-config/1", "activations": [{"tensor": "input", "method": "kl"}]}', "method 'kl'"),
    ('{"format": "trtglm-quant-config/1", "layers": {"fc1": "float"}}', "must be a list"),
])
def test_bad_config_is_a_one_line_error_naming_the_entry(tmp_path, content, needle):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        quant_config.read(path, {"fc1", "fc2"}, {"input", "fc1_out"})
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
