"""torch -> ONNX: export an nn.Module with a dynamic batch axis and check the file against PyTorch.

Why: everything after this step (passes, calibration, Q/DQ placement, TensorRT) reads ONNX only, so the export is
where a PyTorch model's numerics must be pinned down. Two exporters exist in torch: the torch.export-based one
("dynamo", preferred by torch) and the TorchScript tracer. The dynamo exporter is tried first; when it fails, cannot
honour the requested opset or disagrees with PyTorch, the TorchScript exporter is used and the result says why.
Every export is written to a temporary directory, loaded back (external data included), checked with the ONNX
checker and with ONNX Runtime against PyTorch at two batch sizes, and only then written atomically to `path`.

torch is an optional dependency (`pip install 'trtglm[export]'`); it is imported only when a function needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from trtglm.errors import ConfigError, ModelError, TrtglmError
from trtglm.onnx_io import PROTO_LIMIT, save_model

DTYPES = ("float32", "float16", "int64", "int32", "bool")
EXPORTERS = ("dynamo", "torchscript")
BATCH_AXIS = "batch"
SEED = 0
# ONNX Runtime vs PyTorch on the dummy inputs; float16 outputs get a looser bound
TOLERANCE = {"float32": (1e-3, 1e-4), "float16": (1e-2, 1e-3)}


@dataclass(frozen=True)
class InputArg:
    """One graph input: name, example shape (axis 0 is the batch axis) and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if not self.name:
            raise ConfigError(f"input {self}: the name is empty")
        if not self.shape or any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise ConfigError(f"input {self.name!r}: shape {self.shape} must be one or more positive integers")
        if self.dtype not in DTYPES:
            raise ConfigError(f"input {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str  # "dynamo" | "torchscript"
    opset: int  # the default-domain opset the file really has
    fallback_reason: str | None = None  # why the dynamo exporter was not used, when it was tried first


def parse_input_arg(text: str) -> InputArg:
    """Parse `name:1x3x224x224:float32` (dims may also be separated by ','; the dtype defaults to float32)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].strip() or not parts[1].strip():
        raise ConfigError(f"input {text!r}: expected NAME:DIMS[:DTYPE], for example input:1x3x224x224:float32")
    name, dims = parts[0].strip(), parts[1].strip()
    dtype = parts[2].strip() if len(parts) == 3 else "float32"
    tokens = re.split(r"[xX,]", dims)
    if not all(t.strip().isdigit() and int(t) > 0 for t in tokens):
        raise ConfigError(f"input {text!r}: dims {dims!r} must be positive integers separated by 'x' or ','")
    if dtype not in DTYPES:
        raise ConfigError(f"input {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return InputArg(name, tuple(int(t) for t in tokens), dtype)


def load_factory(spec: str):
    """Import `module.py:factory` by file path and return `factory()`, which must be a torch.nn.Module."""
    torch = _import_torch()
    file_text, sep, fn_name = spec.rpartition(":")
    if not sep or not file_text or not fn_name:
        raise ConfigError(f"model factory {spec!r}: expected FILE.py:FUNCTION, for example model.py:build")
    file = Path(file_text)
    if not file.is_file():
        raise ConfigError(f"model factory {file}: file not found")
    if not fn_name.isidentifier():
        raise ConfigError(f"model factory {spec!r}: {fn_name!r} is not a Python function name")
    module_name = "_trtglm_factory_" + re.sub(r"\W", "_", file.stem)
    import_spec = importlib.util.spec_from_file_location(module_name, file)
    if import_spec is None or import_spec.loader is None:
        raise ConfigError(f"model factory {file}: cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(import_spec)
    # the file may import modules that sit beside it; that directory is on sys.path only while it runs
    folder = str(file.resolve().parent)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        import_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"model factory {file}: importing it failed: {_describe(e)}") from e
    finally:
        sys.path.remove(folder)
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"model factory {file}: no function {fn_name!r} (callables defined: "
                          f"{', '.join(defined) or 'none'})")
    try:
        model = factory()
    except Exception as e:
        raise ConfigError(f"model factory {file}:{fn_name}() raised {_describe(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model factory {file}:{fn_name}() returned {type(model).__name__}, "
                          "expected a torch.nn.Module")
    return model


def onnx_from_torch(module, inputs: list[InputArg], path: Path, dynamic_batch: bool = True, opset: int = 17,
                    dynamo: bool | None = None, output_names: tuple[str, ...] | None = None,
                    keep_batchnorm: bool = False) -> ExportResult:
    """Export `module` (put in eval mode) to `path` and check it with ONNX Runtime against PyTorch.

    inputs: one InputArg per positional argument of forward(); axis 0 of each is the batch axis, named 'batch'
        in the ONNX graph when dynamic_batch.
    dynamo: True or False picks the exporter; None tries the dynamo exporter, then the TorchScript one.
    output_names: None means 'output' for one output, 'output_0', 'output_1', ... for several.
    keep_batchnorm: keep BatchNormalization nodes instead of letting the exporter fold them into Conv (trtglm's
        own fusion pass folds them later; the digits example keeps them so that the pass has work to do).
    Raises ModelError when no exporter produces a file that ONNX Runtime runs with PyTorch's results.
    """
    torch = _import_torch()
    path = Path(path)
    if not inputs:
        raise ConfigError("export: give at least one input (NAME:DIMS[:DTYPE])")
    if len({a.name for a in inputs}) != len(inputs):
        raise ConfigError(f"export: input names must be unique, got {[a.name for a in inputs]}")
    if not 7 <= opset <= 25:
        raise ConfigError(f"--opset {opset}: use an opset between 7 and 25 (17 or newer for TensorRT 10)")
    module.eval()
    args = _dummy_inputs(torch, inputs, dynamic_batch, batch=None)
    with torch.no_grad():
        reference = _flatten(module(*args))
    if not reference:
        raise ModelError("export: forward() returned no tensors")
    if output_names is None:
        output_names = ("output",) if len(reference) == 1 else tuple(f"output_{i}" for i in range(len(reference)))
    if len(output_names) != len(reference):
        raise ConfigError(f"export: {len(output_names)} output names given, forward() returns {len(reference)} "
                          "tensors")
    checks = [(args, reference)]
    if dynamic_batch:  # a second batch size catches batch dimensions the exporter baked in as constants
        other = _dummy_inputs(torch, inputs, dynamic_batch, batch=1 if args[0].shape[0] != 1 else 3)
        with torch.no_grad():
            checks.append((other, _flatten(module(*other))))

    attempts = ("dynamo", "torchscript") if dynamo is None else (("dynamo",) if dynamo else ("torchscript",))
    failures: list[str] = []
    for exporter in attempts:
        with tempfile.TemporaryDirectory(prefix="trtglm-export-") as tmp:
            tmp_file = Path(tmp) / "model.onnx"
            try:
                with warnings.catch_warnings(), quiet_exporter_logs():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", UserWarning)  # the exporters' advice; failures still raise
                    warnings.simplefilter("ignore", FutureWarning)
                    # said of PRESERVE mode in general; the module is in eval mode, so folding is safe here
                    warnings.filterwarnings("ignore", "It is recommended that constant folding be turned off")
                    if exporter == "dynamo":
                        _export_dynamo(torch, module, args, inputs, output_names, tmp_file, opset, dynamic_batch,
                                       keep_batchnorm)
                    else:
                        _export_torchscript(torch, module, args, reference, inputs, output_names, tmp_file, opset,
                                            dynamic_batch, keep_batchnorm)
                model = _load_checked(tmp_file)
                actual = _default_opset(model)
                if dynamo is None and exporter == "dynamo" and actual != opset:
                    raise ModelError(f"the dynamo exporter wrote opset {actual}, not the requested {opset}")
                _check_names(model, [a.name for a in inputs], list(output_names))
                for check_args, check_ref in checks:
                    _compare_with_ort(tmp_file, inputs, output_names, check_args, check_ref)
            except Exception as e:
                failures.append(f"{exporter}: {_describe(e)}")
                if exporter == attempts[-1]:
                    raise ModelError(f"export {path}: {'; '.join(failures)}") from e
                continue
            save_model(model, path)
            return ExportResult(path, exporter, actual, failures[0] if failures else None)
    raise AssertionError("unreachable")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConfigError("torch export needs PyTorch: pip install 'trtglm[export]'") from e
    return torch


def _dummy_inputs(torch, inputs: list[InputArg], dynamic_batch: bool, batch: int | None) -> list:
    """Seeded example tensors; the batch axis is at least 2 when dynamic (torch.export specializes size 1)."""
    gen = torch.Generator().manual_seed(SEED if batch is None else SEED + batch)
    tensors = []
    for arg in inputs:
        shape = list(arg.shape)
        if batch is not None:
            shape[0] = batch
        elif dynamic_batch and shape[0] < 2:
            shape[0] = 2
        dtype = getattr(torch, arg.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:  # small non-negative integers: valid token ids, positions and masks alike
            tensors.append(torch.randint(0, 2, shape, generator=gen, dtype=dtype))
    return tensors


def _flatten(out) -> list:
    """Tensors of a forward() result in the exporters' order (tensor, nested tuple/list, dict values)."""
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _flatten(item)]
    if hasattr(out, "detach"):
        return [out.detach()]
    return []  # non-tensor values are constants in the exported graph


