"""to_plugin_ops / from_plugin_ops on rotary embeddings as PyTorch's exporter writes them.

The graphs are exported from transformers' own apply_rotary_pos_emb (GLM: half the head, interleaved pairs; Llama:
the whole head, halves), fed the cos/sin tables HF's rotary embedding builds, then optimized by trtglm's passes as
`trtglm build` does. Each case checks the plugin graph (one TrtglmRotary, its attributes), the ONNX fallback
against the original on ONNX Runtime at several shapes, and the numpy reference of the plugin (what the CUDA kernel
computes) fed the plugin node's inputs against the original outputs: that ties the op's definition to the subgraph
it replaces.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402
import onnxruntime as ort  # noqa: E402
from transformers.models.glm import modeling_glm  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from trtglm.export.torch_export import quiet_exporter_logs  # noqa: E402
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes  # noqa: E402
from trtglm.passes.plugin_graph import DOMAIN  # noqa: E402
from trtglm.passes.plugin_ops import from_plugin_ops, to_plugin_ops  # noqa: E402
from trtglm.passes.plugin_rotary import OP  # noqa: E402
from trtglm.plugins import NAMESPACE, VERSION  # noqa: E402
from trtglm.plugins.reference.rotary import rotary  # noqa: E402

HEAD_DIM, Q_HEADS, KV_HEADS = 64, 4, 2
APPLY = {"glm": modeling_glm.apply_rotary_pos_emb, "llama": modeling_llama.apply_rotary_pos_emb}
SHAPES = ((2, 5), (1, 1), (3, 17))  # (batch, seq): the export's example, decode, a longer prompt


class Rope(torch.nn.Module):
    """HF's rotary embedding (GlmRotaryEmbedding.forward) and apply_rotary_pos_emb; `only_q` rotates Q alone."""

    def __init__(self, form: str, rotary_dim: int, only_q: bool = False):
        super().__init__()
        self.form, self.only_q = form, only_q
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))

    def forward(self, q, k, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q_out, k_out = APPLY[self.form](q, k, cos, sin)
        return (q_out, k * 2) if self.only_q else (q_out, k_out)


def _export(path, module, dtype=torch.float32, positions_batch="batch"):
    """module(q, k, position_ids) -> ONNX with dynamic batch and seq (positions [1, seq] when positions_batch is
    None: the tables then broadcast over the batch)."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    q = torch.randn(2, Q_HEADS, 5, HEAD_DIM, dtype=dtype)
    k = torch.randn(2, KV_HEADS, 5, HEAD_DIM, dtype=dtype)
    pos = torch.arange(5).repeat(2 if positions_batch else 1, 1)
    shapes = {"q": {0: batch, 2: seq}, "k": {0: batch, 2: seq},
              "position_ids": {0: batch, 1: seq} if positions_batch else {1: seq}}
    with warnings.catch_warnings(), torch.no_grad(), quiet_exporter_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (q, k, pos), path, dynamo=True, dynamic_shapes=shapes, opset_version=18,
                          input_names=["q", "k", "position_ids"], output_names=["q_out", "k_out"], verbose=False)
    model = onnx.load(path)
    graph = gs.import_onnx(model)
    run_passes(graph, DEFAULT_PIPELINE, PassContext(opset=18))
    return gs.export_onnx(graph)


def _feeds(batch, seq, dtype=np.float32, positions_batch=True):
    rng = np.random.default_rng(batch * 100 + seq)
    past = 7  # positions of a decode step: not 0..seq-1
    return {"q": rng.standard_normal((batch, Q_HEADS, seq, HEAD_DIM)).astype(dtype),
            "k": rng.standard_normal((batch, KV_HEADS, seq, HEAD_DIM)).astype(dtype),
            "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch if positions_batch else 1, 1))}


def _run(model, feeds, extra=()):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _map(model):
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=18)
    count = to_plugin_ops(graph, ctx)
    plugin = gs.export_onnx(graph)
    back_graph = gs.import_onnx(plugin)
    from_plugin_ops(back_graph, PassContext(opset=18))
    return count, plugin, gs.export_onnx(back_graph), ctx.log


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rope")
    return {"glm": _export(folder / "glm.onnx", Rope("glm", HEAD_DIM // 2)),
            "llama": _export(folder / "llama.onnx", Rope("llama", HEAD_DIM))}


@pytest.mark.parametrize("form, rotary_dim, interleaved", [("glm", HEAD_DIM // 2, 1), ("llama", HEAD_DIM, 0)])
def test_rotary_mapped_and_its_fallback_and_reference_match_the_export(exported, form, rotary_dim, interleaved):
    model = exported[form]
    count, plugin, back, log = _map(model)
    nodes = [n for n in plugin.graph.node if n.op_type == OP]
    assert count == 1 and len(nodes) == 1, log
    node = nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"rotary_dim": rotary_dim, "interleaved": interleaved, "plugin_version": VERSION.encode(),
                     "plugin_namespace": NAMESPACE.encode()}
    assert node.domain == DOMAIN and list(node.input[:2]) == ["q", "k"] and list(node.output) == ["q_out", "k_out"]
    assert any(line.startswith("to_plugin_ops: rotary of 'q' and 'k' -> TrtglmRotary") for line in log), log
    # the subgraph is gone: what is left computes the tables
    assert not {"Neg", "Add"} & {n.op_type for n in plugin.graph.node}
    onnx.checker.check_model(plugin)
    assert all(n.domain != DOMAIN for n in back.graph.node)

    for batch, seq in SHAPES:
        feeds = _feeds(batch, seq)
        want = _run(model, feeds)
        got = _run(back, feeds, extra=node.input[2:])
        for name in ("q_out", "k_out"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=f"{form} {name}")
        cos, sin = got[node.input[2]], got[node.input[3]]
        assert cos.dtype == np.float32 and cos.shape == (batch, seq, rotary_dim // 2)
        q_ref, k_ref = rotary(feeds["q"], feeds["k"], cos, sin, rotary_dim, bool(interleaved))
        assert np.abs(q_ref - want["q_out"]).max() <= 1e-5 and np.abs(k_ref - want["k_out"]).max() <= 1e-5


def test_half_precision_tables_are_cast_to_float32(tmp_path):
    model = _export(tmp_path / "glm16.onnx", Rope("glm", HEAD_DIM // 2), dtype=torch.float16)
    count, plugin, back, _ = _map(model)
    assert count == 1
    graph = gs.import_onnx(plugin)
    node = next(n for n in graph.nodes if n.op == OP)
    assert [t.dtype for t in node.inputs[2:]] == [np.float32, np.float32]
    assert node.inputs[2].inputs[0].op == "Cast" and node.inputs[0].dtype == np.float16
    feeds = _feeds(2, 5, np.float16)
    want, got = _run(model, feeds), _run(back, feeds)
    for name in ("q_out", "k_out"):  # fp16 ops in another order: a few ulps of values up to ~4
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), rtol=0, atol=8e-3)


def test_left_alone_with_the_reason(tmp_path):
    """Tables that broadcast over the batch (the plugin takes one row per token and sequence), and a rotation with
    no partner (the plugin rotates a Q and a K together): the graph keeps them, the log says why."""
    unbatched = _export(tmp_path / "unbatched.onnx", Rope("glm", HEAD_DIM // 2), positions_batch=None)
    count, plugin, _, log = _map(unbatched)
    assert count == 0 and not any(n.op_type == OP for n in plugin.graph.node)
    assert sum("does not have the batch and sequence" in line for line in log) == 2, log

    alone = _export(tmp_path / "alone.onnx", Rope("llama", HEAD_DIM, only_q=True))
    count, plugin, _, log = _map(alone)
    assert count == 0 and not any(n.op_type == OP for n in plugin.graph.node)
    assert any("rotary of 'q' kept: no second tensor" in line for line in log), log
