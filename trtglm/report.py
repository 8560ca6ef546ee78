"""The build report: report.json for machines, report.md with histogram plots for people, a console table."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trtglm import __version__, runtime
from trtglm.onnx_io import file_sha256
from trtglm.calib.stats import NUM_BINS
from trtglm.errors import AccuracyError
from trtglm.sensitivity import int8_mac_fraction

WORST_TENSORS = 4
FIGURE_TARGETS = {
    "sim": "what TensorRT computes (Q/DQ executed literally; applies to --target tensorrt)",
    "ort": "ONNX Runtime CPU on this machine with its INT8 kernels (applies to --target ort-cpu)",
}
TARGET_FIGURE = {"tensorrt": "sim", "ort-cpu": "ort"}


def console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def make(*, cfg, artefacts, pass_counts, fusions, pass_log, plan, scales, stats, n_quantized, seven_bit_ops, comparison, fp32_rel_err,
         engine, layers, sensitivity, timings, peak_rss_mb, stage_peak_rss_mb, eval_source,
         weight_decisions=None) -> dict:
    tensors = {}
    for name in sorted(scales.amax):
        row = {"amax": float(scales.amax[name]), "method": scales.method.get(name, "")}
        if name in stats:
            row["absmax"] = float(stats[name].absmax)
            row["sqnr_db"] = round(sqnr_db(stats[name], scales.amax[name]), 2)
        tensors[name] = row
    return {
        "trtglm_version": __version__,
        "model": {"path": str(cfg.model), "sha256": file_sha256(cfg.model)},
        "config": {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)},
        "target": cfg.target,
        "cpu": {"name": runtime.cpu_name(), "vnni": runtime.has_vnni()},
        "weights": _weights_text(seven_bit_ops),
        "passes": pass_counts,
        "fusions": fusions,
        "pass_log": pass_log,
        "quantization": {"tensors_quantized": n_quantized, "activations": len(plan.activations),
                         "weights": len(plan.weights), "residual_adds": plan.residual_adds,
                         "unsigned_activations": plan.unsigned,
                         "signed_non_negative": dict(sorted(plan.signed.items())),
                         "linear_layers": len(layers),
                         "int8_linear_layers": sum(layer.precision == "int8" for layer in layers),
                         "int8_mac_fraction": round(int8_mac_fraction(layers), 4),
                         "methods": dict(sorted(Counter(scales.method.values()).items())),
                         "smoothed_activations": pass_counts.get("smooth_quant", 0),
                         "kept_float": dict(sorted(plan.skipped.items())),
                         "weight_decisions": weight_decisions},
        "sensitivity": None if sensitivity is None else {
            "budget": sensitivity.budget, "samples": sensitivity.samples,
            "full_int8_error": sensitivity.full_int8_error, "chosen_error": sensitivity.error,
            "metric": "1 - mean cosine of the outputs vs FP32 on calibration samples (ORT, Q/DQ computed literally)",
            "layers": [{"node": x.node, "op": x.op, "macs": x.macs, "error": x.error, "precision": x.precision}
                       for x in sensitivity.layers]},
        "tensors": tensors,
        "accuracy": None if comparison is None else {
            "eval": eval_source, "samples": comparison.samples, "fp32_optimized_max_rel_err": fp32_rel_err,
            "figures": FIGURE_TARGETS, "target_figure": TARGET_FIGURE[cfg.target], "outputs": comparison.outputs},
        "engine": engine,
        "timings_s": timings,
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_mb_after_stage": stage_peak_rss_mb,
        "artefacts": {k: str(v) for k, v in asdict(artefacts).items()},
    }


def _weights_text(seven_bit_ops: tuple[str, ...]) -> str:
    if not seven_bit_ops:
        return "8-bit"
    return (f"8-bit, 7-bit for {'/'.join(seven_bit_ops)} (ONNX Runtime's u8*s8 kernels saturate int16 sums "
            "on this CPU without VNNI)")


def sqnr_db(stats, amax: float) -> float:
    """Signal-to-quantization-noise ratio of symmetric int8 with range amax, estimated from the histogram."""
    width = stats.hist_range / NUM_BINS
    centers = (np.arange(NUM_BINS) + 0.5) * width
    counts = stats.hist.astype(np.float64)
    signal = float((counts * centers**2).sum())
    step = amax / 127.0
    noise = np.where(centers <= amax, step**2 / 12.0, (centers - amax) ** 2)
    total_noise = float((counts * noise).sum())
    if signal <= 0:
        return math.inf
    return 10.0 * math.log10(signal / max(total_noise, 1e-300))


def write(rep: dict, stats: dict, scales, out) -> None:
    """Write report.json, report.md and the plots into the staging artefacts `out`."""
    worst = sorted((r["sqnr_db"], n) for n, r in rep["tensors"].items() if "sqnr_db" in r)[:WORST_TENSORS]
    plots = {}
    if worst:
        out.plots.mkdir(parents=True, exist_ok=True)
        for _, name in worst:
            path = out.plots / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
            _plot_histogram(stats[name], scales.amax[name], name, path)
            plots[name] = path.name
    if rep["sensitivity"] is not None:
        out.plots.mkdir(parents=True, exist_ok=True)
        _plot_sensitivity(rep["sensitivity"], out.plots / "sensitivity.png")
        plots["sensitivity"] = "sensitivity.png"
    out.report_json.write_text(json.dumps(rep, indent=2, sort_keys=False, default=_plain) + "\n")
    out.report_md.write_text(_markdown(rep, worst, plots, Path(out.plots).name))


def check_tolerance(rep: dict, tol: float) -> None:
    """--check-tol in points: top-1 loss for classifier outputs, 100 * (1 - cosine) for the others,
    measured on the figure that applies to the build's target."""
    acc = rep.get("accuracy")
    if acc is None:
        raise AccuracyError("--check-tol: no evaluation data, so accuracy could not be checked (give --eval DIR)")
    fig = acc["target_figure"]
    for name, row in acc["outputs"].items():
        loss, what = _loss_points(row, fig)
        if loss > tol:
            raise AccuracyError(f"output '{name}': INT8 ({fig}) loses {loss:.2f} points of {what}, "
                                f"more than --check-tol {tol}")


