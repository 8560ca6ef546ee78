"""trtglm: a deployment compiler from ONNX/PyTorch to calibrated INT8 Q/DQ ONNX and TensorRT engines."""

__version__ = "0.1.0"
