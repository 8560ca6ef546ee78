"""`trtglm compare`: a candidate (a TensorRT engine through Polygraphy's TrtRunner, or a Q/DQ ONNX on ONNX Runtime)
against the FP32 ONNX on ONNX Runtime, with tolerances; per-layer mode finds where INT8 parts from FP32.

Why Polygraphy: users gate CI on `polygraphy run --trt --onnxrt`; running the same runners and the same comparison
function (CompareFunc.simple: |a - b| <= atol + rtol * |b| judged on the chosen error statistic) means a pass here
is a pass there. Per-layer mode marks every intermediate tensor as an output in both models (Polygraphy's
MARK_ALL) and compares the tensors that exist in both, in the reference's topological order. Marking tensors as
outputs stops TensorRT (and ONNX Runtime) from fusing across them, so the per-layer engine is a debugging build,
not the deployed one: its first failing tensor and the layer whose error grows most over its inputs' are what
point at the culprit. Which layers really run INT8 comes from the engine inspector (TensorRT) or, for ONNX
Runtime, from the nodes whose every input is dequantized (ONNX Runtime's QDQ fusion turns those into INT8 kernels).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from polygraphy import constants
from polygraphy.backend.onnx import ModifyOutputs
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from trtglm import runtime
from trtglm.engine.build import int8_layers, layers_path, load_plugins, read_sidecar, tensorrt_status
from trtglm.errors import ConfigError, TrtglmError
from trtglm.verify import OrtRunner

ERROR_STATS = ("elemwise", "max", "mean", "median")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
GROWTH_FLOOR = 1e-6  # 1 - cosine below this is float32 rounding, not quantization: growth is measured from here
_LINEAR = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention"}


@dataclass
class TensorDiff:
    name: str
    op: str  # the reference node that produces it ("output" for graph outputs of unknown producer)
    max_abs: float
    rel: float  # max |a - b| / max |ref|
    cosine: float
    passed: bool
    growth: float = 1.0  # (1 - cosine) here over the largest (1 - cosine) of the producer's inputs (floor 1e-6)


@dataclass
class CompareResult:
    candidate: str
    runner: str  # tensorrt | onnxruntime
    samples: int
    atol: float
    rtol: float
    error_stat: str
    outputs: list[TensorDiff] = field(default_factory=list)
    layers: list[TensorDiff] = field(default_factory=list)  # per-layer mode: shared tensors, topological order
    int8_layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.outputs)

    @property
    def first_failure(self) -> TensorDiff | None:
        return next((d for d in self.layers if not d.passed), None)

    def to_json(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        first = self.first_failure
        out["first_failure"] = first.name if first else None
        return out


def compare(candidate: Path, reference: Path, feeds: list[dict[str, np.ndarray]], atol: float = 0.05,
            rtol: float = 0.05, error_stat: str = "mean", per_layer: bool = False, runner: str = "auto",
            plugins: tuple[Path, ...] = ()) -> CompareResult:
    """Run both on every feed dict; outputs (and with per_layer, every shared intermediate tensor) compared.

    candidate: a serialized engine (.engine/.plan/.trt: TrtRunner) or an ONNX file, run on ONNX Runtime, or with
    runner="tensorrt" built into an engine by Polygraphy with the feeds' shapes as its one profile (the way to get
    TensorRT's per-layer numbers). runner="auto": TensorRT for engines, ONNX Runtime for ONNX files.
    """
    candidate, reference = Path(candidate), Path(reference)
    for path, what in ((candidate, "candidate"), (reference, "reference")):
        if not path.is_file():
            raise ConfigError(f"{what} {path}: file not found")
    if error_stat not in ERROR_STATS:
        raise ConfigError(f"--error-stat {error_stat!r}: choose one of {', '.join(ERROR_STATS)}")
    if not feeds:
        raise ConfigError("no inputs to compare on")
    engine = candidate.suffix in ENGINE_SUFFIXES
    kind = "tensorrt" if engine or runner == "tensorrt" else "onnxruntime"
    if engine and runner == "onnxruntime":
        raise ConfigError(f"candidate {candidate}: a TensorRT engine runs only on TensorRT; give its ONNX for "
                          f"ONNX Runtime")
    if engine and per_layer:
        raise ConfigError(f"candidate {candidate}: per-layer mode rebuilds the engine with every tensor marked as an "
                          f"output, so it needs the Q/DQ ONNX the engine was built from (--runner tensorrt)")
    ref_model = onnx.load(str(reference), load_external_data=False)
    runners = [_ort_runner(reference, per_layer, "fp32"),
               _trt_engine_runner(candidate, plugins) if engine else
               _trt_onnx_runner(candidate, feeds[0], per_layer, plugins) if kind == "tensorrt" else
               _ort_runner(candidate, per_layer, kind)]
    compare_func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=error_stat,
                                     infinities_compare_equal=True)
    # Polygraphy logs every tensor it compares (the table says it), and numpy warns on an attention mask's infinities
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)
    if not hasattr(accuracy, "values"):  # Polygraphy >= 0.53.5: a list with one AccuracyResult per compare function
        accuracy = accuracy[0]
    verdict = next(iter(accuracy.values()))  # the one runner pair: per iteration, tensor name -> result
    ref_outs, cand_outs = results[0][1], results[1][1]
    result = CompareResult(str(candidate), kind, len(feeds), atol, rtol, error_stat)
    producers = _producers(ref_model)
    diffs: dict[str, TensorDiff] = {}
    for name in _topological(ref_model):
        if all(name in r and name in c for r, c in zip(ref_outs, cand_outs)):
            passed = all(bool(it[name]) for it in verdict if name in it)
            diffs[name] = _diff(name, producers[name][0], [r[name] for r in ref_outs], [c[name] for c in cand_outs],
                                passed)
    for name, d in diffs.items():
        worst_input = max((1.0 - diffs[i].cosine for i in producers[name][1] if i in diffs), default=0.0)
        d.growth = max(1.0 - d.cosine, GROWTH_FLOOR) / max(worst_input, GROWTH_FLOOR)
    result.outputs = [diffs[o.name] for o in ref_model.graph.output if o.name in diffs]
    missing = [o.name for o in ref_model.graph.output if o.name not in diffs]
    if missing:
        raise ConfigError(f"candidate {candidate}: has no output '{missing[0]}' (the reference's outputs: "
                          f"{', '.join(o.name for o in ref_model.graph.output)})")
    result.layers = list(diffs.values()) if per_layer else []
    result.int8_layers = _int8_layers_trt(candidate) if engine else _int8_layers_onnx(candidate)
    return result


def _ort_runner(path: Path, mark_all: bool, name: str) -> OnnxrtRunner:
    model = onnx.load(str(path))
    if mark_all:
        model = ModifyOutputs(model, outputs=constants.MARK_ALL)()
    return OrtRunner(runtime.session(model, optimize=True), name=name)


def _trt_engine_runner(engine: Path, plugins: tuple[Path, ...]):
    trt = _tensorrt(engine)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runtime_ = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    listed = tuple(Path(p) for p in read_sidecar(engine).get("plugins", ()))
    load_plugins(runtime_.get_plugin_registry(), tuple(plugins) + listed, trt.Logger(trt.Logger.WARNING))
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine)), runtime=runtime_), name="tensorrt")


def _trt_onnx_runner(onnx_path: Path, feed: dict[str, np.ndarray], mark_all: bool, plugins: tuple[Path, ...]):
    """The ONNX built by Polygraphy into a strongly typed engine; the feed's shapes make its one profile."""
    trt = _tensorrt(onnx_path)
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath,
                                        Profile, TrtRunner)

    logger = trt.Logger(trt.Logger.WARNING)
    load_plugins(trt.Builder(logger).get_plugin_registry(), tuple(plugins), logger)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    if mark_all:
        network = ModifyNetworkOutputs(network, outputs=constants.MARK_ALL)
    profile = Profile()
    for name, array in sorted(feed.items()):
        profile.add(name, array.shape, array.shape, array.shape)
    return TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile])), name="tensorrt")


