"""TensorRT ahead-of-time Python plugins for trtglm's ops: importing this module registers them.

`trtglm build/engine --plugins trtglm/plugins/tensorrt_aot.py` (or `import trtglm.plugins.tensorrt_aot`) before
parsing an ONNX whose nodes are trtglm ops: TensorRT then embeds each kernel's PTX in the engine, and the engine
runs without libtrtglm_plugins.so. Each op is registered with `tensorrt.plugin.register` (output types and shapes),
`autotune` (the type combinations, LINEAR format) and `aot_impl`, which returns what trtglm.plugins.aot computes
(kernel name, PTX, launch parameters, int32 scalars) for the build's shapes, symbolic where they are dynamic.

TensorRT's AOT plugins have a fixed signature, launch one kernel and get no workspace, so they cover these forms
(the plugin library covers every form):
  TrtglmResidualNorm  input, residual, gamma -> output, residual_out   RMSNorm with the residual add (GLM's), float
                      or INT8 output (out_scale)
  TrtglmRotary        q, k, cos, sin -> q_out, k_out                    every form
  TrtglmAttention     q, k, v -> out                                    prefill (flash kernel) and decode with one
                      split (q_len 1, told apart by the static q_len; a dynamic q_len is prefill's)
Kernels that use more than 48 KiB of dynamic shared memory (head_dim 128) rely on TensorRT raising the kernel's
limit to the launch's shared_mem.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp

from trtglm.errors import ConfigError
from trtglm.gpu import gpu_info
from trtglm.plugins import NAMESPACE, aot

_TYPES = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}


def _arch() -> str:
    info = gpu_info() or {}
    major = int(str(info.get("compute_capability", "8.0")).split(".")[0])
    return "sm_90" if major >= 9 else "sm_80"


def _dims(desc: trtp.TensorDesc) -> tuple:
    """Static dimensions as ints, dynamic ones as TensorRT's symbolic ShapeExprs."""
    exprs = desc.shape_expr
    return tuple(exprs[i].constant_value() if exprs[i].is_constant else exprs[i] for i in range(desc.ndim))


def _launch(launch: aot.KernelLaunch) -> tuple:
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x, params.block_y, params.block_z = launch.block
    params.shared_mem = launch.shared_mem
    scalars = trtp.SymIntExprs(len(launch.scalars))
    for i, value in enumerate(launch.scalars):
        scalars[i] = trtp.SymInt32(value)
    return launch.kernel, launch.ptx, params, scalars


def _dtype(desc: trtp.TensorDesc) -> str:
    if desc.dtype not in _TYPES:
        raise ConfigError(f"trtglm AOT plugins take float32, float16 and bfloat16 tensors, not {desc.dtype}")
    return _TYPES[desc.dtype]


# ---- TrtglmResidualNorm --------------------------------------------------------------------------------------------

@trtp.register(f"{NAMESPACE}::TrtglmResidualNorm")
def _residual_norm_desc(input: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, kind: int,
                        eps: float, has_residual: int, has_beta: int, out_scale: float
                        ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    output = input.like()
    if out_scale > 0:
        output.dtype = trt.int8
    return output, input.like()


@trtp.autotune(f"{NAMESPACE}::TrtglmResidualNorm")
def _residual_norm_types(input: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, kind: int,
                         eps: float, has_residual: int, has_beta: int, out_scale: float,
                         outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    out = "INT8" if out_scale > 0 else "FP32|FP16|BF16"  # one type: the same in every combination
    return [trtp.AutoTuneCombination(f"FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, {out}, FP32|FP16|BF16")]


@trtp.aot_impl(f"{NAMESPACE}::TrtglmResidualNorm")
def _residual_norm_aot(input: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, kind: int,
                       eps: float, has_residual: int, has_beta: int, out_scale: float,
                       outputs: tuple[trtp.TensorDesc], tactic: int) -> tuple:
    if kind != 0 or has_residual != 1 or has_beta != 0:
        raise ConfigError("the TrtglmResidualNorm AOT plugin covers RMSNorm with a residual add; load "
                          "libtrtglm_plugins.so for the other forms")
    return _launch(aot.residual_norm(_dtype(input), _dims(input), kind=0, eps=eps, has_residual=1,
                                     out_scale=out_scale, arch=_arch(), cdiv=trtp.cdiv))


# ---- TrtglmRotary --------------------------------------------------------------------------------------------------

@trtp.register(f"{NAMESPACE}::TrtglmRotary")
def _rotary_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                 rotary_dim: int, interleaved: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return q.like(), k.like()


@trtp.autotune(f"{NAMESPACE}::TrtglmRotary")
def _rotary_types(q: trtp.TensorDesc, k: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                  rotary_dim: int, interleaved: int, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32, FP32, FP32|FP16|BF16, FP32|FP16|BF16")]


@trtp.aot_impl(f"{NAMESPACE}::TrtglmRotary")
def _rotary_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                rotary_dim: int, interleaved: int, outputs: tuple[trtp.TensorDesc], tactic: int) -> tuple:
    return _launch(aot.rotary(_dtype(q), _dims(q), _dims(k), rotary_dim, interleaved, arch=_arch(), cdiv=trtp.cdiv))


# ---- TrtglmAttention -----------------------------------------------------------------------------------------------

@trtp.register(f"{NAMESPACE}::TrtglmAttention")
def _attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float,
                    causal: int) -> trtp.TensorDesc:
    return q.like()


@trtp.autotune(f"{NAMESPACE}::TrtglmAttention")
def _attention_types(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float, causal: int,
                     outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16")]


@trtp.aot_impl(f"{NAMESPACE}::TrtglmAttention")
def _attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float, causal: int,
                   outputs: tuple[trtp.TensorDesc], tactic: int) -> tuple:
    return _launch(aot.attention(_dtype(q), _dims(q), _dims(k), scale, causal, arch=_arch(), cdiv=trtp.cdiv))
