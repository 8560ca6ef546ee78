"""The residual_norm and rotary kernels on a GPU against their numpy references (trtglm/plugins/reference/).

The flat entry points are launched from the PTX that trtglm.plugins.ptx.compile_ptx builds (what the AOT plugins
embed), with the launch configuration their README documents, plus the configurations the README says are also
correct (smaller blocks and grids, in-place, misaligned pointers: the scalar path). launchResidualNorm and
launchRotary (what the C++ plugins call) are checked through a small ctypes shim compiled here with nvcc.

Tolerances: relative error = max|out - ref| / max|ref|; fp32 < 1e-5, fp16 < 2e-3, bf16 < 8e-3: rounding a value to
bf16 alone costs up to 2^-8 = 3.9e-3 of its binade, so 2e-3 cannot hold for bf16 outputs. Residual sums are
compared bit for bit; int8 outputs may differ by 1 where y / out_scale lies within rounding noise of a .5.
"""

from __future__ import annotations

import ctypes
import math
import subprocess

import ml_dtypes
import numpy as np
import pytest

from trtglm.errors import TrtglmError
from trtglm.plugins import ptx
from trtglm.plugins.reference.norm import residual_norm
from trtglm.plugins.reference.rotary import rotary, rotary_tables

pytestmark = pytest.mark.cuda

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 8e-3}
VEC = {"f32": 4, "f16": 8, "bf16": 8}  # elements per 16 bytes
NORM_VARIANTS = [f"{add}{kind}{i8}" for i8 in ("", "_i8") for add in ("", "add_")
                 for kind in ("rms", "layer", "layer_bias")]
HIDDENS = [1, 64, 130, 1000, 4096, 4097, 5120, 16384]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def arch(cp) -> str:
    major = int(cp.cuda.Device().compute_capability) // 10
    return "sm_90" if major >= 9 else "sm_80"


def _module(cp, op, arch, tmp_path_factory):
    try:
        text = ptx.compile_ptx(op, arch)
    except TrtglmError as e:
        pytest.skip(f"cannot compile the {op} PTX: {e}")
    path = tmp_path_factory.mktemp(op) / f"{op}.ptx"
    path.write_text(text)
    return cp.RawModule(path=str(path))


@pytest.fixture(scope="module")
def norm_mod(cp, arch, tmp_path_factory):
    return _module(cp, "residual_norm", arch, tmp_path_factory)


@pytest.fixture(scope="module")
def rotary_mod(cp, arch, tmp_path_factory):
    return _module(cp, "rotary", arch, tmp_path_factory)


# ---- host <-> device ---------------------------------------------------------------------------------------------

def _dev(cp, a: np.ndarray):
    """A device copy; bf16 travels as its uint16 bits (cupy has no bfloat16)."""
    return cp.asarray(a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a)


def _host(cp, x, dtype) -> np.ndarray:
    a = cp.asnumpy(x)
    return a.view(ml_dtypes.bfloat16) if dtype == ml_dtypes.bfloat16 else a


def _empty(cp, shape, dtype, offset=0):
    """Uninitialized device array (NaN-filled for float types); offset elements in: a misaligned pointer."""
    storage = np.uint16 if dtype == ml_dtypes.bfloat16 else dtype
    size = int(np.prod(shape))
    buf = cp.full(size + offset, np.nan if np.dtype(storage).kind == "f" else 0, dtype=storage)
    if np.dtype(storage) == np.uint16:
        buf.fill(0x7FC0)  # bf16 NaN
    return buf[offset:].reshape(shape)


def _misaligned(cp, a: np.ndarray, offset=1):
    x = _empty(cp, a.shape, a.dtype, offset)
    x[...] = _dev(cp, a)
    return x


def _bits(v: float) -> np.int32:
    return np.float32(v).view(np.int32)


