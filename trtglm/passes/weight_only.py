"""Weight-only quantization: MatMul/Gemm weights become INT8 or packed INT4 + a blocked DequantizeLinear.

Why: weight-only INT4 with a group (block) size of 128 is how LLMs fit on one GPU: decoding is bound by reading
the weights, and 4-bit weights read 8x fewer bytes than FP32. TensorRT's weight-only GEMM takes exactly this
form: a constant INT4/INT8 weight behind a DequantizeLinear with blocked scales along the reduction axis K, feeding
the MatMul; the activations have no Q/DQ and keep FP16/FP32, so no calibration data is needed.

What it writes, for a MatMul whose second input is a constant 2-D float weight W (K, N) (Gemm: B, which is (N, K)
when transB=1; the blocks then run along axis 1):
  W  ->  DequantizeLinear(q, scale[, zero_point], axis=<K axis>, block_size=B)  with scale (K / B, N)
  symmetric (default): scale = absmax(block) / qmax, q = round(W / scale) in [-qmax, qmax] (qmax 127 or 7), no
                       zero point; the form TensorRT's IDequantizeLayer accepts.
  asymmetric:          the block range [min(W, 0), max(W, 0)] maps onto uint8 [0, 255] / uint4 [0, 15] with a
                       uint zero point of the scale's shape (ONNX Runtime runs it; TensorRT rejects zero points).
The scale has the weight's float type (DequantizeLinear's output type). A weight shared by several MatMuls is
quantized once. Blocked DequantizeLinear needs opset 21: the pass refuses a lower opset (convert first with
onnx.version_converter; bumping the opset number alone would change the meaning of older ops).

A layer whose K is not a multiple of the block size is kept float with a line in the log: ONNX would allow a
ragged last block (scale dim ceil(K / B)), but TensorRT's weight-only kernels group K in whole blocks, and padding
the weight would change the MatMul's shape.

INT4/UINT4 weights are held in the graph as ml_dtypes.int4/uint4 arrays. onnx-graphsurgeon 0.6 exports those one
byte per value, which ONNX rejects; export with `model_from_graph`, which writes them as packed ONNX INT4/UINT4
initializers (two values per byte, low nibble first), so the file holds about 1/8 of the FP32 weight bytes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from trtglm.errors import ConfigError, ModelError
from trtglm.passes.naming import node_name, tensor_name

BLOCKED_DQ_OPSET = 21
_FOUR_BIT = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


def weight_only(graph: gs.Graph, bits: int, block_size: int, asymmetric: bool = False,
                keep_float: frozenset[str] = frozenset(), log: list[str] | None = None) -> int:
    """Quantize the constant weights of MatMul and Gemm nodes (except nodes named in `keep_float`); returns how
    many weights it quantized. Lines about layers it left alone go to `log`."""
    if bits not in (4, 8):
        raise ConfigError(f"--weight-only: {bits} bits is not supported; use int8 or int4")
    if block_size < 1:
        raise ConfigError(f"--block-size {block_size}: must be a positive number of weights along K")
    if graph.opset < BLOCKED_DQ_OPSET:
        raise ModelError(f"model opset {graph.opset}: weight-only quantization writes blocked DequantizeLinear, "
                         f"which needs opset {BLOCKED_DQ_OPSET}; convert the model with onnx.version_converter or "
                         f"re-export at opset >= {BLOCKED_DQ_OPSET}")
    log = [] if log is None else log
    dequantized: dict[int, gs.Variable] = {}  # id(weight constant) -> its DequantizeLinear output
    for node in [n for n in graph.nodes if n.op in ("MatMul", "Gemm") and n.name not in keep_float]:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not _is_float_matrix(weight):
            continue
        axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
        k = weight.shape[axis]
        if k % block_size:
            log.append(f"weight_only: {node.op} '{node.name}' kept float: weight '{weight.name}' has K={k}, not a "
                       f"multiple of --block-size {block_size}")
            continue
        if id(weight) not in dequantized:
            dequantized[id(weight)] = _dequantize(graph, weight, axis, bits, block_size, asymmetric)
        node.inputs[1] = dequantized[id(weight)]
    log.append(f"weight_only: {len(dequantized)} weights -> {'u' if asymmetric else ''}int{bits}, "
               f"block {block_size}")
    graph.cleanup().toposort()
    return len(dequantized)


def quantize_blocks(weight: np.ndarray, axis: int, bits: int, block_size: int,
                    asymmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q, scale, zero_point) for a 2-D weight blocked along `axis`: q has the weight's shape and an int8/uint8
    (bits=8) or ml_dtypes int4/uint4 (bits=4) type, scale and zero_point have the weight's shape with `axis`
    divided by block_size; zero_point is None when symmetric. (q - zero_point) * scale approximates the weight."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0)
    k, n = w.shape
    blocks = w.reshape(k // block_size, block_size, n)
    if asymmetric:
        qmax = 2**bits - 1
        lo, hi = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
        scale = _nonzero((hi - lo) / qmax)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(blocks / scale[:, None]) + zero[:, None], 0, qmax)
        qtype = np.dtype(ml_dtypes.uint4) if bits == 4 else np.dtype(np.uint8)
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = _nonzero(np.abs(blocks).max(axis=1) / qmax)
        zero = None
        q = np.clip(np.rint(blocks / scale[:, None]), -qmax, qmax)
        qtype = np.dtype(ml_dtypes.int4) if bits == 4 else np.dtype(np.int8)
    scale = scale.astype(weight.dtype)
    q = np.moveaxis(q.reshape(k, n), 0, axis).astype(qtype)
    zero_point = None if zero is None else np.moveaxis(zero, 0, axis).astype(qtype)
    return q, np.moveaxis(scale, 0, axis), zero_point


def model_from_graph(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx, except that INT4/UINT4 constants become packed ONNX INT4/UINT4 initializers."""
    four_bit = {t.name: t for t in graph.tensors().values()
                if isinstance(t, gs.Constant) and t.dtype in _FOUR_BIT}
    originals = {name: t.values for name, t in four_bit.items()}
    try:
        for t in four_bit.values():  # gs writes 4-bit values one per byte; export a byte stand-in, swap after
            t.values = np.zeros(t.shape, dtype=np.int8)
        model = gs.export_onnx(graph)
    finally:
        for name, t in four_bit.items():
            t.values = originals[name]
    for init in model.graph.initializer:
        if init.name in originals:
            init.CopyFrom(numpy_helper.from_array(originals[init.name], init.name))
    return model