def _tensorrt(path: Path):
    available, reason = tensorrt_status()
    if not available:
        raise TrtglmError(f"{path}: cannot run it on TensorRT: {reason}")
    import tensorrt as trt

    return trt


def _diff(name: str, op: str, refs: list, cands: list, passed: bool) -> TensorDiff:
    """Errors over all runs. Equal values (the same infinity, as in an additive attention mask) count as equal;
    the cosine is over the entries finite in both."""
    max_abs, peak, cosines = 0.0, 0.0, []
    for r, c in zip(refs, cands):
        r, c = np.asarray(r, np.float64), np.asarray(c, np.float64)
        if r.shape != c.shape:
            return TensorDiff(name, op, float("inf"), float("inf"), 0.0, False)
        finite = np.isfinite(r) & np.isfinite(c)
        differ = (r != c) & ~(np.isnan(r) & np.isnan(c))
        if (differ & ~finite).any():
            max_abs = float("inf")  # an infinity or NaN on one side only
        r, c = np.where(finite, r, 0.0), np.where(finite, c, 0.0)
        max_abs = max(max_abs, float(np.abs(r - c).max(initial=0.0)))
        peak = max(peak, float(np.abs(r).max(initial=0.0)))
        nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
        cosines.append(1.0 if nr == nc == 0.0 else float((r * c).sum() / max(nr * nc, 1e-30)))
    return TensorDiff(name, op, max_abs, max_abs / max(peak, 1e-12), float(np.mean(cosines)), passed)