def _loss_points(row: dict, fig: str) -> tuple[float, str]:
    if "top1_accuracy" in row[fig]:
        return row["fp32"]["top1_accuracy"] - row[fig]["top1_accuracy"], "top-1 accuracy"
    if "top1_agreement" in row[fig]:
        return 100.0 - row[fig]["top1_agreement"], "top-1 agreement with FP32"
    return 100.0 * (1.0 - row[fig]["cosine"]), "cosine similarity (x100)"


def print_summary(rep: dict, con: Console) -> None:
    acc = rep["accuracy"]
    if acc is not None:
        table = Table(title=f"FP32 vs INT8 on {acc['samples']} samples ({acc['eval']})")
        for col in ("output", "metric", "FP32", "INT8 sim", "INT8 ort"):
            table.add_column(col, justify="left" if col in ("output", "metric") else "right")
        for name, row in acc["outputs"].items():
            for metric, label, fmt in _METRICS:
                if metric not in row["sim"]:
                    continue
                fp32 = row["fp32"].get(metric)
                table.add_row(name, label, "" if fp32 is None else fmt(fp32), fmt(row["sim"][metric]),
                              fmt(row["ort"][metric]))
        Console(file=sys.stdout, highlight=False).print(table)
        for fig, text in acc["figures"].items():
            mark = " <- this build's target" if fig == acc["target_figure"] else ""
            con.print(f"  {fig}: {text}{mark}")
    else:
        con.print("no evaluation data: accuracy not measured")
    wd = rep["quantization"].get("weight_decisions")
    if wd:
        ratio = wd["output_error_vs_nearest"]
        con.print(f"weights: {wd['weight_rounding']} rounding on {wd['layers']} layers"
                  + (f" (their output error {ratio:.2f}x nearest rounding's, {wd['rows_improved']} rows changed)"
                     if ratio is not None else "")
                  + f"; bias correction {wd['bias_correction']} on {wd['biases_corrected']} layers; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in wd["seconds"].items()))
    eng = rep["engine"]
    con.print("TensorRT engine: " + ("built" if eng["built"] else f"not built: {escape(eng['reason'])}"))
    if eng.get("plugin_ops"):
        ops = eng["plugin_ops"]
        err = ops["fallback_max_rel_err"]
        con.print(f"plugin ops: {', '.join(f'{n} {k}' for k, n in ops['ops'].items()) or 'none matched'} in "
                  f"{escape(ops['path'])}" + (f" (its ONNX fallback vs the Q/DQ model on ONNX Runtime: max rel err "
                                              f"{err:.1e})" if err is not None else ""))
    con.print(f"CPU: {rep['cpu']['name']} (VNNI: {'yes' if rep['cpu']['vnni'] else 'no'}); "
              f"weights {rep['weights']}; peak memory {rep['peak_rss_mb']} MB")
    con.print(f"wrote {rep['artefacts']['qdq']} and the report in {rep['artefacts']['directory']}")


_METRICS = (
    ("top1_accuracy", "top-1 accuracy %", lambda v: f"{v:.2f}"),
    ("top1_agreement", "top-1 agreement %", lambda v: f"{v:.2f}"),
    ("top5_agreement", "top-5 agreement %", lambda v: f"{v:.2f}"),
    ("cosine", "cosine", lambda v: f"{v:.5f}"),
    ("max_abs_err", "max abs err", lambda v: f"{v:.4g}"),
    ("mean_abs_err", "mean abs err", lambda v: f"{v:.4g}"),
)


def _markdown(rep: dict, worst, plots: dict, plots_dir: str) -> str:
    lines = [f"# trtglm build report: {Path(rep['model']['path']).name}", "",
             f"- target: `{rep['target']}`; weights per channel, {rep['weights']}; activations per tensor, 8-bit",
             f"- CPU: {rep['cpu']['name']} (VNNI: {'yes' if rep['cpu']['vnni'] else 'no'})",
             f"- TensorRT engine: {'built' if rep['engine']['built'] else 'not built: ' + rep['engine']['reason']}",
             f"- on a GPU node, build it with `{rep['engine']['trtexec']}`",
             f"- and cross-check TensorRT against ONNX Runtime with `{rep['engine']['polygraphy']}`",
             f"- passes: {', '.join(f'{k} {v}' for k, v in rep['passes'].items())}",
             f"- blocks in the optimized graph: {', '.join(f'{k} {v}' for k, v in rep['fusions'].items())}",
             f"- quantized tensors: {rep['quantization']['tensors_quantized']} "
             f"({rep['quantization']['activations']} activations, {rep['quantization']['weights']} weights)",
             f"- linear layers in INT8: {rep['quantization']['int8_linear_layers']} of "
             f"{rep['quantization']['linear_layers']}, {100 * rep['quantization']['int8_mac_fraction']:.1f}% of their "
             f"multiply-accumulates; SmoothQuant on {rep['quantization']['smoothed_activations']} activations; "
             f"calibration methods {rep['quantization']['methods']}",
             f"- peak memory {rep['peak_rss_mb']} MB; stage times (s): "
             + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items()), ""]
    acc = rep["accuracy"]
    if acc is not None:
        lines += [f"## Accuracy ({acc['samples']} samples: {acc['eval']})", "",
                  "| output | metric | FP32 | INT8 sim | INT8 ort |", "|---|---|---:|---:|---:|"]
        for name, row in acc["outputs"].items():
            for metric, label, fmt in _METRICS:
                if metric in row["sim"]:
                    fp32 = row["fp32"].get(metric)
                    lines.append(f"| {name} | {label} | {'' if fp32 is None else fmt(fp32)} | "
                                 f"{fmt(row['sim'][metric])} | {fmt(row['ort'][metric])} |")
        lines += [""] + [f"- `{f}`: {t}" for f, t in acc["figures"].items()]
        if acc["fp32_optimized_max_rel_err"] is not None:
            lines.append(f"- optimized FP32 vs original: max relative error {acc['fp32_optimized_max_rel_err']:.2e}")
        lines.append("")
    sens = rep["sensitivity"]
    if sens is not None:
        lines += [f"## Sensitivity (accuracy budget {sens['budget']})", "",
                  f"Metric: {sens['metric']}, {sens['samples']} samples. All linear layers INT8: "
                  f"{sens['full_int8_error']:.5f}; chosen mix: {sens['chosen_error']:.5f}.", "",
                  f"![sensitivity]({plots_dir}/{plots['sensitivity']})", "",
                  "| layer | op | MACs | error with only this layer INT8 | precision |", "|---|---|---:|---:|---|"]
        for x in sorted(sens["layers"], key=lambda x: -(x["error"] or 0.0)):
            lines.append(f"| {x['node']} | {x['op']} | {x['macs']} | {x['error']:.3g} | {x['precision']} |")
        lines.append("")
    if worst:
        lines += ["## Tensors with the lowest SQNR", "", "| tensor | method | amax | absmax | SQNR dB |",
                  "|---|---|---:|---:|---:|"]
        for _, name in worst:
            t = rep["tensors"][name]
            lines.append(f"| {name} | {t['method']} | {t['amax']:.4g} | {t['absmax']:.4g} | {t['sqnr_db']:.1f} |")
        lines.append("")
        lines += [f"![{name}]({plots_dir}/{plots[name]})" for _, name in worst]
        lines.append("")
    return "\n".join(lines)


