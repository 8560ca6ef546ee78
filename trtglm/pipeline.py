"""build(cfg): the order of the stages, nothing else. Stages talk through plain data."""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from trtglm import onnx_io, report, runtime, verify
from trtglm.calib import cache as calib_cache
from trtglm.calib import data as calib_data
from trtglm.calib.collect import collect
from trtglm.calib.methods import Scales, scales_from_stats
from trtglm.config import BuildConfig
from trtglm.errors import ConfigError, ModelError, TrtglmError
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes
from trtglm.passes.insert_qdq import insert_qdq, plan_qdq
from trtglm.passes.smooth_quant import smooth_quant

EVAL_FRACTION = 0.2
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (axis attribute)
# Measured on an x86 CPU without VNNI (ORT 1.32): INT8 MatMul/Gemm saturate int16 sums; INT8 Conv does not.
ORT_SATURATING_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Artefacts:
    """Where each output goes. With -o FILE.onnx the rest is written beside it, prefixed by its stem."""

    directory: Path
    qdq: Path
    fp32: Path
    cache: Path
    report_json: Path
    report_md: Path
    plots: Path

    @staticmethod
    def of(cfg: BuildConfig) -> Artefacts:
        if cfg.out_onnx is not None:
            d, stem = cfg.out_onnx.parent, cfg.out_onnx.stem
            return Artefacts(d, cfg.out_onnx, d / f"{stem}.fp32.opt.onnx", d / f"{stem}.calib.cache",
                             d / f"{stem}.report.json", d / f"{stem}.report.md", d / f"{stem}.plots")
        d = cfg.out_dir
        return Artefacts(d, d / "model.int8.qdq.onnx", d / "model.fp32.opt.onnx", d / "calib.cache",
                         d / "report.json", d / "report.md", d / "plots")

    def staged(self, staging: Path) -> Artefacts:
        return Artefacts(staging, *(staging / p.name for p in (self.qdq, self.fp32, self.cache, self.report_json,
                                                               self.report_md, self.plots)))


