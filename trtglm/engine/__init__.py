"""TensorRT engine stage: build a serialized engine (TensorRT imported lazily); the equivalent NVIDIA tool commands."""

from trtglm.engine.build import build_engine, sidecar_path, tensorrt_status
from trtglm.engine.commands import polygraphy_command, trtexec_command

__all__ = ["build_engine", "polygraphy_command", "sidecar_path", "tensorrt_status", "trtexec_command"]
