"""build(cfg): the order of the stages, nothing else. Stages talk through plain data."""

from __future__ import annotations

import resource
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm import onnx_io, quant_config, report, runtime, sensitivity, verify
from trtglm.calib import cache as calib_cache
from trtglm.calib import data as calib_data
from trtglm.calib import search
from trtglm.calib.collect import collect, head_absmax
from trtglm.calib.methods import Scales, scales_for
from trtglm.calib.ray_executor import collect_on_ray, ray_map
from trtglm.calib.rows import RowSample
from trtglm.calib.text import open_text_dataset
from trtglm.calib.weight_quant import SEQUENTIAL_SAMPLES, WeightDecisions, correct_sequentially, decide_weights
from trtglm import profiles
from trtglm.config import BuildConfig, ShapeProfile
from trtglm.engine.build import AOT_PLUGINS, build_engine, tensorrt_status
from trtglm.engine.commands import polygraphy_command, trtexec_command
from trtglm.errors import ConfigError, ModelError, TrtglmError
from trtglm.passes import DEFAULT_PIPELINE, PassContext, fusion_summary, run_passes
from trtglm.passes.insert_qdq import QUANTIZED_OPS, QdqPlan, insert_qdq, plan_qdq
from trtglm.passes.convert_fp16 import convert_fp16
from trtglm.passes.equalize import equalize
from trtglm.passes.explicit_pads import explicit_pads
from trtglm.passes.kv_cache import cache_pairs, quantize_kv_cache
from trtglm.passes.normals import input_means
from trtglm.passes.plugin_ops import DOMAIN as PLUGIN_DOMAIN
from trtglm.passes.plugin_ops import from_plugin_ops, to_plugin_ops
from trtglm.passes.smooth_quant import smooth_quant
from trtglm.passes.weight_only import BLOCKED_DQ_OPSET, model_from_graph, weight_only

