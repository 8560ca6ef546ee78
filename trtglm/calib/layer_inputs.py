"""Second-order statistics of what each quantized linear layer reads: the Gram matrix and the mean of its input
rows (im2col patches for a convolution), streamed over the calibration data.

Why: a layer's output error from its weight error dW is dW x, and E||dW x||^2 = sum over output rows of
dw^T E[x x^T] dw. So the Gram matrix H = E[x x^T] of the layer's input rows is all that learned rounding
(calib/rounding.py) needs, and E[x] (with E[Q(x)] for a quantized input) is all that empirical bias correction
needs: both are sums over the rows of every calibration batch (for a large feature map, the rows of a regular grid
of output positions, MAX_VALUES per batch), held in memory as K x K per group (K = input channels per
group times the kernel area), never as activations. A depthwise 3x3 convolution has one 9 x 9 matrix
per channel; a 1x1 convolution with 1152 inputs one 1152 x 1152 matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm import runtime
from trtglm.calib.collect import checked_feeds, graph_inputs, progress_bar, with_outputs
from trtglm.calib.methods import activation_grid
from trtglm.errors import DataError

# Values (groups x rows x K) per layer and batch that enter the statistics, a convolution's output positions
# thinned on a regular grid to fit: neighbouring patches of a feature map are nearly the same rows, and all of them
# would cost several times the inference. At least MIN_ROWS rows per group and batch.
MAX_VALUES = 2 << 20
MIN_ROWS = 256


@dataclass(frozen=True)
class LinearLayer:
    """A Conv, Gemm or MatMul with a constant weight, as rows: weight (groups, out/groups, K), input (groups, R, K)."""

    node: str
    op: str
    input: str
    weight: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    transposed: bool = False  # Gemm transA (input) and the weight's layout: (out, K) when transB, else (K, out)
    weight_transposed: bool = False

    def rows(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (groups, out/groups, K): row o of group g multiplies that group's input rows."""
        w = np.asarray(weight)
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        w2 = w if self.weight_transposed else w.T  # (out, K)
        return w2[None]

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of rows()."""
        if self.op == "Conv":
            return rows.reshape(self.weight_shape)
        w2 = rows[0]
        return w2 if self.weight_transposed else w2.T

    @property
    def channel_axis(self) -> int:
        """The weight's output-channel axis (the per-channel quantization axis)."""
        return 0 if self.op == "Conv" or self.weight_transposed else len(self.weight_shape) - 1


def linear_layer(node: gs.Node) -> LinearLayer | None:
    """The layer's geometry, or None when it has no constant weight this module can treat as rows."""
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if not isinstance(w, gs.Constant) or not isinstance(x, gs.Variable):
        return None
    shape = tuple(int(d) for d in w.values.shape)
    if node.op == "Conv":
        spatial = len(shape) - 2
        if spatial < 1 or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        return LinearLayer(node.name, node.op, x.name, w.name, shape, int(node.attrs.get("group", 1)),
                           shape[2:], tuple(node.attrs.get("strides", [1] * spatial)),
                           tuple(node.attrs.get("pads", [0] * 2 * spatial)),
                           tuple(node.attrs.get("dilations", [1] * spatial)))
    if len(shape) != 2:
        return None
    if node.op == "Gemm":
        return LinearLayer(node.name, node.op, x.name, w.name, shape, transposed=bool(node.attrs.get("transA", 0)),
                           weight_transposed=bool(node.attrs.get("transB", 0)))
    return LinearLayer(node.name, node.op, x.name, w.name, shape)


