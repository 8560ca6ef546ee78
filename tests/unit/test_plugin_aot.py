"""The ahead-of-time launch descriptions (no TensorRT, no GPU): the entry point exists in the PTX they carry, with
as many parameters as pointers + scalars, and the shape arithmetic works on symbolic dimensions too."""

from __future__ import annotations

import re

import pytest

from trtglm.errors import ConfigError
from trtglm.plugins import aot


def _params(ptx: str, kernel: str) -> int:
    body = re.search(rf"\.entry {kernel}\((.*?)\)", ptx, flags=re.S)
    assert body, f"{kernel} is not in the PTX"
    return body.group(1).count(".param")


@pytest.mark.parametrize("kwargs, name, pointers", [
    (dict(kind=0), "trtglm_residual_norm_rms_f16", 3),
    (dict(kind=1, has_residual=1, has_beta=1), "trtglm_residual_norm_add_layer_bias_f16", 6),
    (dict(kind=0, has_residual=1, out_scale=0.02), "trtglm_residual_norm_add_rms_i8_f16", 5),
])
def test_residual_norm_launch(kwargs, name, pointers):
    launch = aot.residual_norm("float16", (2, 7, 4096), eps=1e-6, **kwargs)
    assert launch.kernel == name and launch.grid == (14, 1, 1) and launch.block == (256, 1, 1)
    assert launch.scalars[:3] == (14, 4096, aot.float_bits(1e-6))
    assert _params(launch.ptx, name) == pointers + len(launch.scalars)
    with pytest.raises(ConfigError, match="hidden size"):
        aot.residual_norm("float16", (2, "h"))


def test_rotary_launch():
    launch = aot.rotary("bfloat16", (2, 32, 9, 128), (2, 2, 9, 128), rotary_dim=64, interleaved=1)
    assert launch.kernel == "trtglm_rotary_interleaved_bf16" and launch.scalars == (2, 32, 2, 9, 128, 64)
    assert launch.grid == (-(-2 * 34 * 9 * 128 // (8 * 256)), 1, 1)
    assert _params(launch.ptx, launch.kernel) == 4 + 6 + 2


def test_attention_launches():
    prefill = aot.attention("float16", (2, 32, 300, 128), (2, 2, 300, 128))
    assert prefill.kernel == "trtglm_attention_prefill_d128_f16" and prefill.grid == (64, 3, 1)
    assert prefill.shared_mem == 65536 and _params(prefill.ptx, prefill.kernel) == 3 + 7 + 1
    decode = aot.attention("bfloat16", (4, 40, 1, 64), (4, 2, 513, 64))
    assert decode.kernel == "trtglm_attention_decode1_d64_bf16" and decode.grid == (16, 1, 1)  # 4 * 2 * ceil(20/16)
    assert decode.scalars[:4] == (4, 40, 2, 513) and _params(decode.ptx, decode.kernel) == 3 + 5 + 1
    with pytest.raises(ConfigError, match="head_dim 96"):
        aot.attention("float16", (1, 2, 5, 96), (1, 2, 5, 96))


class Sym:
    """A stand-in for TensorRT's ShapeExpr: records arithmetic instead of doing it."""

    def __init__(self, text):
        self.text = text

    def __add__(self, other):
        return Sym(f"({self.text} + {getattr(other, 'text', other)})")

    def __mul__(self, other):
        return Sym(f"({self.text} * {getattr(other, 'text', other)})")

    __radd__, __rmul__ = __add__, __mul__


def test_dynamic_dimensions_stay_symbolic():
    cdiv = lambda a, b: Sym(f"cdiv({a.text}, {b})")  # noqa: E731
    launch = aot.attention("float16", (Sym("B"), 8, Sym("S"), 64), (Sym("B"), 8, Sym("S"), 64), decode=False,
                           cdiv=cdiv)
    assert launch.grid[0].text == "(B * 8)" and launch.grid[1].text == "cdiv(S, 128)"
    norm = aot.residual_norm("float16", (Sym("B"), Sym("S"), 2048), kind=0)
    assert norm.grid[0].text == "(B * S)"


def _plugin_surface(path) -> dict[str, set[str]]:
    """tensorrt.plugin's names -> members, from the API surface file's `## tensorrt.plugin` section."""
    names, owner = {}, None
    text = path.read_text()
    for line in text[text.index("## tensorrt.plugin"):].splitlines()[1:]:
        if m := re.match(r"(?:class|def) (\w+)", line):
            owner = m.group(1)
            names[owner] = set()
        elif m := re.match(r"(\w+) = ", line):
            names[m.group(1)] = set()
        elif owner and (m := re.match(r"  (?:method|property|classmethod) (\w+)", line)):
            names[owner].add(m.group(1))
    return names


def test_aot_registration_uses_only_published_tensorrt_plugin_api():
    """tensorrt_aot.py cannot run here (no TensorRT): every trtp.X it uses exists in tensorrt.plugin of 11.4 and
    10.16, every trt.X in both surfaces, and KernelLaunchParams' fields are the published ones."""
    import ast
    from pathlib import Path

    from tests.unit.test_engine import SURFACES, conformance_problems, load_surface

    source = Path(aot.__file__).with_name("tensorrt_aot.py").read_text()
    tree = ast.parse(source)
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "trtp"}
    assert {"register", "autotune", "aot_impl", "KernelLaunchParams", "SymInt32", "cdiv"} <= used
    for version in ("trt11", "trt10"):
        surface = _plugin_surface(SURFACES / f"{version}-api-surface.txt")
        assert used - set(surface) == set(), version
        assert {"dtype", "like", "shape_expr", "ndim"} <= surface["TensorDesc"]
        assert {"constant_value", "is_constant"} <= surface["ShapeExpr"]
    fields = re.search(r"class KernelLaunchParams\n  method __init__\(self, (.*)\)",
                       (SURFACES / "trt11-api-surface.txt").read_text()).group(1)
    for field in re.findall(r"params\.(\w+)", source):
        assert f"{field}:" in fields
    surfaces = [load_surface(SURFACES / "trt11-api-surface.txt"), load_surface(SURFACES / "trt10-api-surface.txt")]
    trt_only = source.replace("import tensorrt.plugin as trtp\n", "")  # trtp's names were checked above
    assert conformance_problems({"tensorrt_aot.py": trt_only}, surfaces) == []