EVAL_FRACTION = 0.2
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (axis attribute)
FP16_QDQ_OPSET = 19  # Q/DQ with FP16 scales (INT8 + FP16 builds)
ATTENTION_OPSET = 23  # the Attention op
# Measured on an x86 CPU without VNNI (ORT 1.32): INT8 MatMul/Gemm saturate int16 sums; INT8 Conv does not.
ORT_SATURATING_OPS = ("MatMul", "Gemm")
SENSITIVITY_SAMPLES = 128  # calibration samples the accuracy budget is measured on


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
    quant_config: Path

    @staticmethod
    def of(cfg: BuildConfig) -> Artefacts:
        if cfg.out_onnx is not None:
            d, stem = cfg.out_onnx.parent, cfg.out_onnx.stem
            return Artefacts(d, cfg.out_onnx, d / f"{stem}.fp32.opt.onnx", d / f"{stem}.calib.cache",
                             d / f"{stem}.report.json", d / f"{stem}.report.md", d / f"{stem}.plots",
                             d / f"{stem}.quant_config.json")
        d = cfg.out_dir
        name = ("model.int8.qdq.onnx" if cfg.static_int8 else f"model.{cfg.weight_only}.wo.onnx" if cfg.weight_only
                else "model.fp16.onnx" if cfg.fp16 else "model.fp32.opt.onnx")
        return Artefacts(d, d / name, d / "model.fp32.opt.onnx", d / "calib.cache",
                         d / "report.json", d / "report.md", d / "plots", d / "quant_config.json")

    @property
    def plugin_onnx(self) -> Path:
        """--plugin-ops: the deployable model with trtglm's plugin ops (TensorRT only), beside the Q/DQ ONNX."""
        return self.qdq.with_name(self.qdq.name.removesuffix(".onnx") + ".plugins.onnx")

    def staged(self, staging: Path) -> Artefacts:
        return Artefacts(staging, *(staging / p.name for p in (self.qdq, self.fp32, self.cache, self.report_json,
                                                               self.report_md, self.plots, self.quant_config)))


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
    with onnx_io.staged_directory(final.directory) as staging:
        out = final.staged(staging)
        with timer.stage("load"):
            original = onnx_io.load_model(cfg.model)
            _check_not_quantized(original, cfg.model)
            specs = calib_data.input_specs(original)
            calib_set = _open_data(cfg, specs)
            eval_set, eval_idx, calib_idx = _eval_split(cfg, specs, calib_set)
            if cfg.attention == "native":
                original = _at_opset(original, ATTENTION_OPSET, "--attention native")
            if cfg.weight_only is not None:
                original = _at_opset(original, BLOCKED_DQ_OPSET, "--weight-only (blocked DequantizeLinear)")
        with timer.stage("passes"):
            graph = gs.import_onnx(original)
            ctx = PassContext(opset=_opset(original), attention=cfg.attention)
            pads = cfg.explicit_pads and cfg.policy.unsigned and cfg.static_int8  # only the unsigned grid needs them
            pass_counts = run_passes(graph, DEFAULT_PIPELINE + ((equalize,) if cfg.equalize else ())
                                     + ((explicit_pads,) if pads else ()), ctx)
            fusions = fusion_summary(graph, pass_counts, ctx)
            fp32 = _export(graph, original)
            pinned = _quant_config(cfg, graph)
            policy = replace(cfg.policy, keep_float=pinned.keep_float)
            if cfg.unsigned and cfg.fp16_on_cpu:
                ctx.log.append("unsigned grid off: --fp16 --target ort-cpu (ONNX Runtime's FP16 convolutions "
                               "accumulate in FP16, where the grid's shifted biases cancel)")
            plan = plan_qdq(graph, policy)
        con.print(f"[bold]fused[/] {_fmt_counts(fusions)}")
        unmatched = sum(node.op == "Softmax" for node in graph.nodes)
        if cfg.attention == "native" and unmatched:
            con.print(f"[yellow]warning[/]: --attention native: {unmatched} Softmax not part of a recognised attention "
                      "block, kept decomposed (report.json: pass_log says why)")
        con.print(f"[bold]passes[/] {_fmt_counts(pass_counts)}"
                  + (f"; Q/DQ plan: {len(plan.activations)} activations ({len(plan.unsigned)} unsigned), "
                     f"{len(plan.weights)} weights" if cfg.static_int8 else ""))
        stats, alphas, methods, scales, sens = {}, {}, {}, Scales({}, {}), None
        decisions = WeightDecisions()
        calibrated = fp32  # the FP32 graph that was calibrated: after SmoothQuant, the smoothed one
        seven_bit_ops = (ORT_SATURATING_OPS if cfg.static_int8 and cfg.target == "ort-cpu" and not runtime.has_vnni()
                         else ())
        if cfg.static_int8:
            with timer.stage("calibration"):
                if cfg.calib_cache is not None:
                    scales = calib_cache.read_trt_cache(cfg.calib_cache)
                else:
                    def calibrate(model, description="calibrating"):
                        rows = search.wants_rows(graph, plan.activations, policy.keep_float) if searching else []
                        if cfg.executor == "ray":
                            return collect_on_ray(model, plan.activations, calib_set.groups(calib_idx, cfg.batch_size),
                                                  partial(_open_data, cfg, specs, False), rows, cfg.workers,
                                                  cfg.ray_address, f"{description} on Ray")
                        samples = {n: RowSample(n) for n in rows}
                        return collect(model, plan.activations, calib_set.batches(calib_idx, cfg.batch_size),
                                       total=total, description=description, samples=samples), samples

                    total = calib_data.batch_count(calib_set, calib_idx, cfg.batch_size)
                    searching = cfg.smoothquant_auto or cfg.calib_method == "auto"
                    stats, samples = calibrate(fp32)
                    alphas = search.alphas_for(graph, stats, samples, cfg.smoothquant, cfg.calib_method,
                                               cfg.percentile, pinned.smoothquant,
                                               policy.keep_float | frozenset(plan.skipped))
                    smooth = {name: c.value for name, c in alphas.items() if c.value is not None}
                    pass_counts["smooth_quant"] = 0
                    if smooth:  # smooth, then calibrate the smoothed activations
                        pass_counts["smooth_quant"] = smooth_quant(graph, stats, smooth, frozenset(plan.skipped))
                        plan = plan_qdq(graph, policy)
                        searching = cfg.calib_method == "auto"
                        calibrated = _export(graph, original)
                        stats, samples = calibrate(calibrated, "calibrating (smoothed)")
                    methods = search.methods_for(graph, stats, samples, cfg.calib_method, cfg.percentile,
                                                 {_smoothed(n, smooth): m for n, m in pinned.method.items()},
                                                 policy.keep_float)
                    scales = scales_for(stats, {n: c.value for n, c in methods.items()}, cfg.percentile,
                                        frozenset(plan.unsigned))
            if cfg.weight_rounding != "nearest" or cfg.bias_correction != "none":
                with timer.stage("weights"):
                    data = calib_set.batches(calib_idx, cfg.batch_size) if calib_set is not None else None
                    nodes = _quantized_nodes(graph, plan)
                    means = input_means(graph, [n.inputs[0].name for n in graph.nodes if n.name in set(nodes)],
                                        ctx.normals) if cfg.bias_correction == "analytic" else {}
                    decisions = decide_weights(graph, calibrated, nodes, data, scales.amax,
                                               cfg.weight_rounding, cfg.bias_correction,
                                               {op: 63.0 for op in seven_bit_ops}, means,
                                               calib_data.batch_count(calib_set, calib_idx, cfg.batch_size)
                                               if calib_set is not None else None, ctx.log, frozenset(plan.unsigned))
            if cfg.accuracy_budget is not None:
                with timer.stage("sensitivity"):
                    feeds = list(calib_set.batches(calib_idx[:SENSITIVITY_SAMPLES], cfg.batch_size))
                    sens = sensitivity.analyse(
                        calibrated, sensitivity.linear_layers(graph, _quantized_nodes(graph, plan)),
                        lambda keep: _quantized(calibrated, replace(policy, keep_float=policy.keep_float | keep),
                                                scales.amax, seven_bit_ops, decisions),
                        feeds, cfg.accuracy_budget,
                        ray_map(cfg.workers, cfg.ray_address) if cfg.executor == "ray" else None)
                    policy = replace(policy, keep_float=policy.keep_float | sens.keep_float)
                    plan = plan_qdq(graph, policy)
            if cfg.bias_correction == "sequential":  # on the final precision mix
                with timer.stage("sequential bias correction"):
                    start = time.perf_counter()
                    feeds = list(calib_set.batches(calib_idx[:SEQUENTIAL_SAMPLES], cfg.batch_size))
                    decisions.biases = correct_sequentially(
                        calibrated, _quantized(calibrated, policy, scales.amax, seven_bit_ops, decisions),
                        _quantized_nodes(graph, plan), feeds, decisions.biases)
                    decisions.seconds["sequential"] = round(time.perf_counter() - start, 3)
        layers = sensitivity.linear_layers(graph, [n.name for n in graph.nodes if n.op in QUANTIZED_OPS])
        for layer in layers:
            layer.precision = "float" if layer.node in plan.skipped or not cfg.static_int8 else "int8"
            if sens is not None:
                layer.error = next((x.error for x in sens.layers if x.node == layer.node), None)
        n_quantized = 0
        kv_amax = {}
        if cfg.kv_cache == "int8":
            with timer.stage("kv-cache calibration"):
                kv_amax = head_absmax(fp32, [present.name for _, present in cache_pairs(graph)],
                                      calib_set.batches(calib_idx, cfg.batch_size))
        with timer.stage("quantize" if cfg.int8 else "convert"):
            model = fp32
            if cfg.static_int8:
                quant_layers, quant_acts = _decisions(layers, plan, alphas, methods, scales)
                n_quantized = insert_qdq(graph, plan, scales.amax, seven_bit_ops,  # fp32 was exported: reuse graph
                                         decisions.weights, decisions.biases)
                calib_cache.write_trt_cache(_used(scales, plan.activations), out.cache)
                quant_config.write(out.quant_config, quant_layers, quant_acts)
            if kv_amax:
                pass_counts["kv_cache"] = quantize_kv_cache(graph, kv_amax)
            if cfg.weight_only is not None:
                if cfg.fp16:  # first: graphsurgeon cannot re-import the packed INT4 model
                    pass_counts["convert_fp16"] = convert_fp16(graph, PassContext(opset=_opset(fp32)))
                model = _weight_only(graph, fp32, cfg, pass_counts, ctx)
            elif cfg.static_int8:
                model = _export(graph, fp32, min_opset=FP16_QDQ_OPSET if cfg.fp16 else MIN_QDQ_OPSET)
            if cfg.fp16 and cfg.weight_only is None:
                model = _fp16(model, pass_counts)
            onnx_io.save_model(fp32, out.fp32)
            if out.qdq != out.fp32:
                onnx_io.save_model(model, out.qdq)
        comparison, fp32_rel_err = None, None
        if eval_set is not None and eval_idx:
            with timer.stage("verify"):
                feeds = next(iter(eval_set.batches(eval_idx[: cfg.batch_size], cfg.batch_size)))
                fp32_rel_err = verify.max_relative_error(original, fp32, feeds)
                comparison = verify.compare_with_fp32(original, model, eval_set.batches(eval_idx, cfg.batch_size),
                                                      eval_set.labels(eval_idx))
        plugins = None
        if cfg.plugin_ops:
            with timer.stage("plugin ops"):
                check = next(iter(eval_set.batches(eval_idx[: cfg.batch_size], cfg.batch_size))) \
                    if eval_set is not None and eval_idx else None
                plugins = _plugin_ops(model, out.plugin_onnx, final.plugin_onnx, check)
        with timer.stage("engine"):
            engine = _engine(cfg, final, out, fp32, calib_set if calib_set is not None else eval_set, plugins)
        rep = report.make(cfg=cfg, artefacts=final, pass_counts=pass_counts, fusions=fusions, pass_log=ctx.log,
                          plan=plan, scales=scales, stats=stats,
                          n_quantized=n_quantized, seven_bit_ops=seven_bit_ops, comparison=comparison,
                          fp32_rel_err=fp32_rel_err, engine=engine, layers=layers, sensitivity=sens,
                          timings=timer.stages, peak_rss_mb=_peak_rss_mb(), stage_peak_rss_mb=timer.peak_rss_mb,
                          eval_source=_eval_source(cfg, eval_set, eval_idx),
                          weight_decisions=decisions.summary(cfg.weight_rounding, cfg.bias_correction)
                          if decisions.layers else None)
        report.write(rep, stats, scales, out)
    report.print_summary(rep, con)
    if cfg.backend == "tensorrt" and not rep["engine"]["built"]:
        raise TrtglmError(f"--backend tensorrt: no engine: {rep['engine']['missing']}; still wrote and verified "
                          f"{final.qdq} on ONNX Runtime, with the report in {final.directory}")
    if cfg.check_tol is not None:
        report.check_tolerance(rep, cfg.check_tol)
    return rep