def input_rows(layer: LinearLayer, x: np.ndarray, max_rows: int | None = None) -> np.ndarray:
    """The rows the layer multiplies by its weight rows: (groups, R, K). With `max_rows`, a convolution's output
    positions are thinned on a regular grid (every t-th row and column) to at most that many rows per group."""
    x = np.asarray(x, dtype=np.float32)
    if layer.op != "Conv":
        x2 = x.T if layer.transposed else x.reshape(-1, x.shape[-1])
        return x2[None]
    n, c = x.shape[:2]
    spatial = len(layer.kernel)
    x = _padded(layer, x)
    window = [d * (k - 1) + 1 for k, d in zip(layer.kernel, layer.dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in layer.strides) \
        + tuple(slice(None, None, d) for d in layer.dilations)
    view = view[index]  # (n, c, out spatial..., kernel...)
    positions = n * int(np.prod(view.shape[2:2 + spatial]))
    if max_rows and positions > max_rows:
        t = int(np.ceil((positions / max_rows) ** (1.0 / spatial)))
        view = view[(slice(None), slice(None)) + (slice(t // 2, None, t),) * spatial]
    g = layer.groups
    view = view.reshape((n, g, c // g) + view.shape[2:])
    axes = (1, 0) + tuple(range(3, 3 + spatial)) + (2,) + tuple(range(3 + spatial, 3 + 2 * spatial))
    return np.ascontiguousarray(view.transpose(axes)).reshape(g, -1, (c // g) * int(np.prod(layer.kernel)))


def _padded(layer: LinearLayer, x: np.ndarray) -> np.ndarray:
    half = len(layer.pads) // 2
    if not any(layer.pads):
        return x
    return np.pad(x, [(0, 0), (0, 0)] + [(layer.pads[i], layer.pads[i + half]) for i in range(half)])


def flush_tiny(x: np.ndarray) -> np.ndarray:
    """|x| < 1e-12 set to 0: their products are float32 denormals, which slow a BLAS product down 20-fold, and
    they add nothing to a sum of squares."""
    return np.where(np.abs(x) < 1e-12, np.float32(0), x)


@dataclass
class InputStats:
    """Sums over every input row of one layer: x x^T, x and, for a quantized input, Q(x); per group."""

    gram: np.ndarray  # (groups, K, K) float64
    total: np.ndarray  # (groups, K) float64
    quantized_total: np.ndarray  # (groups, K) float64: equal to total when the input is not quantized
    count: int = 0

    @property
    def hessian(self) -> np.ndarray:
        """E[x x^T] per group."""
        return self.gram / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def quantized_mean(self) -> np.ndarray:
        return self.quantized_total / max(self.count, 1)

    def add(self, layer: LinearLayer, x: np.ndarray, amax: float | None, unsigned: bool = False) -> None:
        rows = flush_tiny(input_rows(layer, x, max(MIN_ROWS, MAX_VALUES // self.gram[..., 0].size)))
        self.gram += np.matmul(rows.transpose(0, 2, 1), rows)
        self.count += rows.shape[1]
        sums = rows.sum(axis=1)
        self.total += sums
        self.quantized_total += quantized_sums(rows, amax, unsigned) if amax is not None else sums


def quantized_sums(rows: np.ndarray, amax: float, unsigned: bool = False) -> np.ndarray:
    """rows.sum(axis=1) after QuantizeLinear -> DequantizeLinear with insert_qdq's per-tensor grid. Zero padding
    in the rows is exact on both grids."""
    scale, centre = activation_grid(amax, unsigned)
    q = np.rint((rows - centre) / scale)
    np.clip(q, -127, 127, out=q)
    return q.sum(axis=1) * np.float64(scale) + np.float64(centre) * rows.shape[1]


def collect_layer_inputs(model: onnx.ModelProto, layers: list[LinearLayer], batches: Iterable[dict[str, np.ndarray]],
                         amax: dict[str, float], total: int | None = None,
                         description: str = "layer statistics", unsigned: frozenset[str] = frozenset()
                         ) -> dict[str, InputStats]:
    """InputStats of every layer over all batches; `amax` holds the calibrated range of the inputs that will be
    quantized (the others are used as they are), on the unsigned grid for those in `unsigned`."""
    inputs = graph_inputs(model)
    names = sorted({layer.input for layer in layers if layer.input not in inputs})
    session = runtime.session(with_outputs(model, names), optimize=True)
    stats: dict[str, InputStats] = {}
    with progress_bar(description, total) as advance:
        for index, batch in enumerate(batches):
            feeds = checked_feeds(batch, inputs, index)
            try:
                values = dict(zip(names, session.run(names, feeds))) if names else {}
            except Exception as e:  # ORT raises its own exception types
                raise DataError(f"calibration batch {index}: ONNX Runtime failed: {str(e).strip()}") from e
            values.update({n: feeds[n] for n in inputs if n in feeds})
            for layer in layers:
                _add(stats, layer, np.asarray(values[layer.input], dtype=np.float32), amax.get(layer.input),
                     layer.input in unsigned)
            advance()
    return stats


def _add(stats: dict[str, InputStats], layer: LinearLayer, x: np.ndarray, amax: float | None,
         unsigned: bool = False) -> None:
    if layer.node not in stats:
        g = layer.groups
        k = int(np.prod(layer.weight_shape)) // layer.weight_shape[layer.channel_axis]
        stats[layer.node] = InputStats(np.zeros((g, k, k)), np.zeros((g, k)), np.zeros((g, k)))
    stats[layer.node].add(layer, x, amax, unsigned)
