"""Calibration: streamed activation statistics (stats), amax methods (methods), the TensorRT cache format (cache)
and the ONNX Runtime collector (collect). Import the submodules directly; importing this package does nothing."""
