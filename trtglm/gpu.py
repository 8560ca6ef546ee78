"""What the NVIDIA driver says about the GPU, asked through libcuda with ctypes (no TensorRT, no cuda-python): whether
there is one (tensorrt_status), and its name and compute capability (the engine sidecar, the PTX architecture)."""

from __future__ import annotations

import ctypes


def gpu_problem() -> str | None:
    """None when the CUDA driver sees a GPU, else what is missing (asked through the driver API, not TensorRT)."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return "no NVIDIA driver found (libcuda is missing), so there is no GPU to build the engine on"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver is installed but sees no CUDA GPU"
    return None


def gpu_info() -> dict | None:
    """Name and compute capability of the current CUDA device (the one TensorRT builds for), from the driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0:
        return None
    if cuda.cuCtxGetDevice(ctypes.byref(device)) != 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None  # no current context: device 0 of CUDA_VISIBLE_DEVICES, the one TensorRT uses by default
    cuda.cuDeviceGetName(name, len(name), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}