@contextmanager
def quiet_exporter_logs():
    """The exporters log their fallbacks (opset conversion, skipped torchvision ops) with tracebacks; trtglm says
    which exporter it used and why it fell back, so their logs are held to errors during the export."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_dynamo(torch, module, args, inputs, output_names, file: Path, opset, dynamic_batch, keep_batchnorm):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH_AXIS)
        dynamic_shapes = tuple({0: batch} for _ in args)
    # optimize=True folds BatchNormalization into Conv; keep_batchnorm turns the optimizer off
    torch.onnx.export(module, tuple(args), str(file), dynamo=True, input_names=[a.name for a in inputs],
                      output_names=list(output_names), opset_version=opset, dynamic_shapes=dynamic_shapes,
                      optimize=not keep_batchnorm, external_data=True, verbose=False)


def _export_torchscript(torch, module, args, reference, inputs, output_names, file: Path, opset, dynamic_batch,
                        keep_batchnorm):
    dynamic_axes = None
    if dynamic_batch:
        batch = args[0].shape[0]
        dynamic_axes = {a.name: {0: BATCH_AXIS} for a in inputs}
        dynamic_axes.update({name: {0: BATCH_AXIS} for name, t in zip(output_names, reference)
                             if t.dim() > 0 and t.shape[0] == batch})
    # in EVAL mode the TorchScript exporter folds BatchNormalization into Conv; PRESERVE exports the module as it
    # is, which after module.eval() is inference BatchNormalization
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(module, tuple(args), str(file), dynamo=False, input_names=[a.name for a in inputs],
                      output_names=list(output_names), opset_version=opset, dynamic_axes=dynamic_axes,
                      training=mode, do_constant_folding=True)


def _load_checked(file: Path) -> onnx.ModelProto:
    model = onnx.load(str(file), load_external_data=True)
    try:
        onnx.checker.check_model(model if model.ByteSize() < PROTO_LIMIT else str(file))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"ONNX checker rejected the exported model: {_describe(e)}") from e
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_names(model: onnx.ModelProto, input_names: list[str], output_names: list[str]) -> None:
    initializers = {i.name for i in model.graph.initializer}
    got_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    got_outputs = [o.name for o in model.graph.output]
    if got_inputs != input_names or got_outputs != output_names:
        raise ModelError(f"exported graph has inputs {got_inputs} and outputs {got_outputs}, expected "
                         f"{input_names} and {output_names} (is an input unused by forward()?)")


def _compare_with_ort(file: Path, inputs, output_names, args, reference) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feeds = {a.name: t.numpy() for a, t in zip(inputs, args)}
        results = session.run(list(output_names), feeds)
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot run the exported model: {_describe(e)}") from e
    batch = args[0].shape[0]
    for name, got, want in zip(output_names, results, reference):
        want = want.float().numpy() if want.is_floating_point() else want.numpy()
        if got.shape != want.shape:
            raise ModelError(f"output {name!r} at batch {batch}: ONNX Runtime gives shape {got.shape}, "
                             f"PyTorch {want.shape}")
        if np.issubdtype(want.dtype, np.floating):
            rtol, atol = TOLERANCE["float16" if got.dtype == np.float16 else "float32"]
            got64, want64 = got.astype(np.float64), want.astype(np.float64)
            if not np.allclose(got64, want64, rtol=rtol, atol=atol):
                diff = float(np.max(np.abs(got64 - want64))) if got.size else 0.0
                raise ModelError(f"output {name!r} at batch {batch}: ONNX Runtime differs from PyTorch "
                                 f"(max abs diff {diff:.3g}, rtol {rtol}, atol {atol})")
        elif not np.array_equal(got, want):
            raise ModelError(f"output {name!r} at batch {batch}: ONNX Runtime differs from PyTorch")


def _describe(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if isinstance(e, TrtglmError) and lines:
        return lines[0]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
