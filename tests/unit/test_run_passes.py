"""run_passes and DEFAULT_PIPELINE: explicit order, per-pass counts, numerics preserved end to end."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from tests.models import (apply_pass, build_attention, build_cnn_classifier, build_identity_dropout, max_rel_err, ops,
                          random_inputs, run_ort)
from trtglm.passes import (DEFAULT_PIPELINE, PassContext, fold_batchnorm, fold_constants, fuse_attention, fuse_gelu,
                           fuse_layernorm, fuse_qkv, fusion_summary, remove_identity, run_passes)

PASSES = ["remove_identity", "fold_constants", "fuse_layernorm", "fuse_gelu", "fuse_attention", "fuse_qkv",
          "fold_batchnorm"]


def pipeline(graph: gs.Graph, ctx: PassContext) -> dict[str, int]:
    return run_passes(graph, DEFAULT_PIPELINE, ctx)


def test_default_pipeline_order():
    assert DEFAULT_PIPELINE == (remove_identity, fold_constants, fuse_layernorm, fuse_gelu, fuse_attention, fuse_qkv,
                                fold_batchnorm)


def test_cnn_classifier_pipeline():
    model = build_cnn_classifier()
    feeds = random_inputs(model, batch=4)
    out, report, _ = apply_pass(model, pipeline)
    assert report == {**dict.fromkeys(PASSES, 0), "fold_batchnorm": 3}
    assert "BatchNormalization" not in ops(out)
    assert [o.name for o in out.graph.output] == ["logits"]
    assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) < 1e-5


def test_attention_and_identity_pipelines_preserve_outputs():
    for model in (build_attention(mask="int"), build_attention(mask="add"), build_identity_dropout()):
        feeds = random_inputs(model)
        out, report, _ = apply_pass(model, pipeline)
        assert list(report) == PASSES
        assert "Identity" not in ops(out) and "Dropout" not in ops(out)
        assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) < 1e-6


def test_repeated_pass_gets_numbered_key():
    graph = gs.import_onnx(build_identity_dropout())
    report = run_passes(graph, (fold_constants, remove_identity, fold_constants))
    assert list(report) == ["fold_constants", "remove_identity", "fold_constants#2"]
    assert report["fold_constants"] == 1  # the Identity on the weight is folded first
    assert report["remove_identity"] == 2 and report["fold_constants#2"] == 0


def test_fusion_summary_counts_recognised_and_fused_blocks():
    model = build_attention(mask="add")  # opset 17: attention recognised, kept decomposed; one LayerNormalization
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=17)
    counts = run_passes(graph, DEFAULT_PIPELINE, ctx)
    assert counts["fuse_attention"] == 1 and counts["fuse_qkv"] == 1
    assert fusion_summary(graph, counts, ctx) == {"attention": 1, "layernorm": 1, "rmsnorm": 0, "gelu": 0,
                                                  "qkv_groups": 1}