def _at_opset(model: onnx.ModelProto, opset: int, why: str) -> onnx.ModelProto:
    if _opset(model) >= opset:
        return model
    try:
        return onnx_io.infer_shapes(onnx.version_converter.convert_version(model, opset))
    except Exception as e:  # the converter raises RuntimeError and others for ops it cannot adapt
        raise ModelError(f"model opset {_opset(model)}: {why} needs opset {opset} and ONNX's version converter "
                         f"failed ({str(e).strip().splitlines()[-1]}); re-export at opset >= {opset}") from e


def _weight_only(graph: gs.Graph, fp32: onnx.ModelProto, cfg: BuildConfig, pass_counts: dict,
                 ctx: PassContext) -> onnx.ModelProto:
    bits = 4 if cfg.weight_only == "int4" else 8
    pass_counts["weight_only"] = weight_only(graph, bits, cfg.block_size, cfg.asymmetric,
                                             keep_float=frozenset(cfg.exclude), log=ctx.log)
    model = model_from_graph(graph)  # packed INT4 initializers (graphsurgeon cannot write them)
    model.ir_version = max(model.ir_version, fp32.ir_version)
    del model.metadata_props[:]
    model.metadata_props.extend(fp32.metadata_props)
    model.producer_name, model.producer_version = "trtglm", _version()
    return model