def _plot_histogram(stats, amax: float, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = 8  # 256 drawn bins read as well as 2048 and draw 8x faster
    width = stats.hist_range / NUM_BINS * group
    counts = stats.hist.reshape(-1, group).sum(axis=1)
    last = max(int(np.nonzero(counts)[0].max(initial=0)) + 1, 1)
    edges = np.arange(last + 1) * width
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.stairs(np.maximum(counts[:last], 0.8), edges, fill=True, color="#4477aa", baseline=0.8)  # one patch
    ax.set_yscale("log")
    ax.axvline(amax, color="#cc3311", label=f"amax {amax:.3g}")
    ax.axvline(stats.absmax, color="#999999", linestyle="--", label=f"absmax {stats.absmax:.3g}")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(f"|x| (nonzero; {stats.zeros} exact zeros not shown)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _plot_sensitivity(sens: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sens["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(layers)), 3.5), dpi=100)
    colors = ["#cc3311" if x["precision"] == "float" else "#4477aa" for x in layers]
    ax.bar(range(len(layers)), [max(x["error"] or 0.0, 1e-9) for x in layers], color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [_short(x["node"]) for x in layers], rotation=90, fontsize=6)
    ax.set_ylabel("1 - cosine, this layer alone INT8")
    ax.set_title(f"layer sensitivity (red: kept in float for budget {sens['budget']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _short(name: str, keep: int = 28) -> str:
    return name if len(name) <= keep else "..." + name[-keep + 3:]




def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value