def _rel(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert np.isfinite(out).all(), "non-finite output (an element not written?)"
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---- residual_norm -------------------------------------------------------------------------------------------------

def _norm_data(dt, rows, hidden, seed=0):
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dt]
    x = (rng.standard_normal((rows, hidden)) + 2.0).astype(dtype)  # a mean: LayerNorm's centering matters
    res = rng.standard_normal((rows, hidden)).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, hidden).astype(dtype)
    beta = (0.5 * rng.standard_normal(hidden)).astype(dtype)
    return x, res, gamma, beta


def _launch_norm(cp, mod, variant, dt, x, gamma, residual=None, beta=None, *, out, res_out=None, eps=1e-5,
                 out_scale=0.0, block=None, grid=None):
    rows, hidden = x.shape
    bx = 32 * math.ceil(hidden / 512) if block is None else block[0]
    by = (4 if bx == 32 else 2 if bx == 64 else 1) if block is None else block[1]
    grid = math.ceil(rows / by) if grid is None else grid
    inputs = [x] + ([residual] if residual is not None else []) + [gamma] + ([beta] if beta is not None else [])
    scalars = [np.int32(rows), np.int32(hidden), _bits(eps)] + ([_bits(out_scale)] if "_i8" in variant else [])
    outputs = [out] + ([res_out] if residual is not None else [])
    mod.get_function(f"trtglm_residual_norm_{variant}_{dt}")((grid,), (bx, by), (*inputs, *scalars, *outputs))
    cp.cuda.Device().synchronize()