def _fp16(model: onnx.ModelProto, pass_counts: dict) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    pass_counts["convert_fp16"] = convert_fp16(graph, PassContext(opset=_opset(model)))
    return _export(graph, model)


def _quant_config(cfg: BuildConfig, graph: gs.Graph) -> quant_config.QuantConfig:
    if cfg.quant_config is None:
        return quant_config.QuantConfig()
    return quant_config.read(cfg.quant_config, {n.name for n in graph.nodes}, set(graph.tensors()))


def _smoothed(name: str, smooth: dict) -> str:
    """The tensor the layers read after SmoothQuant (passes/smooth_quant names it so)."""
    return f"{name}_smoothed" if name in smooth else name


def _quantized_nodes(graph: gs.Graph, plan: QdqPlan) -> list[str]:
    return [n.name for n in graph.nodes if n.op in QUANTIZED_OPS and n.name not in plan.skipped]


def _quantized(fp32: onnx.ModelProto, policy, amax: dict, seven_bit_ops,
               decisions: WeightDecisions) -> onnx.ModelProto:
    """The INT8 model of `fp32` under `policy` (sensitivity analysis builds one per candidate)."""
    graph = gs.import_onnx(fp32)
    insert_qdq(graph, plan_qdq(graph, policy), amax, seven_bit_ops, decisions.weights, decisions.biases)
    return _export(graph, fp32, min_opset=MIN_QDQ_OPSET)


