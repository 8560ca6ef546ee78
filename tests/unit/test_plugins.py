"""The plugin catalog against the C++ plugins, `trtglm plugins`, and the plugin library build.

The library build needs TensorRT's headers, which CI does not have: it runs where TRTGLM_TENSORRT_INCLUDE names a
directory holding NvInferRuntime.h (for example the include/ folder of github.com/NVIDIA/TensorRT), and is skipped
with that reason elsewhere. The kernels alone compile in CI (tests/unit/test_plugin_compile_*.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from trtglm.cli import main
from trtglm.plugins import CATALOG, NAMESPACE, VERSION

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
HEADERS = os.environ.get("TRTGLM_TENSORRT_INCLUDE", "")


def _cpp(spec) -> str:
    folder = PLUGINS / spec.kernel
    return "".join(p.read_text() for p in sorted(folder.glob(f"{spec.kernel}_plugin.*")))


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_catalog_matches_the_cpp_plugin(spec):
    text = _cpp(spec)
    assert re.search(rf'kNAME = "{spec.name}"', text)
    names = re.search(r"names = \{([^}]*)\}", text).group(1)
    assert [n.strip().strip('"') for n in names.split(",")] == [a.name for a in spec.attributes]
    for a in spec.attributes:  # the C++ reads and serializes each attribute
        assert f'f.get("{a.name}"' in text and f'w.add("{a.name}"' in text
    common = (PLUGINS / "common" / "plugin.h").read_text()
    assert f'kNAMESPACE = "{NAMESPACE}"' in common and f'kVERSION = "{VERSION}"' in common
    assert (PLUGINS / spec.kernel / f"{spec.kernel}.cu").is_file()
    assert (PLUGINS / spec.kernel / "README.md").is_file()


def test_plugin_names_are_not_onnx_ops():
    import onnx.defs

    onnx_ops = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    assert not {s.name for s in CATALOG} & onnx_ops


def test_plugins_command_lists_every_plugin():
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    for s in CATALOG:
        assert f"{s.name}  ({NAMESPACE}::{s.name}, version {VERSION}" in result.output
        assert all(a.name in result.output for a in s.attributes)


@pytest.mark.skipif(not (HEADERS and Path(HEADERS, "NvInferRuntime.h").is_file()),
                    reason="TRTGLM_TENSORRT_INCLUDE does not name a directory with TensorRT's NvInferRuntime.h")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_plugin_library_builds_exports_two_entry_points_and_drives_like_tensorrt(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DTRTGLM_TENSORRT_INCLUDE={HEADERS}",
                    "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CUDA_ARCHITECTURES=80"], check=True, capture_output=True)
    result = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    library = build / "libtrtglm_plugins.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    exported = sorted(line.split()[-1] for line in symbols.splitlines() if line.split()[1:2] == ["T"])
    assert exported == ["getCreators", "setLoggerFinder"]
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed
    # the registry's and builder's view of the plugins (no TensorRT, no GPU): tests/cpp/plugin_driver.cpp
    driver = tmp_path / "driver"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", HEADERS, "-isystem",
                    "/usr/local/cuda/include", str(PLUGINS.parent / "tests" / "cpp" / "plugin_driver.cpp"), "-ldl",
                    "-o", str(driver)], check=True)
    result = subprocess.run([str(driver), str(library)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("all checks passed"), result.stdout