class _Timer:
    """Wall time of each stage, and the process's peak RSS when the stage ends (peaks only grow)."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - start, 4)
        self.peak_rss_mb[name] = _peak_rss_mb()


def build(cfg: BuildConfig, console=None) -> dict:
    """Run the pipeline; returns the report dict (also written as report.json)."""
    con = console or report.console()
    timer = _Timer()
    final = Artefacts.of(cfg)
    with _staging(final.directory) as staging:
        out = final.staged(staging)
        with timer.stage("load"):
            original = onnx_io.load_model(cfg.model)
            _check_not_quantized(original, cfg.model)
            specs = calib_data.input_specs(original)
            calib_set = _open_data(cfg, specs)
            eval_set, eval_idx, calib_idx = _eval_split(cfg, specs, calib_set)
        with timer.stage("passes"):
            graph = gs.import_onnx(original)
            pass_counts = run_passes(graph, DEFAULT_PIPELINE, PassContext(opset=_opset(original)))
            fp32 = _export(graph, original)
            plan = plan_qdq(graph, cfg.policy)
        con.print(f"[bold]passes[/] {_fmt_counts(pass_counts)}; Q/DQ plan: {len(plan.activations)} activations, "
                  f"{len(plan.weights)} weights")
        stats = {}
        with timer.stage("calibration"):
            if cfg.calib_cache is not None:
                scales = calib_cache.read_trt_cache(cfg.calib_cache)
            else:
                batches = calib_set.batches(calib_idx, cfg.batch_size)
                total = calib_data.batch_count(calib_set, calib_idx, cfg.batch_size)
                stats = collect(fp32, plan.activations, batches, total=total)
                if cfg.smoothquant is not None:  # smooth, then calibrate the smoothed activations
                    pass_counts["smooth_quant"] = smooth_quant(graph, stats, cfg.smoothquant, frozenset(plan.skipped))
                    plan = plan_qdq(graph, cfg.policy)
                    stats = collect(_export(graph, original), plan.activations,
                                    calib_set.batches(calib_idx, cfg.batch_size), total=total,
                                    description="calibrating (smoothed)")
                scales = scales_from_stats(stats, cfg.calib_method, cfg.percentile)
        seven_bit_ops = ORT_SATURATING_OPS if cfg.target == "ort-cpu" and not runtime.has_vnni() else ()
        with timer.stage("quantize"):
            n_quantized = insert_qdq(graph, plan, scales.amax, seven_bit_ops)  # fp32 was exported: reuse graph
            int8 = _export(graph, fp32, min_opset=MIN_QDQ_OPSET)
            onnx_io.save_model(fp32, out.fp32)
            onnx_io.save_model(int8, out.qdq)
            calib_cache.write_trt_cache(_used(scales, plan.activations), out.cache)
        comparison, fp32_rel_err = None, None
        if eval_set is not None and eval_idx:
            with timer.stage("verify"):
                feeds = next(iter(eval_set.batches(eval_idx[: cfg.batch_size], cfg.batch_size)))
                fp32_rel_err = verify.max_relative_error(original, fp32, feeds)
                comparison = verify.compare_with_fp32(original, int8, eval_set.batches(eval_idx, cfg.batch_size),
                                                      eval_set.labels(eval_idx))
        rep = report.make(cfg=cfg, artefacts=final, pass_counts=pass_counts, plan=plan, scales=scales, stats=stats,
                          n_quantized=n_quantized, seven_bit_ops=seven_bit_ops, comparison=comparison,
                          fp32_rel_err=fp32_rel_err, engine=_engine_status(), timings=timer.stages,
                          peak_rss_mb=_peak_rss_mb(), stage_peak_rss_mb=timer.peak_rss_mb, eval_source=_eval_source(cfg, eval_set, eval_idx))
        report.write(rep, stats, scales, out)
    report.print_summary(rep, con)
    if cfg.check_tol is not None:
        report.check_tolerance(rep, cfg.check_tol)
    return rep


def _check_not_quantized(model: onnx.ModelProto, path: Path) -> None:
    node = next((n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")), None)
    if node is not None:
        raise ModelError(f"model {path}: already quantized ({node.op_type} node '{node.name}'); "
                         "give trtglm the FP32 model")


def _open_data(cfg: BuildConfig, specs):
    if cfg.calib_cache is not None:
        if not cfg.calib_cache.is_file():
            raise ConfigError(f"--calib-cache {cfg.calib_cache}: file not found")
        return None
    return calib_data.open_dataset(cfg.calib, specs, preprocess=cfg.preprocess, script=cfg.calib_script)


def _eval_split(cfg: BuildConfig, specs, calib_set):
    """Evaluation data: --eval, else a held-out split of the calibration data the calibrator never sees."""
    if cfg.eval is not None:
        eval_set = calib_data.open_dataset(cfg.eval, specs, preprocess=cfg.preprocess, what="evaluation")
        calib_idx = list(range(len(calib_set))) if calib_set is not None else []
        return eval_set, list(range(len(eval_set))), _limit(calib_idx, cfg)
    if calib_set is None:
        return None, [], []
    calib_idx, eval_idx = calib_data.split(len(calib_set), EVAL_FRACTION)
    return calib_set, eval_idx, _limit(calib_idx, cfg)


def _limit(indices: list[int], cfg: BuildConfig) -> list[int]:
    return indices[: cfg.max_calib_samples] if cfg.max_calib_samples else indices


def _eval_source(cfg: BuildConfig, eval_set, eval_idx) -> str | None:
    if eval_set is None:
        return None
    if cfg.eval is not None:
        return f"--eval: {eval_set.source}"
    return f"{len(eval_idx)} held out of {eval_set.source}, never seen by the calibrator"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _export(graph: gs.Graph, like: onnx.ModelProto, min_opset: int = 0) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    model.ir_version = like.ir_version
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    model.producer_name, model.producer_version = "trtglm", _version()
    if _opset(model) < min_opset:
        try:
            model = onnx.version_converter.convert_version(model, min_opset)
        except RuntimeError as e:
            raise ModelError(f"model opset {_opset(model)}: per-channel Q/DQ needs opset {min_opset} and ONNX's "
                             f"version converter failed ({str(e).splitlines()[-1]}); re-export at opset >= 13") from e
    return onnx_io.infer_shapes(model)


def _used(scales: Scales, names: list[str]) -> Scales:
    keep = [n for n in names if n in scales.amax]
    return Scales({n: scales.amax[n] for n in keep}, {n: scales.method[n] for n in keep})


def _engine_status() -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        return {"built": False, "reason": "TensorRT is not installed (pip extra 'tensorrt' on a GPU node); "
                                          "the Q/DQ ONNX was verified on the embedded ONNX Runtime backend"}
    return {"built": False, "reason": "the TensorRT engine stage is not part of this release yet; "
                                      "the Q/DQ ONNX was verified on the embedded ONNX Runtime backend"}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _version() -> str:
    from trtglm import __version__

    return __version__


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


@contextmanager
def _staging(directory: Path):
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
