"""--accuracy-budget: per-layer sensitivity, the smallest float set that meets the budget, and its report."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

from tests import models
from trtglm.cli import main
from trtglm.sensitivity import Layer, int8_mac_fraction, linear_layers


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn")
    model = models.build_attention(seq=8, hidden=16, heads=2)
    path = tmp / "attn.onnx"
    onnx.save(model, path)
    feeds = models.random_inputs(model, batch=64, seed=3)
    feeds["x"][..., 5] *= 30.0  # an outlier channel
    (tmp / "calib").mkdir()
    for name, value in feeds.items():
        np.save(tmp / "calib" / f"{name}.npy", value)
    return path, tmp / "calib"


def _build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


def test_linear_layers_count_macs_per_sample():
    graph = gs.import_onnx(models.build_mlp())
    layers = linear_layers(graph, ["fc1", "fc2"])
    assert [(x.node, x.macs) for x in layers] == [("fc1", 16 * 32), ("fc2", 32 * 8)]
    layers[0].precision = "float"
    assert int8_mac_fraction(layers) == pytest.approx(256 / 768)
    assert int8_mac_fraction([Layer("a", "MatMul", 0)]) == 1.0


def test_budget_keeps_the_most_sensitive_layers_float_and_reports_them(attention, tmp_path):
    model, calib = attention
    loose = _build(model, "--calib", calib, "--smoothquant", "off", "--accuracy-budget", "0.5", "--out", tmp_path / "loose")
    assert loose.exit_code == 0, loose.output
    rep = json.loads((tmp_path / "loose" / "report.json").read_text())
    sens = rep["sensitivity"]
    assert sens["chosen_error"] == sens["full_int8_error"] > 0  # already within budget: nothing kept float
    assert all(x["precision"] == "int8" and x["error"] > 0 for x in sens["layers"])
    budget = sens["full_int8_error"] / 3
    tight = _build(model, "--calib", calib, "--smoothquant", "off", "--accuracy-budget", f"{budget:.3g}",
                   "--out", tmp_path / "tight")
    assert tight.exit_code == 0, tight.output
    rep = json.loads((tmp_path / "tight" / "report.json").read_text())
    sens = rep["sensitivity"]
    kept = [x for x in sens["layers"] if x["precision"] == "float"]
    assert kept and sens["chosen_error"] <= budget
    worst = max(sens["layers"], key=lambda x: x["error"])
    assert worst in kept  # the most sensitive layer is the first kept in float
    assert set(x["node"] for x in kept) <= set(rep["quantization"]["kept_float"])
    assert rep["quantization"]["int8_mac_fraction"] < 1.0
    assert (tmp_path / "tight" / "plots" / "sensitivity.png").stat().st_size > 1000
    md = (tmp_path / "tight" / "report.md").read_text()
    assert "## Sensitivity" in md and worst["node"] in md
    config = json.loads((tmp_path / "tight" / "quant_config.json").read_text())
    assert {x["node"] for x in config["layers"] if x["precision"] == "float"} == {x["node"] for x in kept}


def test_bad_budget_is_a_one_line_error(attention, tmp_path):
    model, calib = attention
    result = _build(model, "--calib", calib, "--accuracy-budget", "2", "--out", tmp_path / "bad")
    assert result.exit_code not in (0, None) and "--accuracy-budget 2" in result.stderr
