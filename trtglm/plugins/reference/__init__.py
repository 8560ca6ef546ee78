"""numpy references of the plugin ops, in the layouts of plugins/common/kernels.h: what the kernels must compute
(the GPU tests compare against them) and what the ONNX-level fallback of each op computes."""

from trtglm.plugins.reference.attention import attention
from trtglm.plugins.reference.norm import quantize_int8, residual_norm
from trtglm.plugins.reference.rotary import apply_rotary, rotary, rotary_tables

__all__ = ["apply_rotary", "attention", "quantize_int8", "residual_norm", "rotary", "rotary_tables"]