def _producers(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Tensor -> (op type of the node that produces it, that node's inputs)."""
    return {out: (node.op_type, tuple(node.input)) for node in model.graph.node for out in node.output if out}


def _topological(model: onnx.ModelProto) -> list[str]:
    """Every node output, in graph order (ONNX graphs are stored topologically sorted)."""
    return [out for node in model.graph.node for out in node.output if out]


def _int8_layers_onnx(path: Path) -> list[str]:
    """Linear nodes of a Q/DQ ONNX whose every activation and weight input is dequantized (biases aside)."""
    model = onnx.load(str(path), load_external_data=False)
    dq = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node.name or node.output[0] for node in model.graph.node
            if node.op_type in _LINEAR and all(i in dq for i in node.input[:2] if i)]


def _int8_layers_trt(engine: Path) -> list[str]:
    """Engine layers whose inspector record names an INT8 format or type (.layers.json, written by the build)."""
    path = layers_path(engine)
    if not path.is_file():
        return []
    return int8_layers(json.loads(path.read_text()))


def print_result(result: CompareResult, top: int = 10) -> None:
    """Outputs (pass/fail with Polygraphy's verdict), per-layer: the first failing tensor and the tensors whose error
    grows most over their inputs'; the layers that run INT8."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"{result.candidate} ({result.runner}) vs FP32 on ONNX Runtime, {result.samples} run"
                  f"{'s' * (result.samples != 1)}; atol {result.atol:g}, rtol {result.rtol:g}, "
                  f"error stat {result.error_stat}")
    console.print(_table("outputs", result.outputs, Table))
    if result.layers:
        first = result.first_failure
        console.print(f"first tensor out of tolerance: {first.name} ({first.op}), cosine {first.cosine:.5f}"
                      if first else "every shared intermediate tensor is within tolerance")
        worst = sorted(result.layers, key=lambda d: -d.growth)[:top]
        title = f"largest error growth: (1 - cosine) over its inputs' worst (of {len(result.layers)} tensors)"
        console.print(_table(title, worst, Table))
    kind = "engine layers with INT8 tensors" if result.runner == "tensorrt" else "nodes ONNX Runtime runs in INT8"
    names = ", ".join(result.int8_layers[:top]) + (", ..." if len(result.int8_layers) > top else "")
    console.print(f"{kind}: {len(result.int8_layers)}" + (f" ({names})" if names else ""))
    console.print("PASS" if result.passed else "FAIL: an output is out of tolerance")


def _table(title: str, diffs: list[TensorDiff], table_cls):
    table = table_cls(title=title)
    for col in ("tensor", "op", "max abs", "rel", "cosine", "growth", "ok"):
        table.add_column(col, justify="left" if col in ("tensor", "op") else "right",
                         overflow="fold" if col == "tensor" else "ellipsis")
    for d in diffs:
        table.add_row(d.name.replace("[", "\\["), d.op, f"{d.max_abs:.4g}", f"{d.rel:.4g}", f"{d.cosine:.5f}",
                      f"x{d.growth:.3g}", "yes" if d.passed else "NO")
    return table
