"""GLM export with a KV cache and greedy decoding in ONNX Runtime, checked against transformers' own generate."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402
import onnxruntime as ort  # noqa: E402

from trtglm.errors import ConfigError  # noqa: E402
from trtglm.export.glm import CacheWrapper, export_glm, glm_from_config, io_names  # noqa: E402
from trtglm.generate import greedy  # noqa: E402
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes  # noqa: E402
from trtglm.passes.plugin_ops import from_plugin_ops, to_plugin_ops  # noqa: E402

# 2 layers, GQA with 4 query and 2 key/value heads, rotary on half of each head (GLM's partial rotary)
CONFIG = {"model_type": "glm", "architectures": ["GlmForCausalLM"], "vocab_size": 100, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 256, "pad_token_id": 0, "eos_token_id": None,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
NEW_TOKENS = 16


def _write_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """split=True: prefill.onnx and decode.onnx; decode.onnx is also what split=False writes as model.onnx (the
    same export), and greedy() given that one file runs prefill on it with an empty cache."""
    folder = tmp_path_factory.mktemp("glm")
    model = glm_from_config(_write_config(folder))
    manifest = export_glm(model, folder / "out", split=True)
    return model, folder / "out", manifest


def _reference(model, prompts, attention_mask=None):
    """transformers' greedy generate: (new tokens, scores [steps, batch, vocab])."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids) if attention_mask is None else torch.tensor(attention_mask)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].tolist(), torch.stack(out.scores).numpy()


