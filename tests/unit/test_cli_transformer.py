"""The build command's transformer options end to end: --attention native, --fp16 (with and without INT8),
text calibration data (--tokenizer), and their one-line errors."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests import models
from tests.unit.test_calib_text import make_model, make_tokenizer, write_text
from trtglm.cli import main


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn")
    model = models.build_attention(seq=8, hidden=16, heads=2, mask="add")
    onnx.save(model, tmp / "attn.onnx")
    (tmp / "calib").mkdir()
    for name, value in models.random_inputs(model, batch=48, seed=1).items():
        np.save(tmp / "calib" / f"{name}.npy", value)
    return tmp / "attn.onnx", tmp / "calib"


def _build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


def _report(out):
    return json.loads((out / "report.json").read_text())


def _cosine(rep) -> dict:
    return {fig: row[fig]["cosine"] for row in rep["accuracy"]["outputs"].values() for fig in ("sim", "ort")}


def test_native_attention_becomes_one_attention_op_and_stays_accurate(attention, tmp_path):
    model, calib = attention
    result = _build(model, "--calib", calib, "--attention", "native", "--out", tmp_path / "n")
    assert result.exit_code == 0, result.output
    rep = _report(tmp_path / "n")
    assert rep["fusions"]["attention"] == 1 and rep["fusions"]["qkv_groups"] == 1
    int8 = onnx.load(tmp_path / "n" / "model.int8.qdq.onnx")
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    producers = {o: n.op_type for n in int8.graph.node for o in n.output}
    attention_node = next(n for n in int8.graph.node if n.op_type == "Attention")
    assert all(producers.get(t) != "DequantizeLinear" for t in attention_node.input)  # BMMs and mask stay float
    assert ops.count("MatMul") == 2 and all(producers.get(n.input[1]) == "DequantizeLinear"
                                            for n in int8.graph.node if n.op_type == "MatMul")  # QKV, out: INT8
    assert next(o.version for o in int8.opset_import if o.domain in ("", "ai.onnx")) >= 23
    assert min(_cosine(rep).values()) > 0.99
    assert rep["accuracy"]["fp32_optimized_max_rel_err"] < 1e-4


def test_fp16_without_int8_writes_an_fp16_model(attention, tmp_path):
    model, calib = attention
    result = _build(model, "--no-int8", "--fp16", "--eval", calib, "--out", tmp_path / "h")
    assert result.exit_code == 0, result.output
    out = onnx.load(tmp_path / "h" / "model.fp16.onnx")
    assert {i.type.tensor_type.elem_type for i in out.graph.input} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in out.graph.initializer)
    assert not (tmp_path / "h" / "quant_config.json").exists()
    assert min(_cosine(_report(tmp_path / "h")).values()) > 0.999


def test_int8_fp16_has_fp16_scales(attention, tmp_path):
    model, calib = attention
    result = _build(model, "--calib", calib, "--fp16", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    int8 = onnx.load(tmp_path / "q" / "model.int8.qdq.onnx")
    inits = {t.name: t for t in int8.graph.initializer}
    dq = [n for n in int8.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq if n.input[1] in inits)
    assert _report(tmp_path / "q")["passes"]["convert_fp16"] > 0
    assert min(_cosine(_report(tmp_path / "q")).values()) > 0.99


@pytest.mark.parametrize("args, needle", [
    (["--attention", "native", "--int8-attention"], "--int8-attention needs --attention decomposed"),
    (["--no-int8", "--accuracy-budget", "0.01"], "apply to INT8 builds"),
    (["--smoothquant", "strong"], "--smoothquant 'strong'"),
    (["--max-seq", "1"], "--max-seq 1"),
    (["--weight-only", "int4", "--block-size", "100"], "--block-size 100"),
    (["--asymmetric"], "--asymmetric applies to --weight-only"),
    (["--weight-only", "int4", "--accuracy-budget", "0.01"], "--weight-only needs no calibration"),
])
def test_bad_transformer_options_are_one_line_errors(attention, tmp_path, args, needle):
    model, calib = attention
    result = _build(model, "--calib", calib, *args, "--out", tmp_path / "bad")
    assert result.exit_code not in (0, None)
    assert needle in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()


def test_text_calibration_through_the_cli(tmp_path):
    make_tokenizer(tmp_path / "tok")
    onnx.save(make_model(), tmp_path / "text.onnx")
    lines = [" ".join(np.random.default_rng(i).choice(["the", "cat", "sat", "on", "a", "mat"], 5)) for i in range(40)]
    write_text(tmp_path / "calib.txt", lines)
    result = _build(tmp_path / "text.onnx", "--calib", tmp_path / "calib.txt", "--tokenizer", tmp_path / "tok",
                    "--max-seq", "8", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    rep = _report(tmp_path / "t")
    assert "calib.txt" in rep["accuracy"]["eval"] and rep["accuracy"]["samples"] == 8
    missing = _build(tmp_path / "text.onnx", "--calib", tmp_path / "calib.txt", "--tokenizer", tmp_path / "nope",
                     "--out", tmp_path / "t2")
    assert missing.exit_code not in (0, None) and "nope" in missing.stderr


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_weight_only_build_needs_no_calibration(attention, tmp_path, bits):
    model, calib = attention
    result = _build(model, "--weight-only", bits, "--block-size", "16", "--eval", calib, "--out", tmp_path / bits)
    assert result.exit_code == 0, result.output
    out = onnx.load(tmp_path / bits / f"model.{bits}.wo.onnx")
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(helper_attr(n, "block_size") == 16 for n in dq)  # fused QKV + output projection
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)  # activations stay float
    inits = {t.name: t.data_type for t in out.graph.initializer}
    want = onnx.TensorProto.INT4 if bits == "int4" else onnx.TensorProto.INT8
    assert all(inits[n.input[0]] == want for n in dq)
    rep = _report(tmp_path / bits)
    assert rep["passes"]["weight_only"] == 2 and min(_cosine(rep).values()) > (0.99 if bits == "int8" else 0.9)


def helper_attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)
