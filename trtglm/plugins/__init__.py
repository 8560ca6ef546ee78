"""trtglm's TensorRT plugins: what each op takes and gives (the catalog `trtglm plugins` prints).

The C++ plugins (plugins/<op>/*_plugin.cpp, IPluginV3) and the ahead-of-time Python plugins (trtglm.plugins.aot)
implement the same ops with the same kernels; this catalog is their shared description, and
tests/unit/test_plugins.py checks it against the C++ sources (names, attributes) so the three cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "trtglm"
VERSION = "1"


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # int | float
    default: int | float
    doc: str


@dataclass(frozen=True)
class PluginSpec:
    name: str  # the ONNX op_type and TensorRT plugin name: never an ONNX op name
    kernel: str  # plugins/<kernel>/<kernel>.cu
    summary: str
    inputs: tuple[str, ...]  # optional ones in brackets: present when an attribute says so
    outputs: tuple[str, ...]
    attributes: tuple[Attribute, ...]
    dtypes: tuple[str, ...]
    limits: str = ""
    formats: str = "LINEAR"

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"


CATALOG = (
    PluginSpec(
        "TrtglmResidualNorm", "residual_norm",
        "out = RMSNorm or LayerNorm(input [+ residual]) over the last axis, optionally quantized to INT8; "
        "residual_out = input + residual",
        ("input [..., hidden]", "[residual]", "gamma [hidden]", "[beta]"),
        ("output (input's type, or int8 with out_scale)", "[residual_out]"),
        (Attribute("kind", "int", 0, "0: RMSNorm, 1: LayerNorm"),
         Attribute("eps", "float", 1e-5, "added to the variance"),
         Attribute("has_residual", "int", 0, "1: input 1 is the residual; output 1 is input + residual"),
         Attribute("has_beta", "int", 0, "LayerNorm: 1: the last input is beta"),
         Attribute("out_scale", "float", 0.0, "> 0: output is int8, clamp(round(y / out_scale), -128, 127)")),
        ("float32", "float16", "bfloat16"), limits="hidden 1..16384"),
    PluginSpec(
        "TrtglmRotary", "rotary",
        "rotary position embedding on Q and K: the first rotary_dim channels of each head, pairs interleaved "
        "(2i, 2i+1) or split in halves (i, i + rotary_dim/2)",
        ("q [batch, q_heads, seq, head_dim]", "k [batch, kv_heads, seq, head_dim]",
         "cos [batch, seq, rotary_dim/2] float32", "sin [batch, seq, rotary_dim/2] float32"),
        ("q_out", "k_out"),
        (Attribute("rotary_dim", "int", 0, "channels that rotate (even); 0: the whole head (GLM: head_dim / 2)"),
         Attribute("interleaved", "int", 1, "1: pairs (2i, 2i+1) (GLM); 0: halves (Llama's rotate_half)")),
        ("float32", "float16", "bfloat16"), limits="rotary_dim <= head_dim"),
    PluginSpec(
        "TrtglmAttention", "attention",
        "softmax(scale Q K^T + causal mask) V, grouped-query; K/V hold past and current tokens (prefill: flash "
        "kernel, decode: split-KV kernel)",
        ("q [batch, q_heads, q_len, head_dim]", "k [batch, kv_heads, kv_len, head_dim]",
         "v [batch, kv_heads, kv_len, head_dim]"),
        ("out [batch, q_heads, q_len, head_dim]",),
        (Attribute("scale", "float", 0.0, "0: 1 / sqrt(head_dim)"),
         Attribute("causal", "int", 1, "1: query i sees keys j <= i + kv_len - q_len")),
        ("float16", "bfloat16"), limits="head_dim 64 or 128; q_heads a multiple of kv_heads; kv_len >= q_len"),
)


def spec(name: str) -> PluginSpec:
    for s in CATALOG:
        if s.name == name:
            return s
    raise KeyError(name)
