"""Engine tests that need TensorRT and an NVIDIA GPU: skipped, with what is missing as the reason, elsewhere."""

import pytest

from trtglm.engine import tensorrt_status


def pytest_collection_modifyitems(config, items):
    available, reason = tensorrt_status()
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not available:
                item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a GPU: {reason}"))
