"""The few error types trtglm raises. The CLI prints them on one line and exits non-zero."""


class TrtglmError(Exception):
    """Base class: the message names what failed (file, tensor or node) and what to do."""

    exit_code = 1


class ModelError(TrtglmError):
    """The model file is missing, unreadable or not a valid ONNX graph."""

    exit_code = 2


class DataError(TrtglmError):
    """Calibration or evaluation data does not match the model or holds bad values."""

    exit_code = 3


class ConfigError(TrtglmError):
    """An option or option combination is invalid."""

    exit_code = 4


class CalibrationError(TrtglmError):
    """Calibration could not produce scales (for example NaN activations)."""

    exit_code = 5


class AccuracyError(TrtglmError):
    """The quantized model violates the tolerance given with --check-tol."""

    exit_code = 6