def _decisions(layers, plan: QdqPlan, alphas: dict, methods: dict, scales: Scales) -> tuple[list, list]:
    """The quant_config.json entries: every linear layer, and every calibrated activation under its original
    (unsmoothed) name."""
    rows = []
    for layer in layers:
        row = {"node": layer.node, "op": layer.op, "precision": layer.precision, "macs": layer.macs}
        if layer.error is not None:
            row["sensitivity"] = round(layer.error, 6)
        if layer.node in plan.skipped:
            row["why"] = plan.skipped[layer.node]
        rows.append(row)
    acts = []
    origin = {f"{n}_smoothed": n for n in alphas}
    for name in plan.activations:
        if name not in scales.amax:
            continue
        original = origin.get(name, name)
        row = {"tensor": original, "smoothquant": alphas[original].value if original in alphas else None,
               "method": scales.method[name], "amax": float(scales.amax[name])}
        for key, choices, what in (("alpha_errors", alphas, original), ("method_errors", methods, name)):
            if what in choices and choices[what].errors:  # the search's relative output error per candidate
                row[key] = {("none" if k is None else str(k)): float(f"{v:.4g}")
                            for k, v in choices[what].errors.items()}
        acts.append(row)
    return rows, acts


def _check_not_quantized(model: onnx.ModelProto, path: Path) -> None:
    node = next((n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")), None)
    if node is not None:
        raise ModelError(f"model {path}: already quantized ({node.op_type} node '{node.name}'); "
                         "give trtglm the FP32 model")


def _open_data(cfg: BuildConfig, specs, check: bool = True):
    if cfg.calib_cache is not None:
        if not cfg.calib_cache.is_file():
            raise ConfigError(f"--calib-cache {cfg.calib_cache}: file not found")
        return None
    if not cfg.static_int8 and cfg.calib is None and cfg.calib_script is None:
        return None
    return _dataset(cfg, cfg.calib, specs, "calibration", check)


def _dataset(cfg: BuildConfig, path: Path | None, specs, what: str, check: bool = True):
    if cfg.tokenizer is not None and path is not None:
        return open_text_dataset(path, cfg.tokenizer, cfg.max_seq, specs, what)
    return calib_data.open_dataset(path, specs, preprocess=cfg.preprocess,
                                   script=cfg.calib_script if what == "calibration" else None, what=what, check=check)


def _eval_split(cfg: BuildConfig, specs, calib_set):
    """Evaluation data: --eval, else a held-out split of the calibration data the calibrator never sees."""
    if cfg.eval is not None:
        eval_set = _dataset(cfg, cfg.eval, specs, "evaluation")
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


def _engine(cfg: BuildConfig, final: Artefacts, out: Artefacts, fp32: onnx.ModelProto, data,
            plugin_ops: dict | None = None) -> dict:
    """Build the TensorRT engine when TensorRT and a GPU are here (--backend auto|tensorrt); either way record the
    trtexec and polygraphy command lines that build or cross-check it on a GPU node. With --plugin-ops the engine
    is built from the plugin graph, with the plugins given, else trtglm's AOT plugins (embedded in the engine)."""
    profiles = _engine_profiles(cfg, fp32, data)
    opts, engine_file = cfg.engine, final.directory / "model.engine"
    source, staged = (final.plugin_onnx, out.plugin_onnx) if plugin_ops else (final.qdq, out.qdq)
    plugins = opts.plugins or ((Path(AOT_PLUGINS),) if plugin_ops else ())
    commands = {"trtexec": trtexec_command(source, engine_file, profiles, opts.opt_level, opts.workspace_mb,
                                           opts.timing_cache, plugins, opts.implicit_cache),
                "polygraphy": polygraphy_command(source, final.directory / "model.polygraphy.engine", profiles,
                                                 plugins, opts.implicit_cache)}
    extra = {"plugin_ops": plugin_ops} if plugin_ops else {}
    available, reason = tensorrt_status() if cfg.backend != "onnxruntime" else (False, "--backend onnxruntime")
    if not available:
        return {"built": False, "reason": f"{reason}; the ONNX was verified on the embedded ONNX Runtime backend",
                "missing": reason, "profiles": _plain_profiles(profiles), **commands, **extra}
    sidecar = build_engine(staged, out.directory / "model.engine", profiles, opts.opt_level, opts.workspace_mb,
                           opts.timing_cache, plugins, opts.implicit_cache, recorded_as=(source, engine_file))
    return {"built": True, "path": str(engine_file), "sidecar": sidecar, **commands, **extra}


def _plugin_ops(model: onnx.ModelProto, staged: Path, final: Path, feeds: dict | None) -> dict:
    """The model with trtglm's plugin ops, written beside the Q/DQ ONNX, and checked on ONNX Runtime through its
    ONNX-level fallback (each plugin op rewritten back to standard ops): the surgery must not change the outputs."""
    opset = _opset(model)
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=opset)
    count = to_plugin_ops(graph, ctx)
    plugin_model = gs.export_onnx(graph)
    onnx_io.save_model(plugin_model, staged)
    fallback_graph = gs.import_onnx(plugin_model)
    from_plugin_ops(fallback_graph, PassContext(opset=opset))
    fallback = gs.export_onnx(fallback_graph)
    err = verify.max_relative_error(model, fallback, feeds) if feeds is not None else None
    kinds = Counter(n.op_type for n in plugin_model.graph.node if n.domain == PLUGIN_DOMAIN)
    return {"path": str(final), "ops": dict(sorted(kinds.items())), "rewrites": count,
            "fallback_max_rel_err": err, "log": [line for line in ctx.log if line.startswith("to_plugin_ops")]}


def _engine_profiles(cfg: BuildConfig, fp32: onnx.ModelProto, data) -> list:
    """--shapes, else --batch, else the profiles of the model's manifest (trtglm export writes one beside it), else
    one profile from the data: batch 1 to --batch-size, the data's other dims. Checked against the model."""
    example = _example_shapes(data)
    if cfg.profiles:
        found = list(cfg.profiles)
    elif cfg.batch_profile is not None:
        found = [profiles.batch_profile(fp32, cfg.batch_profile, example)]
    elif profiles.manifest_path(cfg.model).is_file():
        return profiles.read_manifest(profiles.manifest_path(cfg.model)).profiles
    elif example is None or not _dynamic(fp32):
        return []
    else:
        found = [profiles.batch_profile(fp32, f"1:{cfg.batch_size}:{cfg.batch_size}", example)]
    profiles.check_profiles(fp32, found)
    return found


def _example_shapes(data) -> dict[str, tuple[int, ...]] | None:
    if data is None or not len(data):
        return None
    sample = next(iter(data.batches(range(1), 1)))
    return {name: tuple(int(d) for d in np.asarray(array).shape) for name, array in sample.items()}


def _dynamic(model: onnx.ModelProto) -> bool:
    return any(dims is None or not all(isinstance(d, int) for d in dims)
               for dims in profiles.model_inputs(model).values())


def _plain_profiles(found: list) -> list:
    return [{name: {"min": p.min, "opt": p.opt, "max": p.max} for name, p in profile.items()} for profile in found]


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _version() -> str:
    from trtglm import __version__

    return __version__


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
