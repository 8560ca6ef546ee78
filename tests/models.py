"""Tiny ONNX models built in code for the tests, and helpers to feed and run them.

Every builder is deterministic (numpy Generator from `seed`), uses opset 17, float32 weights, a dynamic batch
dimension 'N' and named tensors, and returns an `onnx.ModelProto` that passes `onnx.checker.check_model`.
BatchNormalization statistics are deliberately far from the identity (variance in [0.2, 4], non-zero mean) so
that a wrong fold shows up numerically.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BATCH = "N"


class _Builder:
    """Collects nodes and initializers; names every tensor it creates after the node that makes it."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def name(self, prefix: str) -> str:
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}_{n}" if n else prefix

    def const(self, name: str, values) -> str:
        name = self.name(name)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def weight(self, name: str, shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        scale = scale if scale is not None else 1.0 / math.sqrt(max(fan_in, 1))
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: list[str] | None = None,
           n_out: int = 1, **attrs) -> str | list[str]:
        name = self.name(name or op_type.lower())
        outputs = outputs or [f"{name}_out" if i == 0 else f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, bias: bool = True, name: str = "conv", **attrs) -> str:
        w = self.weight(f"{name}.weight", (c_out, c_in // attrs.get("group", 1), k, k))
        inputs = [x, w] + ([self.const(f"{name}.bias", self.bn_like(c_out))] if bias else [])
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, **attrs)

    def bn(self, x: str, channels: int, name: str = "bn") -> str:
        r = self.rng
        gamma = r.uniform(0.5, 1.5, channels).astype(np.float32)
        beta = (r.standard_normal(channels) * 0.5).astype(np.float32)
        mean = (r.standard_normal(channels) * 0.5).astype(np.float32)
        var = r.uniform(0.2, 4.0, channels).astype(np.float32)
        inputs = [x] + [self.const(f"{name}.{p}", v) for p, v in
                        (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
        return self.op("BatchNormalization", inputs, name=name, epsilon=1e-3)

    def bn_like(self, channels: int) -> np.ndarray:
        return (self.rng.standard_normal(channels) * 0.1).astype(np.float32)

    def act(self, x: str, activation: str = "Relu", name: str | None = None) -> str:
        if activation == "Relu":
            return self.op("Relu", [x], name=name or "relu")
        if activation == "Clip":
            lo = self.const("clip.min", np.array(0.0, np.float32))
            hi = self.const("clip.max", np.array(6.0, np.float32))
            return self.op("Clip", [x, lo, hi], name=name or "clip")
        raise ValueError(f"activation {activation!r}: expected 'Relu' or 'Clip'")

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
              ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trtglm-tests")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _input(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _rename_output(b: _Builder, tensor: str, name: str) -> str:
    """Make the node producing `tensor` write `name` instead (so graph outputs have stable names)."""
    for node in b.nodes:
        for i, out in enumerate(node.output):
            if out == tensor:
                node.output[i] = name
        for i, inp in enumerate(node.input):
            if inp == tensor:
                node.input[i] = name
    return name


# --- CNN blocks -------------------------------------------------------------------------------------------


def build_conv_bn_relu(seed: int = 0, conv_bias: bool = True) -> onnx.ModelProto:
    """input (N,3,8,8) -> Conv(3->8, 3x3) -> BatchNormalization -> Relu -> output (N,8,8,8)."""
    b = _Builder(seed)
    y = b.act(b.bn(b.conv("input", 3, 8, bias=conv_bias), 8))
    _rename_output(b, y, "output")
    return b.model("conv_bn_relu", [_input("input", (BATCH, 3, 8, 8))], [_input("output", (BATCH, 8, 8, 8))])


def _residual(b: _Builder, x: str, channels: int, activation: str) -> str:
    h = b.act(b.bn(b.conv(x, channels, channels, name="res.conv1"), channels, name="res.bn1"), activation)
    h = b.bn(b.conv(h, channels, channels, name="res.conv2"), channels, name="res.bn2")
    return b.act(b.op("Add", [h, x], name="res.add"), activation)


def build_residual_block(seed: int = 0, activation: str = "Relu") -> onnx.ModelProto:
    """input (N,8,8,8) -> Conv-BN-act -> Conv-BN -> Add(input) -> act -> output; act is 'Relu' or 'Clip' (0, 6)."""
    b = _Builder(seed)
    _rename_output(b, _residual(b, "input", 8, activation), "output")
    return b.model("residual_block", [_input("input", (BATCH, 8, 8, 8))], [_input("output", (BATCH, 8, 8, 8))])


def build_conv_transpose_bn(seed: int = 0, group: int = 1, bias: bool = True) -> onnx.ModelProto:
    """input (N,4,8,8) -> ConvTranspose(4->6, 3x3, stride 2, `group`) -> BatchNormalization -> output (N,6,16,16)."""
    b = _Builder(seed)
    c_in, c_out = 4, 6
    w = b.weight("deconv.weight", (c_in, c_out // group, 3, 3))
    inputs = ["input", w] + ([b.const("deconv.bias", b.bn_like(c_out))] if bias else [])
    y = b.op("ConvTranspose", inputs, name="deconv", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             output_padding=[1, 1], group=group)
    _rename_output(b, b.bn(y, c_out), "output")
    return b.model("conv_transpose_bn", [_input("input", (BATCH, c_in, 8, 8))],
                   [_input("output", (BATCH, c_out, 16, 16))])


def build_gemm_bn(seed: int = 0, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0,
                  bias: bool = True) -> onnx.ModelProto:
    """input (N,4,4,4) -> Flatten -> Gemm(64->16, transB) -> BatchNormalization over features -> output (N,16)."""
    b = _Builder(seed)
    flat = b.op("Flatten", ["input"], name="flatten", axis=1)
    shape = (16, 64) if trans_b else (64, 16)
    inputs = [flat, b.weight("fc.weight", shape, scale=0.125)]
    if bias:
        inputs.append(b.const("fc.bias", b.bn_like(16)))
    attrs = {"transB": trans_b}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    y = b.op("Gemm", inputs, name="fc", **attrs)
    _rename_output(b, b.bn(y, 16), "output")
    return b.model("gemm_bn", [_input("input", (BATCH, 4, 4, 4))], [_input("output", (BATCH, 16))])


def build_cnn_classifier(seed: int = 0) -> onnx.ModelProto:
    """input (N,3,8,8) -> Conv-BN-Relu -> residual block -> GlobalAveragePool -> Flatten -> Gemm -> logits (N,10)."""
    b = _Builder(seed)
    h = b.act(b.bn(b.conv("input", 3, 8, name="stem.conv"), 8, name="stem.bn"))
    h = _residual(b, h, 8, "Relu")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="pool")], name="flatten", axis=1)
    y = b.op("Gemm", [h, b.weight("fc.weight", (10, 8)), b.const("fc.bias", b.bn_like(10))], name="fc", transB=1)
    _rename_output(b, y, "logits")
    return b.model("cnn_classifier", [_input("input", (BATCH, 3, 8, 8))], [_input("logits", (BATCH, 10))])


# --- pass-through nodes and MLP ------------------------------------------------------------------------------


def build_identity_dropout(seed: int = 0) -> onnx.ModelProto:
    """input (N,16) -> MatMul(Identity(W)) -> Dropout -> Relu -> Identity -> output (N,8).

    Identity on a weight, a Dropout with ratio 0.5 (identity at inference) and an Identity producing the graph
    output.
    """
    b = _Builder(seed)
    w = b.op("Identity", [b.weight("fc.weight", (16, 8))], name="weight_identity")
    y = b.op("MatMul", ["input", w], name="fc")
    ratio = b.const("dropout.ratio", np.array(0.5, np.float32))
    y = b.op("Dropout", [y, ratio], name="dropout")
    y = b.op("Relu", [y], name="relu")
    b.op("Identity", [y], name="output_identity", outputs=["output"])
    return b.model("identity_dropout", [_input("input", (BATCH, 16))], [_input("output", (BATCH, 8))])


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    """input (N,16) -> MatMul(16->32) -> Add bias -> Relu -> MatMul(32->8) -> output (N,8)."""
    b = _Builder(seed)
    h = b.op("MatMul", ["input", b.weight("fc1.weight", (16, 32))], name="fc1")
    h = b.op("Relu", [b.op("Add", [h, b.const("fc1.bias", b.bn_like(32))], name="fc1.bias_add")], name="relu")
    b.op("MatMul", [h, b.weight("fc2.weight", (32, 8))], name="fc2", outputs=["output"])
    return b.model("mlp", [_input("input", (BATCH, 16))], [_input("output", (BATCH, 8))])


# --- attention ---------------------------------------------------------------------------------------------


def build_attention(seed: int = 0, seq: int = 8, hidden: int = 16, heads: int = 2,
                    mask: str = "add") -> onnx.ModelProto:
    """An encoder block: x (N,S,H) + mask -> self-attention -> residual Add -> LayerNormalization -> output (N,S,H).

    mask='add': float input 'attention_mask_add' (N,1,1,S), added to the scores as is.
    mask='int': int64 input 'attention_mask' (N,S) of 1 (attend) / 0 (pad), turned into the additive mask by
    Cast -> Sub(1, m) -> Mul(-10000) -> Unsqueeze, as exporters write it.
    The head split reshapes with a shape computed from Shape(x) (Gather/Unsqueeze/Concat), like an exported
    model; with a static S, constant folding can fold the sequence part of it.
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
    d = hidden // heads
    b = _Builder(seed)
    inputs = [_input("x", (BATCH, seq, hidden))]
    if mask == "add":
        inputs.append(_input("attention_mask_add", (BATCH, 1, 1, seq)))
        mask_add = "attention_mask_add"
    elif mask == "int":
        inputs.append(_input("attention_mask", (BATCH, seq), TensorProto.INT64))
        m = b.op("Cast", ["attention_mask"], name="mask.cast", to=TensorProto.FLOAT)
        m = b.op("Sub", [b.const("mask.one", np.array(1.0, np.float32)), m], name="mask.invert")
        m = b.op("Mul", [m, b.const("mask.neg", np.array(-10000.0, np.float32))], name="mask.scale")
        mask_add = b.op("Unsqueeze", [m, b.const("mask.axes", np.array([1, 2], np.int64))], name="mask.unsqueeze")
    else:
        raise ValueError(f"mask {mask!r}: expected 'add' or 'int'")

    # Shape(x) -> (N, S) -> concat with (heads, d): the split-heads shape, computed as exporters do.
    shape = b.op("Shape", ["x"], name="shape")
    dims = [b.op("Unsqueeze", [b.op("Gather", [shape, b.const(f"dim{i}.index", np.array(i, np.int64))],
                                    name=f"dim{i}.gather", axis=0),
                               b.const(f"dim{i}.axes", np.array([0], np.int64))], name=f"dim{i}.unsqueeze")
            for i in (0, 1)]
    split_shape = b.op("Concat", dims + [b.const("heads_dim", np.array([heads, d], np.int64))],
                       name="split_shape", axis=0)

    def project(name: str, t: str) -> str:
        y = b.op("MatMul", [t, b.weight(f"{name}.weight", (hidden, hidden))], name=name)
        return b.op("Add", [y, b.const(f"{name}.bias", b.bn_like(hidden))], name=f"{name}.bias_add")

    def split(t: str, name: str, perm: list[int]) -> str:
        t = b.op("Reshape", [t, split_shape], name=f"{name}.reshape")
        return b.op("Transpose", [t], name=f"{name}.transpose", perm=perm)

    q = split(project("q", "x"), "q", [0, 2, 1, 3])  # (N, h, S, d)
    k = split(project("k", "x"), "k", [0, 2, 3, 1])  # (N, h, d, S)
    v = split(project("v", "x"), "v", [0, 2, 1, 3])  # (N, h, S, d)
    scores = b.op("MatMul", [q, k], name="scores")
    scores = b.op("Div", [scores, b.const("scale", np.array(math.sqrt(d), np.float32))], name="scores.scale")
    scores = b.op("Add", [scores, mask_add], name="scores.mask")
    probs = b.op("Softmax", [scores], name="softmax", axis=-1)
    ctx = b.op("MatMul", [probs, v], name="context")
    ctx = b.op("Transpose", [ctx], name="context.transpose", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("merge_shape", np.array([0, 0, hidden], np.int64))], name="context.reshape")
    out = project("out", ctx)
    out = b.op("Add", [out, "x"], name="residual")
    gamma = b.const("ln.weight", b.rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    b.op("LayerNormalization", [out, gamma, b.const("ln.bias", b.bn_like(hidden))], name="ln", axis=-1,
         epsilon=1e-5, outputs=["output"])
    return b.model("attention", inputs, [_input("output", (BATCH, seq, hidden))])


# --- feeding and running ----------------------------------------------------------------------------------


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """One value per graph input: dynamic dims are `batch` on axis 0 and 8 elsewhere; floats are gaussian.

    Masks (inputs named '*mask*') get a valid pattern: the first sample attends everywhere, the others have
    padding at the end. An int mask is 1/0; a float mask is the additive 0/-10000 form.
    """
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        ttype = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else 8)
                 for axis, d in enumerate(ttype.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if "mask" in inp.name.lower():
            keep = _mask_pattern(shape)
            feeds[inp.name] = keep.astype(dtype) if np.issubdtype(dtype, np.integer) or dtype == np.bool_ \
                else np.where(keep, 0.0, -10000.0).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def _mask_pattern(shape: list[int]) -> np.ndarray:
    """1 where attended: sample i masks its last i positions (at least one position stays attended)."""
    keep = np.ones(shape, dtype=bool)
    if not shape:
        return keep
    seq = shape[-1]
    for i in range(shape[0]):
        valid = max(1, seq - i)
        keep[i, ..., valid:] = False
    return keep


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run `model` on ONNX Runtime CPU; graph optimizations off unless `optimize` (so tests see the graph as is)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


# --- applying passes ---------------------------------------------------------------------------------------


def apply_pass(model: onnx.ModelProto, fn, opset: int = OPSET, **context) -> tuple[onnx.ModelProto, int, list[str]]:
    """Run one pass (or run_passes-style callable) on `model` with PassContext(opset, **context); return the checked
    result, the count and the log."""
    import onnx_graphsurgeon as gs

    from trtglm.passes import PassContext

    graph = gs.import_onnx(model)
    ctx = PassContext(opset=opset, **context)
    count = fn(graph, ctx)
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    return out, count, ctx.log


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def max_rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest |ref - got| over all outputs, relative to the largest |ref| of that output."""
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape, (r.shape, g.shape)
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(r64 - g64)) / max(np.max(np.abs(r64)), 1e-12)))
    return worst
