"""The residual_norm and rotary kernels compile with nvcc (warnings as errors) for sm_80 and sm_90, and their PTX
exports exactly the entry points their README lists (skipped only where nvcc is missing; CI has nvcc).

The PTX comes from trtglm.plugins.ptx.compile_ptx, the function the GPU tests and the AOT plugins use; the object
compile also checks the host side (launchResidualNorm, launchRotary) with -Wall -Wextra, and runs ptxas.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trtglm.errors import TrtglmError
from trtglm.plugins import ptx

OPS = {"residual_norm": 36, "rotary": 6}  # op -> number of flat entry points
PLUGINS = Path(ptx.__file__).resolve().parents[2] / "plugins"


def _nvcc() -> str:
    try:
        return ptx.nvcc()
    except TrtglmError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], str]:
    """{(op, arch): PTX text}, compiled afresh (a private cache), the four in parallel."""
    _nvcc()
    cache = tmp_path_factory.mktemp("ptx")
    jobs = [(op, arch) for op in OPS for arch in ptx.ARCHS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = pool.map(lambda job: ptx.compile_ptx(*job, cache=cache), jobs)
    return dict(zip(jobs, texts))


def _documented(op: str) -> set[str]:
    """The entry point names the README spells out in full."""
    text = (PLUGINS / op / "README.md").read_text()
    return set(re.findall(rf"\b(trtglm_{op}_[a-z0-9_]+_(?:f32|f16|bf16))\b", text))


def _entries(text: str) -> set[str]:
    return set(re.findall(r"^\.visible \.entry (\w+)\(", text, flags=re.M))


@pytest.mark.parametrize("arch", ptx.ARCHS)
@pytest.mark.parametrize("op", OPS)
def test_ptx_exports_every_documented_entry_point(compiled, op, arch):
    text = compiled[op, arch]
    documented = _documented(op)
    assert len(documented) == OPS[op]
    assert _entries(text) == documented
    assert re.search(rf"^\.target {arch}\b", text, flags=re.M)


@pytest.mark.parametrize("op", OPS)
def test_source_header_names_the_same_entry_points(op):
    """The comment block at the top of the .cu names the entry points the README lists (<dt>, <variant> expanded)."""
    source = (PLUGINS / op / f"{op}.cu").read_text()
    header = source[:source.index("#include")]
    names = set()
    for template in re.findall(rf"trtglm_{op}_[a-z0-9_<>]+", header):
        for dt in ("f32", "f16", "bf16"):
            name = template.replace("<dt>", dt)
            if "<variant>_i8" in name:  # "each of the six above with out_scale": the _i8 twins of the plain names
                continue
            names.add(name)
    if "<variant>_i8" in header:
        names |= {re.sub(r"_(f32|f16|bf16)$", r"_i8_\1", n) for n in set(names) if "_i8_" not in n}
    assert names == _documented(op)


@pytest.mark.parametrize("op", OPS)
def test_object_compiles_for_both_archs_with_host_warnings_as_errors(op, tmp_path):
    cmd = [_nvcc(), *ptx.NVCC_FLAGS, "--threads", "0", "-I", str(PLUGINS), "-c", str(PLUGINS / op / f"{op}.cu"),
           "-o", str(tmp_path / f"{op}.o")]
    for arch in ptx.ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]
