"""torch -> ONNX export: the entry point for PyTorch models (``trtglm export`` / ``--torch module.py:factory``).

``torch_export.onnx_from_torch`` writes an ONNX file with a dynamic batch axis named ``batch`` and checks it
against PyTorch with ONNX Runtime; the rest of trtglm (passes, calibration, Q/DQ, TensorRT) only sees ONNX.
"""
