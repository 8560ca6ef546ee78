"""fuse_attention on attention blocks built in code: matched and not-matched cases, ORT equality native vs original."""

import math

import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, version_converter

from tests import models
from tests.attention_models import HEAD_DIM, build_attention_block
from trtglm.errors import ConfigError
from trtglm.passes import PassContext
from trtglm.passes.fuse_attention import fuse_attention


def _fuse(model, mode="native", opset=23):
    return models.apply_pass(model, fuse_attention, opset, attention=mode)


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_equal(before, after, feeds=None):
    feeds = feeds if feeds is not None else models.random_inputs(before, batch=3)
    ref, got = models.run_ort(before, feeds), models.run_ort(after, feeds)
    assert models.max_rel_err(ref, got) < 1e-5


@pytest.mark.parametrize("style,seq", [("bert", 6), ("bert", "S"), ("sdpa", 6), ("gqa", 6), ("rotary", 6),
                                       ("bias", 6), ("dynamo", 6)])
def test_native_replaces_the_block_by_one_attention_node(style, seq):
    model = build_attention_block(style, seq=seq, opset=23)
    fused, count, log = _fuse(model)
    assert count == 1
    ops = models.ops(fused)
    assert ops.count("Attention") == 1
    assert not {"Softmax", "IsNaN", "Div"} & set(ops) and ops.count("MatMul") == 4  # Q, K, V, out projections
    assert ops.count("Add") == {"bias": 1, "rotary": 2}.get(style, 0)  # bias + mask summed; rotary keeps its Adds
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    attrs = _attrs(attention)
    assert attrs["scale"] == pytest.approx(1 / math.sqrt(HEAD_DIM), rel=1e-6)
    assert attrs["softmax_precision"] == onnx.TensorProto.FLOAT
    assert len(attention.input) == (3 if style in ("gqa", "rotary") else 4)
    assert attention.output[0] == "attn_output"
    assert "-> Attention" in log[-1]
    _check_equal(model, fused)


def test_gqa_feeds_the_unexpanded_key_and_value():
    fused, _, log = _fuse(build_attention_block("gqa", kv_heads=2, opset=23))
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert list(attention.input) == ["q.transpose", "k.transpose", "v.transpose"]
    assert not {"Expand", "Unsqueeze"} & set(models.ops(fused))
    assert "gqa=yes" in log[-1]


def test_sdpa_fully_masked_row_gives_zeros_like_the_nan_guard():
    model = build_attention_block("sdpa", opset=23)
    fused, count, _ = _fuse(model)
    assert count == 1
    feeds = models.random_inputs(model, batch=2)
    feeds["attention_mask"][1, :, 2, :] = False  # query 2 of sample 1 attends nothing: the guard makes it 0
    _check_equal(model, fused, feeds)


@pytest.mark.parametrize("style,expected", [("bert", "heads=4, gqa=no, rotary=no, mask=yes"),
                                            ("gqa", "heads=4, gqa=yes, rotary=no, mask=no"),
                                            ("rotary", "heads=4, gqa=no, rotary=yes, mask=no")])
def test_decomposed_recognises_and_leaves_the_graph(style, expected):
    model = build_attention_block(style)
    fused, count, log = _fuse(model, mode="decomposed", opset=17)
    assert count == 1
    assert sorted(models.ops(fused)) == sorted(models.ops(model))
    assert log == [f"fuse_attention: 'attn_output': {expected}"]


def test_exported_head_split_with_computed_shapes():
    """tests.models.build_attention: Reshape shapes from Shape/Gather/Concat (heads unknown to shape inference),
    K^T = Transpose(0,2,3,1), int mask turned additive; converted to opset 23 for native mode."""
    model = version_converter.convert_version(models.build_attention(mask="int"), 23)
    fused, count, log = _fuse(model)
    assert count == 1 and models.ops(fused).count("Attention") == 1
    assert log[-1].startswith("fuse_attention: 'context_out': heads=2, gqa=no, rotary=no, mask=yes -> Attention")
    _check_equal(model, fused)


def test_native_needs_opset_23():
    model = build_attention_block("bert", opset=17)
    fused, count, log = _fuse(model, opset=17)
    assert count == 1
    assert sorted(models.ops(fused)) == sorted(models.ops(model))
    assert "opset 17 < 23" in log[0]


@pytest.mark.parametrize("variant", [{"softmax_axis": 2}, {"probs_output": True}, {"constant_k": True}])
def test_not_matched(variant):
    model = build_attention_block("bert", opset=23, **variant)
    fused, count, _ = _fuse(model)
    assert count == 0 and "Attention" not in models.ops(fused)
    _check_equal(model, fused)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="'fused'"):
        fuse_attention(gs.import_onnx(build_attention_block("bert")), PassContext(attention="fused"))


def test_rank_3_query_is_kept():
    """A Q without the head axis would be read by Attention as [B, S, hidden]."""
    graph = gs.import_onnx(build_attention_block("bert", opset=23))
    graph.tensors()["q.transpose"].shape = ["N", 6, HEAD_DIM]
    ctx = PassContext(opset=23, attention="native")
    assert fuse_attention(graph, ctx) == 0
    assert "Q 'q.transpose' has rank 3, expected 4" in ctx.log[-1]
    assert all(n.op != "Attention" for n in graph.nodes)