def _check_norm(cp, variant, dt, host, out, res_out, out_scale):
    x, res, gamma, beta = host
    kind = "rms" if "rms" in variant else "layer"
    ref, ref_res = residual_norm(x, gamma, residual=res if variant.startswith("add_") else None,
                                 beta=beta if "bias" in variant else None, kind=kind, out_scale=out_scale)
    if out_scale:
        got = cp.asnumpy(out).astype(np.int32)
        diff = np.abs(got - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).sum() <= max(1, diff.size // 100), (diff.max(), (diff > 0).sum())
    else:
        err = _rel(_host(cp, out, DTYPES[dt]), ref)
        assert err < TOL[dt], err
    if ref_res is not None:
        np.testing.assert_array_equal(_host(cp, res_out, DTYPES[dt]).astype(np.float32), ref_res.astype(np.float32))


@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("variant", NORM_VARIANTS)
@pytest.mark.parametrize("dt", DTYPES)
def test_norm_entry_points_match_the_reference(cp, norm_mod, dt, variant, hidden):
    rows = 37  # not a multiple of the rows per block
    host = _norm_data(dt, rows, hidden)
    x, res, gamma, beta = (_dev(cp, a) for a in host)
    add, i8 = variant.startswith("add_"), variant.endswith("_i8")
    ref_y, _ = residual_norm(host[0], host[2], residual=host[1] if add else None,
                             beta=host[3] if "bias" in variant else None, kind="rms" if "rms" in variant else "layer")
    out_scale = float(np.float32(max(np.quantile(np.abs(ref_y), 0.995) / 127, 1e-3))) if i8 else 0.0  # clamps
    out = _empty(cp, (rows, hidden), np.int8 if i8 else DTYPES[dt])
    res_out = _empty(cp, (rows, hidden), DTYPES[dt]) if add else None
    _launch_norm(cp, norm_mod, variant, dt, x, gamma, res if add else None, beta if "bias" in variant else None,
                 out=out, res_out=res_out, out_scale=out_scale)
    _check_norm(cp, variant, dt, host, out, res_out, out_scale)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", ["small_block", "small_grid", "wide_block", "misaligned", "in_place"])
def test_norm_other_valid_launches(cp, norm_mod, dt, case):
    """Configurations the README calls correct: re-reads past the registers, row striding, aliasing, scalar path."""
    rows, hidden = 21, 4096
    host = _norm_data(dt, rows, hidden, seed=1)
    variant = "add_layer_bias"
    x, res, gamma, beta = (_dev(cp, a) for a in host)
    out = _empty(cp, (rows, hidden), DTYPES[dt])
    res_out = _empty(cp, (rows, hidden), DTYPES[dt])
    block = grid = None
    if case == "small_block":
        block = (64, 1)  # 64 threads x 16 values < 4096: the rest of each row is read again
    elif case == "small_grid":
        grid = 4
    elif case == "wide_block":
        block = (256, 4)
    elif case == "misaligned":  # 2-byte (4-byte) offsets: the element-wise path
        x, res = _misaligned(cp, host[0]), _misaligned(cp, host[1])
        out, res_out = (_empty(cp, (rows, hidden), DTYPES[dt], offset=1) for _ in range(2))
    elif case == "in_place":  # output over input, residual_out over residual; re-reads see the written sum
        out, res_out, block = x, res, (64, 1)
    _launch_norm(cp, norm_mod, variant, dt, x, gamma, res, beta, out=out, res_out=res_out, block=block, grid=grid)
    _check_norm(cp, variant, dt, host, out, res_out, 0.0)


# ---- rotary ----------------------------------------------------------------------------------------------------------

ROTARY_SHAPES = {  # batch, q_heads, kv_heads, seq, head_dim, rotary_dim
    "glm": (2, 8, 2, 37, 128, 64),
    "llama": (1, 4, 4, 5, 128, 128),
    "decode": (3, 2, 1, 1, 64, 32),
    "partial80": (2, 3, 1, 7, 80, 32),
    "scalar": (1, 2, 2, 3, 20, 10),  # rotary_dim / 2 = 5 pairs: no vector access
    "copy_only": (1, 2, 1, 3, 16, 0),
}


def _rotary_data(dt, shape, seed=0):
    batch, q_heads, kv_heads, seq, head_dim, rotary_dim = shape
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dt]
    q = rng.standard_normal((batch, q_heads, seq, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(dtype)
    if rotary_dim:
        cos, sin = rotary_tables(rng.integers(0, 32768, (batch, seq)), rotary_dim)
    else:
        cos = sin = np.zeros((batch, seq, 0), np.float32)
    return q, k, cos, sin


def _launch_rotary(cp, mod, dt, interleaved, shape, q, k, cos, sin, q_out, k_out, block=256, grid=None):
    batch, q_heads, kv_heads, seq, head_dim, rotary_dim = shape
    if grid is None:
        grid = max(1, math.ceil(batch * (q_heads + kv_heads) * seq * head_dim / (VEC[dt] * block)))
    name = f"trtglm_rotary_{'interleaved' if interleaved else 'halves'}_{dt}"
    args = (q, k, cos, sin, *(np.int32(v) for v in shape), q_out, k_out)
    mod.get_function(name)((grid,), (block,), args)
    cp.cuda.Device().synchronize()


def _check_rotary(cp, dt, shape, interleaved, host, q_out, k_out):
    q, k, cos, sin = host
    rotary_dim = shape[-1]
    ref_q, ref_k = rotary(q.astype(np.float32), k.astype(np.float32), cos, sin, interleaved=interleaved)
    for got, ref, x in ((q_out, ref_q, q), (k_out, ref_k, k)):
        got = _host(cp, got, DTYPES[dt])
        assert _rel(got, ref) < TOL[dt]
        np.testing.assert_array_equal(got[..., rotary_dim:].astype(np.float32),  # the tail: copied
                                      x[..., rotary_dim:].astype(np.float32))


@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dt", DTYPES)
def test_rotary_entry_points_match_the_reference(cp, rotary_mod, dt, interleaved, shape):
    shape = ROTARY_SHAPES[shape]
    host = _rotary_data(dt, shape)
    q, k, cos, sin = (_dev(cp, a) for a in host)
    q_out, k_out = _empty(cp, host[0].shape, DTYPES[dt]), _empty(cp, host[1].shape, DTYPES[dt])
    _launch_rotary(cp, rotary_mod, dt, interleaved, shape, q, k, cos, sin, q_out, k_out)
    _check_rotary(cp, dt, shape, interleaved, host, q_out, k_out)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", ["in_place", "small_grid", "misaligned"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rotary_other_valid_launches(cp, rotary_mod, dt, case, interleaved):
    shape = ROTARY_SHAPES["glm"]
    host = _rotary_data(dt, shape, seed=2)
    q, k, cos, sin = (_dev(cp, a) for a in host)
    q_out, k_out = _empty(cp, host[0].shape, DTYPES[dt]), _empty(cp, host[1].shape, DTYPES[dt])
    kw = {}
    if case == "in_place":
        q_out, k_out = q, k
    elif case == "small_grid":
        kw = dict(block=64, grid=3)
    else:
        q, k = _misaligned(cp, host[0]), _misaligned(cp, host[1])
        q_out, k_out = (_empty(cp, a.shape, DTYPES[dt], offset=1) for a in host[:2])
    _launch_rotary(cp, rotary_mod, dt, interleaved, shape, q, k, cos, sin, q_out, k_out, **kw)
    _check_rotary(cp, dt, shape, interleaved, host, q_out, k_out)


# ---- the C++ launch functions, through a ctypes shim ------------------------------------------------------------

SHIM = r"""
#include "common/kernels.h"
using namespace trtglm;
extern "C" int shim_norm(void const* in, void const* res, void const* gamma, void const* beta, void* out,
    void* res_out, long long rows, int hidden, float eps, float out_scale, int kind, int dtype, int out_dtype)
{
    ResidualNormParams p;
    p.input = in; p.residual = res; p.gamma = gamma; p.beta = beta; p.output = out; p.residual_out = res_out;
    p.rows = rows; p.hidden = hidden; p.eps = eps; p.out_scale = out_scale; p.kind = NormKind(kind);
    p.dtype = DType(dtype); p.out_dtype = DType(out_dtype);
    cudaError_t e = launchResidualNorm(p, 0);
    return e != cudaSuccess ? int(e) : int(cudaDeviceSynchronize());
}
extern "C" int shim_rotary(void const* q, void const* k, float const* cos, float const* sin, void* q_out,
    void* k_out, int batch, int q_heads, int kv_heads, int seq, int head_dim, int rotary_dim, int interleaved,
    int dtype)
{
    RotaryParams p;
    p.q = q; p.k = k; p.cos = cos; p.sin = sin; p.q_out = q_out; p.k_out = k_out; p.batch = batch;
    p.q_heads = q_heads; p.kv_heads = kv_heads; p.seq = seq; p.head_dim = head_dim; p.rotary_dim = rotary_dim;
    p.interleaved = interleaved != 0; p.dtype = DType(dtype);
    cudaError_t e = launchRotary(p, 0);
    return e != cudaSuccess ? int(e) : int(cudaDeviceSynchronize());
}
"""
DTYPE_ENUM = {"f32": 0, "f16": 1, "bf16": 2}
INT8_ENUM = 3


@pytest.fixture(scope="module")
def shim(cp, arch, tmp_path_factory):
    try:
        nvcc = ptx.nvcc()
    except TrtglmError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("shim")
    (tmp / "shim.cu").write_text(SHIM)
    sources = [str(tmp / "shim.cu")] + [str(ptx.kernel_source(op)) for op in ("residual_norm", "rotary")]
    result = subprocess.run([nvcc, *ptx.NVCC_FLAGS, f"-arch={arch}", "--threads", "0", "-shared", "-Xcompiler",
                             "-fPIC", "-I", str(ptx.SOURCES), *sources, "-o", str(tmp / "libshim.so")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(tmp / "libshim.so"))
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.shim_norm.argtypes = [P, P, P, P, P, P, ctypes.c_longlong, I, F, F, I, I, I]
    lib.shim_rotary.argtypes = [P, P, P, P, P, P, I, I, I, I, I, I, I, I]
    return lib


def _ptr(x):
    return None if x is None else x.data.ptr


@pytest.mark.parametrize("dt,kind,add,bias,i8,rows,hidden", [
    ("f16", 1, True, True, True, 4099, 4096),
    ("bf16", 0, True, False, False, 300, 5120),
    ("f32", 1, False, False, False, 9, 16384),
    ("f16", 0, False, False, False, 1000, 64),
    ("bf16", 1, True, True, False, 33, 4097),
])
def test_launch_residual_norm_matches_the_reference(cp, shim, dt, kind, add, bias, i8, rows, hidden):
    host = _norm_data(dt, rows, hidden, seed=3)
    x, res, gamma, beta = (_dev(cp, a) for a in host)
    name = ("add_" if add else "") + ("rms" if kind == 0 else "layer_bias" if bias else "layer") + ("_i8" if i8 else "")
    ref_y, _ = residual_norm(host[0], host[2], residual=host[1] if add else None, beta=host[3] if bias else None,
                             kind=kind)
    out_scale = float(np.float32(np.abs(ref_y).max() / 120)) if i8 else 0.0
    out = _empty(cp, (rows, hidden), np.int8 if i8 else DTYPES[dt])
    res_out = _empty(cp, (rows, hidden), DTYPES[dt]) if add else None
    err = shim.shim_norm(_ptr(x), _ptr(res) if add else None, _ptr(gamma), _ptr(beta) if bias else None, _ptr(out),
                         _ptr(res_out), rows, hidden, 1e-5, out_scale, kind, DTYPE_ENUM[dt],
                         INT8_ENUM if i8 else DTYPE_ENUM[dt])
    assert err == 0
    _check_norm(cp, name, dt, host, out, res_out, out_scale)


def test_launch_residual_norm_without_residual_out_and_bad_params(cp, shim):
    host = _norm_data("f16", 8, 256, seed=4)
    x, res, gamma, _ = (_dev(cp, a) for a in host)
    out = _empty(cp, (8, 256), np.float16)
    assert shim.shim_norm(_ptr(x), _ptr(res), _ptr(gamma), None, _ptr(out), None, 8, 256, 1e-5, 0.0, 0, 1, 1) == 0
    ref, _ = residual_norm(host[0], host[2], residual=host[1])
    assert _rel(cp.asnumpy(out), ref) < TOL["f16"]
    invalid = 1  # cudaErrorInvalidValue
    assert shim.shim_norm(_ptr(x), None, _ptr(gamma), None, _ptr(out), None, 8, 0, 1e-5, 0.0, 0, 1, 1) == invalid
    assert shim.shim_norm(_ptr(x), None, _ptr(gamma), None, _ptr(out), None, 8, 256, 1e-5, 0.0, 0, 1, 2) == invalid
    assert shim.shim_norm(_ptr(x), None, _ptr(gamma), None, _ptr(out), None, 8, 256, 1e-5, -1.0, 0, 1, 3) == invalid
    assert shim.shim_norm(_ptr(x), None, _ptr(gamma), None, _ptr(out), None, 0, 256, 1e-5, 0.0, 0, 1, 1) == 0


@pytest.mark.parametrize("shape", ["glm", "llama", "scalar"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_launch_rotary_matches_the_reference(cp, shim, shape, interleaved, in_place):
    dt = "bf16" if in_place else "f16"
    shape = ROTARY_SHAPES[shape]
    host = _rotary_data(dt, shape, seed=5)
    q, k, cos, sin = (_dev(cp, a) for a in host)
    q_out, k_out = (q, k) if in_place else (_empty(cp, host[0].shape, DTYPES[dt]), _empty(cp, host[1].shape,
                                                                                          DTYPES[dt]))
    assert shim.shim_rotary(_ptr(q), _ptr(k), _ptr(cos), _ptr(sin), _ptr(q_out), _ptr(k_out), *shape,
                            int(interleaved), DTYPE_ENUM[dt]) == 0
    _check_rotary(cp, dt, shape, interleaved, host, q_out, k_out)
    assert shim.shim_rotary(_ptr(q), _ptr(k), _ptr(cos), _ptr(sin), _ptr(q_out), _ptr(k_out), *shape[:-1], 3,
                            int(interleaved), DTYPE_ENUM[dt]) == 1  # odd rotary_dim: cudaErrorInvalidValue