def _dequantize(graph: gs.Graph, weight: gs.Constant, axis: int, bits: int, block_size: int,
                asymmetric: bool) -> gs.Variable:
    q, scale, zero_point = quantize_blocks(np.asarray(weight.values), axis, bits, block_size, asymmetric)
    inputs = [gs.Constant(tensor_name(graph, f"{weight.name}_q{bits}"), q),
              gs.Constant(tensor_name(graph, f"{weight.name}_scale"), scale)]
    if zero_point is not None:
        inputs.append(gs.Constant(tensor_name(graph, f"{weight.name}_zero_point"), zero_point))
    out = gs.Variable(tensor_name(graph, f"{weight.name}_dequantized"), dtype=weight.dtype, shape=weight.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", name=node_name(graph, f"{weight.name}_DequantizeLinear"),
                               attrs={"axis": axis, "block_size": block_size}, inputs=inputs, outputs=[out]))
    return out


def _is_float_matrix(tensor: gs.Tensor | None) -> bool:
    return (isinstance(tensor, gs.Constant) and len(tensor.shape) == 2
            and np.dtype(tensor.dtype) in (np.float32, np.float16))


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """An all-zero block gets scale 1 (its values quantize to the zero point) rather than a division by zero."""
    return np.where(scale > 0, scale, 1.0)
