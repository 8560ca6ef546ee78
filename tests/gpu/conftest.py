"""Tests that need a GPU, skipped with what is missing as the reason elsewhere.

Markers (set per module with `pytestmark`): `tensorrt` needs TensorRT and a GPU (engine build/run/compare);
`cuda` needs a CUDA GPU and cupy (the plugin kernels, launched from their PTX without TensorRT).
"""

import functools

import pytest


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError:
        return False, "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy raises its own CUDARuntimeError without a driver
        return False, f"no CUDA GPU ({type(e).__name__}: {e})"
    return (True, "") if count else (False, "no CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" not in item.nodeid.replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("tensorrt"):
            from trtglm.engine import tensorrt_status  # imports onnx: only where the engine tests run

            available, reason = tensorrt_status()
            if not available:
                item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a GPU: {reason}"))
        elif item.get_closest_marker("cuda"):
            available, reason = cuda_status()
            if not available:
                item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU and cupy: {reason}"))
        else:
            item.add_marker(pytest.mark.skip(reason="tests/gpu: mark the module `tensorrt` or `cuda`"))