def _relative(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_graph_has_cache_inputs_and_outputs_with_dynamic_axes(exported):
    _, out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["graphs"] == {"prefill": "prefill.onnx", "decode": "decode.onnx"}
    prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    assert [i.name for i in prefill.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [d.dim_param for d in prefill.graph.input[1].type.tensor_type.shape.dim] == ["batch", "seq"]
    model = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    names = io_names(2, with_past=True)
    assert [i.name for i in model.graph.input] == names[0] == manifest["inputs"]
    assert [o.name for o in model.graph.output] == names[1] == manifest["outputs"]
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "past + seq"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past", 16]
    assert dims["present.0.key"] == ["batch", 2, "past + seq", 16]
    assert dims["logits"] == ["batch", "seq", 100]


@pytest.mark.parametrize("graphs", ["split", "one graph"])
def test_greedy_decode_reproduces_transformers_generate(exported, graphs):
    model, out, _ = exported
    prompts = [[5, 17, 42, 9, 3, 77], [11, 12, 13, 14, 15, 16]]
    tokens, logits, timings = greedy(out if graphs == "split" else out / "decode.onnx", prompts, NEW_TOKENS)
    want_tokens, want_logits = _reference(model, prompts)
    assert tokens == want_tokens
    assert logits.shape == want_logits.shape == (NEW_TOKENS, 2, 100)
    assert _relative(logits, want_logits) < 1e-4
    assert timings.ttft_s > 0 and len(timings.step_s) == NEW_TOKENS - 1 and timings.tokens_per_s > 0


def test_left_padded_prompts_of_different_lengths(exported):
    model, out, _ = exported
    tokens, logits, _ = greedy(out / "decode.onnx", [[5, 17, 42, 9, 3, 77], [11, 12, 13]], NEW_TOKENS)
    want_tokens, want_logits = _reference(model, [[5, 17, 42, 9, 3, 77], [0, 0, 0, 11, 12, 13]],
                                          [[1] * 6, [0, 0, 0, 1, 1, 1]])
    assert tokens == want_tokens
    assert _relative(logits, want_logits) < 1e-4


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 1), (3, 1, 40), (2, 5, 7)])
def test_decode_step_with_past_lengths(exported, batch, seq, past):
    model, out, _ = exported
    rng = np.random.default_rng(past)
    feeds = {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()}
    names, out_names = io_names(2, with_past=True)
    for name in names[3:]:
        feeds[name] = rng.standard_normal((batch, 2, past, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"]).run(out_names, feeds)
    with torch.no_grad():
        want = CacheWrapper(model)(*(torch.from_numpy(feeds[n]) for n in names))
    for name, g, w in zip(out_names, got, want):
        assert g.shape == tuple(w.shape), name
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert got[1].shape == (batch, 2, past + seq, 16)


def test_passes_recognise_gqa_attention_and_keep_outputs(exported):
    _, out, _ = exported
    model = onnx.load(str(out / "decode.onnx"))
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=18)
    counts = run_passes(graph, DEFAULT_PIPELINE, ctx)
    assert counts["fuse_attention"] == 2 and ctx.recognised["attention"] == 2
    assert sum("gqa=yes, rotary=yes" in line for line in ctx.log) == 2
    rng = np.random.default_rng(0)
    names, out_names = io_names(2, with_past=True)
    feeds = {"input_ids": rng.integers(0, 100, (2, 3)), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.array([[4, 5, 6], [4, 5, 6]])}
    feeds.update({n: rng.standard_normal((2, 2, 4, 16)).astype(np.float32) for n in names[3:]})
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    after_model = gs.export_onnx(graph)
    after = ort.InferenceSession(after_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)



def test_plugin_ops_map_each_layers_norms_and_rotary_and_the_fallback_keeps_outputs(exported):
    """--plugin-ops on the optimized GLM: per layer one TrtglmRotary (Q and K, half the head, interleaved) and the
    RMSNorms; the ONNX fallback gives the optimized graph's outputs, prefill and decode with a cache."""
    _, out, _ = exported
    graph = gs.import_onnx(onnx.load(str(out / "decode.onnx")))
    run_passes(graph, DEFAULT_PIPELINE, PassContext(opset=18))
    optimized = gs.export_onnx(graph)
    ctx = PassContext(opset=18)
    to_plugin_ops(graph, ctx)
    plugin = gs.export_onnx(graph)
    rotary = [n for n in plugin.graph.node if n.op_type == "TrtglmRotary"]
    assert len(rotary) == 2 and [n.op_type for n in plugin.graph.node].count("TrtglmResidualNorm") == 5, ctx.log
    for node in rotary:
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in
                ("rotary_dim", "interleaved")} == {"rotary_dim": 8, "interleaved": 1}
    back = gs.import_onnx(plugin)
    from_plugin_ops(back, PassContext(opset=18))
    fallback = gs.export_onnx(back)
    names, out_names = io_names(2, with_past=True)
    rng = np.random.default_rng(1)
    for batch, seq, past in ((2, 6, 0), (3, 1, 9)):
        feeds = {"input_ids": rng.integers(0, 100, (batch, seq)),
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()}
        feeds.update({n: rng.standard_normal((batch, 2, past, 16)).astype(np.float32) for n in names[3:]})
        want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
                     for m in (optimized, fallback))
        for name, g, w in zip(out_names, got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)

def test_config_picks_glm4_by_architecture_and_rejects_others(tmp_path):
    glm4 = glm_from_config(_write_config(tmp_path, model_type=None, architectures=["Glm4ForCausalLM"]))
    assert type(glm4).__name__ == "Glm4ForCausalLM" and not glm4.training
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        glm_from_config(_write_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConfigError, match="weights"):
        glm_from_config(_write_config(tmp_path), weights_dir=tmp_path / "missing")


def test_random_weights_are_seeded_and_safetensors_weights_load(tmp_path):
    a, b = (glm_from_config(_write_config(tmp_path)) for _ in range(2))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    with torch.no_grad():
        a.lm_head.weight.add_(1.0)
    a.save_pretrained(tmp_path / "weights")
    assert list((tmp_path / "weights").glob("*.safetensors"))
    loaded = glm_from_config(_write_config(tmp_path), weights_dir=tmp_path / "weights")
    assert torch.equal(loaded.lm_head.weight, a.lm_head.weight)

