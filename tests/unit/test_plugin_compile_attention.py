"""The attention kernels compile with nvcc (warnings as errors) for sm_80 and sm_90, their PTX exports exactly the
entry points the README lists, and the kernels are the tensor-core ones the README describes (skipped only where
nvcc is missing; CI has nvcc).

The PTX comes from trtglm.plugins.ptx.compile_ptx, the function the GPU tests and the AOT plugins use; the object
compile also checks the host side (launchAttention, attentionWorkspaceSize) with -Wall -Wextra, and runs ptxas.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trtglm.errors import TrtglmError
from trtglm.plugins import ptx

PLUGINS = Path(ptx.__file__).resolve().parents[2] / "plugins"
ENTRIES = 16  # {prefill, decode, decode1, combine} x {d64, d128} x {f16, bf16}
MMA = {"f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
       "bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"}


def _nvcc() -> str:
    try:
        return ptx.nvcc()
    except TrtglmError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    """{arch: PTX text}, compiled afresh (a private cache), both archs in parallel."""
    _nvcc()
    cache = tmp_path_factory.mktemp("ptx")
    with ThreadPoolExecutor(len(ptx.ARCHS)) as pool:
        texts = pool.map(lambda arch: ptx.compile_ptx("attention", arch, cache=cache), ptx.ARCHS)
    return dict(zip(ptx.ARCHS, texts))


def _documented() -> set[str]:
    text = (PLUGINS / "attention" / "README.md").read_text()
    return set(re.findall(r"\b(trtglm_attention_[a-z0-9_]+_(?:f16|bf16))\b", text))


def _bodies(text: str) -> dict[str, str]:
    """{entry name: its PTX body}."""
    parts = re.split(r"^\.visible \.entry (\w+)\(", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("arch", ptx.ARCHS)
def test_ptx_exports_every_documented_entry_point(compiled, arch):
    text = compiled[arch]
    documented = _documented()
    assert len(documented) == ENTRIES
    assert set(_bodies(text)) == documented
    assert re.search(rf"^\.target {arch}\b", text, flags=re.M)


def test_source_header_names_the_same_entry_points():
    """The comment block at the top of attention.cu names the README's entry points (<d>, <dt> expanded)."""
    source = (PLUGINS / "attention" / "attention.cu").read_text()
    header = source[:source.index("#include")]
    names = {t.replace("<d>", d).replace("<dt>", dt)
             for t in re.findall(r"trtglm_attention_[a-z0-9]+_<d>_<dt>", header)
             for d in ("d64", "d128") for dt in ("f16", "bf16")}
    assert names == _documented()


@pytest.mark.parametrize("arch", ptx.ARCHS)
def test_prefill_and_decode_run_on_tensor_cores(compiled, arch):
    for name, body in _bodies(compiled[arch]).items():
        dt = name.rsplit("_", 1)[1]
        if "_combine_" in name:
            assert "mma.sync" not in body
            continue
        assert MMA[dt] in body, name
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, name        # Q / K fragments
        assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in body, name  # V fragments
        assert "cp.async.cg.shared.global" in body and "cp.async.wait_group" in body, name
        assert "ex2.approx" in body, name  # exp2 softmax


def test_object_compiles_for_both_archs_with_host_warnings_as_errors(tmp_path):
    cmd = [_nvcc(), *ptx.NVCC_FLAGS, "--threads", "0", "-I", str(PLUGINS), "-c",
           str(PLUGINS / "attention" / "attention.cu"), "-o", str(tmp_path / "attention.o")]
    for arch in ptx.ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]
