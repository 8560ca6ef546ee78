"""torch -> ONNX export: factory loading, input parsing, dynamic batch, BatchNormalization kept or folded."""

import textwrap
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from trtglm.errors import ConfigError, ModelError  # noqa: E402
from trtglm.export.torch_export import InputArg, load_factory, onnx_from_torch, parse_input_arg  # noqa: E402

FACTORY = """
import torch


class ConvBnReluLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def build():
    torch.manual_seed(0)
    model = ConvBnReluLinear()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them changes the weights
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


def broken():
    raise RuntimeError("weights missing")


def not_a_module():
    return 42
"""


@pytest.fixture()
def factory_file(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def _op_counts(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _batch_dims(path):
    model = onnx.load(str(path))
    return ([i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input],
            [o.type.tensor_type.shape.dim[0].dim_param for o in model.graph.output])


def _assert_matches_torch(module, path, name="input"):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = module(x).numpy()
        (got,) = session.run(None, {name: x.numpy()})
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_torchscript_export_keeps_batchnorm_and_batch_axis(factory_file, tmp_path):
    module = load_factory(f"{factory_file}:build")
    result = onnx_from_torch(module, [parse_input_arg("input:1x3x6x6")], tmp_path / "tiny.onnx", dynamo=False,
                             keep_batchnorm=True)
    assert result.exporter == "torchscript" and result.opset == 17 and result.fallback_reason is None
    assert result.path == tmp_path / "tiny.onnx"
    assert _op_counts(result.path)["BatchNormalization"] == 1
    assert _batch_dims(result.path) == (["batch"], ["batch"])
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["output"]
    _assert_matches_torch(module, result.path)


def test_default_export_tries_dynamo_and_folds_batchnorm(factory_file, tmp_path):
    module = load_factory(f"{factory_file}:build")
    result = onnx_from_torch(module, [InputArg("images", (2, 3, 6, 6))], tmp_path / "tiny.onnx", opset=18,
                             output_names=("logits",))
    assert result.exporter == "dynamo" and result.opset == 18
    ops = _op_counts(result.path)
    assert ops["Conv"] == 1 and ops["BatchNormalization"] == 0
    model = onnx.load(str(result.path))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _batch_dims(result.path) == (["batch"], ["batch"])
    _assert_matches_torch(module, result.path, name="images")


def test_auto_export_honours_the_opset(factory_file, tmp_path):
    module = load_factory(f"{factory_file}:build")
    result = onnx_from_torch(module, [InputArg("input", (1, 3, 6, 6))], tmp_path / "tiny.onnx", opset=17)
    assert result.opset == 17
    # torch 2.13's dynamo exporter writes opset 18 for this model, so the TorchScript exporter takes over
    assert result.exporter == "dynamo" or "dynamo" in result.fallback_reason
    _assert_matches_torch(module, result.path)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_that_bakes_in_the_batch_is_rejected(tmp_path):
    class UsesPythonScalar(torch.nn.Module):
        def forward(self, x):  # the tracer records float(x.mean()) as a constant
            return x * float(x.mean())

    with pytest.raises(ModelError, match="differs from PyTorch"):
        onnx_from_torch(UsesPythonScalar(), [InputArg("x", (2, 4))], tmp_path / "bad.onnx", dynamo=False)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("text, expected", [
    ("input:1x3x224x224:float32", InputArg("input", (1, 3, 224, 224), "float32")),
    ("input:1x3x224x224", InputArg("input", (1, 3, 224, 224), "float32")),
    ("input_ids:1,128:int64", InputArg("input_ids", (1, 128), "int64")),
    ("mask:4:bool", InputArg("mask", (4,), "bool")),
])
def test_parse_input_arg(text, expected):
    assert parse_input_arg(text) == expected


@pytest.mark.parametrize("text", [
    "input", "input:", ":1x3", "input:1x0x8", "input:1xax8", "input:1x3:float64", "input:1x3:float32:extra",
    "input:1x-3", "input:1x3:",
])
def test_parse_input_arg_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_input_arg(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


def test_load_factory_errors(factory_file, tmp_path):
    with pytest.raises(ConfigError, match="expected FILE.py:FUNCTION"):
        load_factory(str(factory_file))
    with pytest.raises(ConfigError, match="file not found"):
        load_factory(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(ConfigError, match="no function 'nope'.*build"):
        load_factory(f"{factory_file}:nope")
    with pytest.raises(ConfigError, match=r"broken\(\) raised RuntimeError: weights missing"):
        load_factory(f"{factory_file}:broken")
    with pytest.raises(ConfigError, match="returned int, expected a torch.nn.Module"):
        load_factory(f"{factory_file}:not_a_module")
    bad = tmp_path / "syntax_error.py"
    bad.write_text("def build(:\n")
    with pytest.raises(ConfigError, match="syntax_error.py: importing it failed: SyntaxError"):
        load_factory(f"{bad}:build")
