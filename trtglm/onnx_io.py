"""Loading and saving ONNX models: checker, shape inference, external data, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from trtglm.errors import ModelError, TrtglmError

# Protobuf cannot serialize a message of 2 GiB or more; such models keep their weights in external data.
PROTO_LIMIT = 2**31 - 1


def load_model(path: Path, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (with its external data), check it and infer shapes."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path}: file not found")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"model {path}: not a readable ONNX file (truncated or not ONNX: {_first_line(e)})") from e
    except FileNotFoundError as e:
        raise ModelError(f"model {path}: external data file missing: {e.filename}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"model {path}: not an ONNX model (no graph; is the file truncated?)")
    if check:
        try:
            if model.ByteSize() < PROTO_LIMIT:
                onnx.checker.check_model(model)
            else:
                onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise ModelError(f"model {path}: ONNX checker failed: {_first_line(e)}") from e
    return infer_shapes(model, name=str(path))


def infer_shapes(model: onnx.ModelProto, name: str = "model") -> onnx.ModelProto:
    if model.ByteSize() >= PROTO_LIMIT:
        return model  # in-memory inference cannot serialize it; shapes from the exporter are kept
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # onnx raises several types here, all meaning the same thing
        raise ModelError(f"model {name}: shape inference failed: {_first_line(e)}") from e


def load_graph(path: Path) -> gs.Graph:
    return gs.import_onnx(load_model(path))


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write atomically: to a temporary name in the same directory, then rename.

    Models over 2 GB go to `<name>.data` beside the file (ONNX external data).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if model.ByteSize() >= PROTO_LIMIT:
            data_name = path.name + ".data"
            with atomic_path(path.parent / data_name) as tmp_data:
                model = _copy(model)  # onnx strips the weights out of the proto it saves externally
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=1024)
                # the .onnx refers to the final data name, so rewrite the locations before the rename
                _relocate_external_data(tmp, tmp_data.name, data_name)
        else:
            tmp.write_bytes(model.SerializeToString())
    return path


def save_graph(graph: gs.Graph, path: Path) -> Path:
    return save_model(gs.export_onnx(graph), path)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise TrtglmError(f"output {path}: cannot write ({e.strerror})") from e
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artefacts are ordinary files
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _relocate_external_data(onnx_path: Path, old: str, new: str) -> None:
    model = onnx.load(str(onnx_path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx_path.write_bytes(model.SerializeToString())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def staged_directory(directory: Path):
    """Write every artefact into a hidden staging folder, then move them into place together."""
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".trtglm-staging-", dir=directory))
    except OSError as e:
        raise TrtglmError(f"output directory {directory}: cannot write ({e.strerror})") from e
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            target = directory / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and directory.exists() and not any(directory.iterdir()):
            directory.rmdir()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (models are recorded by hash in reports and engine sidecars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
