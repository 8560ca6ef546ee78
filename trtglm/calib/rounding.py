"""Integer weights for a layer: round-to-nearest, or AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", 2020); and the bias that cancels the layer's expected output shift.

Why: rounding each weight to its nearest level minimizes the weight error, not the output error. A depthwise 3x3
filter after BatchNorm folding often looks like 14 x_a - 11.8 x_b on neighbouring, strongly correlated pixels:
its output is a small difference of large terms, and independent rounding errors of the two weights do not cancel.
The output error of row w with integer weights q (scale s) is s^2 (q - w/s)^T H (q - w/s) with H = E[x x^T] over
the layer's input rows (calib/layer_inputs.py), so choosing for each weight whether to round up or down is a
small quadratic problem per output row. AdaRound relaxes the choice to h(V) in [0, 1] (a rectified sigmoid),
minimizes the output error plus a regularizer that pushes h to 0 or 1 (its exponent annealed from 20 to 2), with
Adam, for a fixed number of iterations (so the time per layer is bounded and the result deterministic). Rows where
the result is not better than nearest rounding on this objective keep nearest rounding: never worse, by
construction.

Bias correction: with FP32 input mean mu and quantized input mean mu_q (both per input row, from calibration), the
quantized layer's output is shifted by E[W_q x_q] - E[W x] = W_q mu_q - W mu; subtracting it from the bias removes
it (empirical bias correction). The analytic variant gets mu from the BatchNorm statistics instead of from data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
ITERATIONS = 1000
LEARNING_RATE = 0.01
REG_WEIGHT = 0.01
WARMUP = 0.2  # fraction of iterations without the rounding regularizer
BETA = (20.0, 2.0)
LOW_RANK_FROM = 128  # K above which H is used through its leading eigenvectors
SPECTRUM_TAIL = 1e-4  # share of H's trace left to the isotropic rest


@dataclass(frozen=True)
class Rounded:
    """Integer weights (the weight's layout) and per-channel scales for one layer, with the objective's value for
    nearest rounding and for the chosen rounding (sums over rows of s^2 dq^T H dq)."""

    q: np.ndarray
    scale: np.ndarray
    nearest_error: float
    error: float
    improved_rows: int = 0


def channel_scales(rows: np.ndarray, qmax: float) -> np.ndarray:
    """Per output row symmetric scale (groups, out/groups), float32, as insert_qdq computes it."""
    amax = np.abs(rows).max(axis=2)
    return (np.where(amax > 0, amax, 1.0).astype(np.float32) / np.float32(qmax)).astype(np.float32)


def nearest(rows: np.ndarray, scale: np.ndarray, qmax: float) -> np.ndarray:
    return np.clip(np.rint(rows / scale[..., None]), -qmax, qmax)


def row_errors(q: np.ndarray, rows: np.ndarray, scale: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """s^2 dq^T H dq per row, dq = q - w/s: the expected squared output error of each row (groups, out/groups)."""
    dq = (q - rows / scale[..., None]).astype(np.float64)
    return np.einsum("gok,gkl,gol->go", dq, hessian, dq) * np.square(scale.astype(np.float64))


def adaround(rows: np.ndarray, scale: np.ndarray, hessian: np.ndarray, qmax: float,
             iterations: int = ITERATIONS) -> np.ndarray:
    """Learned up/down choice per weight: integer rows (groups, out/groups, K), as float32."""
    w = (rows / scale[..., None]).astype(np.float32)
    floor = np.floor(w)
    fixed = (floor >= qmax) | (floor < -qmax)  # at the clip: nothing to choose
    floor = np.clip(floor, -qmax, qmax)
    rest = np.where(fixed, 0.0, w - floor)
    base = floor - w  # dq = base + h
    product = _hessian_product(hessian)
    k = np.float32(rows.shape[-1])
    v = (-np.log((ZETA - GAMMA) / (np.clip(rest, 1e-4, 1 - 1e-4) - GAMMA) - 1.0)).astype(np.float32)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    free = (~fixed).astype(np.float32)
    b1, b2 = np.float32(0.9), np.float32(0.999)
    warm = int(WARMUP * iterations)
    for step in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        stretched = sig * np.float32(ZETA - GAMMA) + np.float32(GAMMA)
        h = np.clip(stretched, 0.0, 1.0)
        grad = product(base + h) * (2.0 / k)
        if step > warm:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (step - warm) / max(iterations - warm, 1)
            u = 2.0 * h - 1.0
            grad -= np.float32(2.0 * REG_WEIGHT * beta) * np.abs(u) ** np.float32(beta - 1.0) * np.sign(u)
        grad *= sig * (1.0 - sig) * np.float32(ZETA - GAMMA) * ((stretched > 0) & (stretched < 1)) * free
        m = b1 * m + (1 - b1) * grad
        s2 = b2 * s2 + (1 - b2) * grad * grad
        v -= np.float32(LEARNING_RATE / (1 - 0.9 ** step)) * m / (np.sqrt(s2 / np.float32(1 - 0.999 ** step)) + 1e-8)
    return np.clip(floor + (v >= 0), -qmax, qmax)


def _hessian_product(hessian: np.ndarray):
    """dq -> dq @ H_n per group, H_n = H normalized to a mean diagonal of 1 (every row is then judged on the
    regularizer's scale). A large H is used through its leading eigenvectors, which hold all but SPECTRUM_TAIL of
    its trace, plus the mean of the other eigenvalues times the identity: exact on the directions the data spans,
    and several times cheaper per iteration for a 1280-input layer calibrated on a few hundred samples."""
    diag = np.einsum("gkk->g", hessian) / hessian.shape[-1]
    h_norm = hessian / np.where(diag > 0, diag, 1.0)[:, None, None]
    k = h_norm.shape[-1]
    if k <= LOW_RANK_FROM:
        h32 = h_norm.astype(np.float32)
        return lambda dq: np.matmul(dq, h32)
    values, vectors = np.linalg.eigh(h_norm)  # ascending
    values = np.maximum(values[:, ::-1], 0.0)
    vectors = vectors[:, :, ::-1]
    kept = np.cumsum(values, axis=1) / np.maximum(values.sum(axis=1, keepdims=True), 1e-300)
    rank = int(max(np.searchsorted(row, 1.0 - SPECTRUM_TAIL) + 1 for row in kept))
    if rank > k // 2:
        h32 = h_norm.astype(np.float32)
        return lambda dq: np.matmul(dq, h32)
    rest = values[:, rank:].mean(axis=1) if rank < k else np.zeros(values.shape[0])
    u = np.ascontiguousarray(vectors[:, :, :rank]).astype(np.float32)
    lam = (values[:, :rank] - rest[:, None]).astype(np.float32)[:, None, :]
    ut = np.ascontiguousarray(u.transpose(0, 2, 1))
    sigma = rest.astype(np.float32)[:, None, None]
    return lambda dq: np.matmul(np.matmul(dq, u) * lam, ut) + sigma * dq


def round_layer(rows: np.ndarray, hessian: np.ndarray | None, qmax: float, method: str,
                iterations: int = ITERATIONS) -> Rounded:
    """Integer rows and scales by `method` ('nearest' or 'adaround'; AdaRound needs the Hessian)."""
    scale = channel_scales(rows, qmax)
    q = nearest(rows, scale, qmax)
    if hessian is None:
        return Rounded(q, scale, float("nan"), float("nan"))
    base = row_errors(q, rows, scale, hessian)
    if method != "adaround":
        return Rounded(q, scale, float(base.sum()), float(base.sum()))
    learned = adaround(rows, scale, hessian, qmax, iterations)
    errors = row_errors(learned, rows, scale, hessian)
    better = errors < base
    q = np.where(better[..., None], learned, q)
    return Rounded(q, scale, float(base.sum()), float(np.where(better, errors, base).sum()), int(better.sum()))


def bias_shift(rows: np.ndarray, q: np.ndarray, scale: np.ndarray, mean: np.ndarray,
               quantized_mean: np.ndarray) -> np.ndarray:
    """E[W_q x_q] - E[W x] per output channel (groups * out/groups,): what bias correction subtracts."""
    wq = q * scale[..., None]
    shift = np.einsum("gok,gk->go", wq.astype(np.float64), quantized_mean) \
        - np.einsum("gok,gk->go", rows.astype(np.float64), mean)
    return shift.reshape(-1)
