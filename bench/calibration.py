"""INT8 calibration benchmark: trtglm against NVIDIA ModelOpt's ONNX PTQ and ONNX Runtime's quantize_static.

One run, one model, one data set: every tool calibrates on the same calibration samples, and the bench itself
evaluates every tool's Q/DQ ONNX the same way on the same held-out samples. Each tool runs in its own child process
so that its peak memory (ru_maxrss of that child, from os.wait4) is its own.

    bash bench/setup.sh && .venv-bench/bin/python bench/calibration.py

Columns and caveats: bench/README.md. Results: bench/results/calibration.{json,md}.
The same script is its own worker: `calibration.py --worker modelopt-entropy ...` runs one peer's quantization.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import (
    REPO,
    SEED,
    cpu_info,
    fmt,
    peak_rss_mb,
    qdq_summary,
    run_child,
    session,
    trtglm_exe,
    trtglm_stage_times,
    versions,
    warm_imports,
    yes_no,
)


@dataclass(frozen=True)
class Tool:
    name: str      # row label and worker name
    family: str    # trtglm | modelopt | ort
    method: str    # the tool's own name for its calibration method
    settings: str  # what a reader needs to reproduce the row


TOOLS = (
    Tool("trtglm", "trtglm", "auto", "trtglm build (defaults: --calib-method auto, --smoothquant auto)"),
    Tool("trtglm-entropy", "trtglm", "entropy", "trtglm build --calib-method entropy"),
    Tool("trtglm-minmax", "trtglm", "minmax", "trtglm build --calib-method minmax"),
    Tool("trtglm-percentile", "trtglm", "percentile", "trtglm build --calib-method percentile --percentile {p}"),
    Tool("modelopt-entropy", "modelopt", "entropy",
         "quantize(quantize_mode='int8', calibration_method='entropy', calibration_eps=['cpu'], "
         "high_precision_dtype='fp32')"),
    Tool("modelopt-max", "modelopt", "max", "as modelopt-entropy, calibration_method='max'"),
    Tool("ort-minmax", "ort", "MinMax", "quant_pre_process + quantize_static(QDQ, per_channel=True, "
         "activation_type=QInt8, weight_type=QInt8, CalibrationMethod.MinMax)"),
    Tool("ort-percentile", "ort", "Percentile", "as ort-minmax, CalibrationMethod.Percentile, CalibPercentile={p}"),
    Tool("ort-minmax-trt", "ort", "MinMax", "as ort-minmax, extra_options ActivationSymmetric=True, "
         "QuantizeBias=False (zero points 0 and float biases, as TensorRT requires)"),
    Tool("ort-u8", "ort", "MinMax", "quant_pre_process + quantize_static defaults (QDQ, per-tensor, MinMax) "
         "with activation_type=QUInt8"),
)
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
TRTGLM_ROW = "trtglm"
WALL_PEER = "modelopt-entropy"


# ----------------------------------------------------------------------------------------------- data helpers
def _model_input(model_path: Path) -> tuple[str, list, int]:
    """(name, dims with None for symbolic axes, numpy dtype code) of the model's only graph input."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        sys.exit(f"{model_path}: the bench handles single-input classifiers; this model has inputs "
                 f"{[i.name for i in inputs]}")
    tensor_type = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return inputs[0].name, dims, tensor_type.elem_type


def load_inputs(data_dir: Path, model_path: Path) -> np.ndarray:
    """DIR/<input name>.npy (or the directory's only non-label .npy), cast to the model's input type."""
    import onnx

    name, dims, elem_type = _model_input(model_path)
    path = data_dir / f"{name}.npy"
    if not path.exists():
        candidates = sorted(p for p in data_dir.glob("*.npy") if p.name != "labels.npy")
        if len(candidates) != 1:
            sys.exit(f"{data_dir}: expected {name}.npy (the model's input name) or a single non-label .npy file")
        path = candidates[0]
    data = np.load(path)
    if data.ndim != len(dims):
        sys.exit(f"{path}: shape {data.shape}, model input '{name}' has rank {len(dims)} {dims}")
    return np.ascontiguousarray(data.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type), copy=False))


def batches(data: np.ndarray, batch_size: int):
    for start in range(0, len(data), batch_size):
        yield data[start:start + batch_size]


# ----------------------------------------------------------------------------------------------- workers
def _worker_modelopt(tool: Tool, args) -> dict:
    from modelopt.onnx.quantization import quantize

    name, dims, _ = _model_input(args.model)
    calib = load_inputs(args.calib_dir, args.model)
    # ModelOpt splits the data into steps of the model's batch size, a symbolic batch counting as 1: give it
    # the same batch size as the other tools, so that it runs the same number of samples per step.
    step = [args.batch_size if dims[0] is None else dims[0]] + list(calib.shape[1:])
    # ModelOpt writes its intermediate models beside the input model: work on a copy in the scratch dir.
    model_copy = args.out.parent / "model.onnx"
    shutil.copy(args.model, model_copy)
    start = time.perf_counter()
    quantize(
        str(model_copy),
        quantize_mode="int8",
        calibration_data={name: calib},
        calibration_method=tool.method,
        calibration_shapes=f"{name}:{'x'.join(map(str, step))}",
        calibration_eps=["cpu"],          # default ['cpu', 'cuda:0', 'trt']
        high_precision_dtype="fp32",      # default 'fp16' converts the float parts of the model to FP16
        output_path=str(args.out),
        log_level="INFO",
    )
    return {"quantize_s": time.perf_counter() - start, "quantize_peak_rss_mb": peak_rss_mb(), "calib_batch": step[0],
            "calib_samples_used": len(calib)}


def _worker_ort(tool: Tool, args) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    name, _, _ = _model_input(args.model)
    calib = load_inputs(args.calib_dir, args.model)
    # ORT's histogram calibrators (Percentile, Entropy) stack the batches with np.asarray and fail on a short last
    # batch: every ORT row gets equal batches, the largest that divide the sample count (300 -> 30), or else
    # batches of --batch-size without the short tail.
    step = max(b for b in range(1, args.batch_size + 1) if len(calib) % b == 0)
    if step < args.batch_size // 2:
        step = args.batch_size
        calib = calib[: len(calib) - len(calib) % step]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches(calib, step))

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {name: batch}

    if tool.name == "ort-u8":
        kwargs = {"activation_type": QuantType.QUInt8}
    else:
        kwargs = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QInt8,
                  "weight_type": QuantType.QInt8, "calibrate_method": getattr(CalibrationMethod, tool.method)}
        extra = {}
        if tool.method == "Percentile":
            extra["CalibPercentile"] = args.percentile
        if tool.name.endswith("-trt"):
            extra.update(ActivationSymmetric=True, QuantizeBias=False)
        if extra:
            kwargs["extra_options"] = extra
    pre = args.out.parent / "preprocessed.onnx"
    start = time.perf_counter()
    # ORT's documented flow: pre-process (shape inference, graph optimisation: folds BatchNormalization), then
    # quantize_static. Both are part of "calibrating with ORT", so both are timed.
    quant_pre_process(str(args.model), str(pre))
    pre_s = time.perf_counter() - start
    quantize_static(str(pre), str(args.out), Reader(), **kwargs)
    return {"quantize_s": time.perf_counter() - start, "quantize_peak_rss_mb": peak_rss_mb(), "pre_process_s": pre_s,
            "calib_batch": step, "calib_samples_used": len(calib)}


def _worker_floor(args) -> dict:
    """The floor for peak memory: Python, numpy and ONNX Runtime running the FP32 model over the calibration set."""
    import onnxruntime as ort

    calib = load_inputs(args.calib_dir, args.model)
    sess = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    for batch in batches(calib, args.batch_size):
        sess.run(None, {name: batch})
    return {"quantize_s": time.perf_counter() - start}


def run_worker(args) -> None:
    np.random.seed(SEED)
    if args.worker in ("warmup", "floor"):
        result = {"warmup": warm_imports, "floor": _worker_floor}[args.worker](args)
    else:
        tool = TOOLS_BY_NAME[args.worker]
        result = {"modelopt": _worker_modelopt, "ort": _worker_ort}[tool.family](tool, args)
    args.result.write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- measurement
def trtglm_cmd(tool: Tool, args, out_dir: Path) -> list[str]:
    cmd = [trtglm_exe(), "build", str(args.model),
           "--int8", "--calib", str(args.calib_dir), "--eval", str(args.eval_dir),
           "--calib-method", tool.method, "--batch-size", str(args.batch_size), "--out", str(out_dir)]
    if tool.method == "percentile":
        cmd += ["--percentile", str(args.percentile)]
    return cmd


def worker_cmd(worker: str, args, out: Path, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", str(args.model),
            "--calib-dir", str(args.calib_dir), "--batch-size", str(args.batch_size),
            "--percentile", str(args.percentile), "--out", str(out), "--result", str(result)]


def measure(tool: Tool, args, scratch: Path) -> dict:
    work = scratch / tool.name
    work.mkdir(parents=True)
    log = work / "log.txt"
    if tool.family == "trtglm":
        out_dir = work / "out"
        child = run_child(trtglm_cmd(tool, args, out_dir), log, args.timeout)
        out_model = out_dir / "model.int8.qdq.onnx"
        row = trtglm_stage_times(out_dir)
    else:
        out_model, result = work / "model.int8.qdq.onnx", work / "result.json"
        child = run_child(worker_cmd(tool.name, args, out_model, result), log, args.timeout)
        row = json.loads(result.read_text()) if result.exists() else {}
        row.setdefault("quantize_s", None)
        row["calib_stage_s"] = None
    row.update(child)
    row["model"] = str(out_model) if out_model.exists() else None
    if child["rc"] != 0 or row["model"] is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        row["error"] = f"exit {child['rc']}" + (": " + " | ".join(tail) if tail else "")
    return row


# ----------------------------------------------------------------------------------------------- evaluation
def predict(model: str, data: np.ndarray, optimized: bool, batch_size: int) -> np.ndarray:
    """Top-1 class of every sample; a static batch axis is honoured by padding the last batch."""
    sess = session(model, optimized)
    inp = sess.get_inputs()[0]
    static = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = static or batch_size
    preds = []
    for batch in batches(data, step):
        n = len(batch)
        if static and n < static:
            batch = np.concatenate([batch, np.repeat(batch[-1:], static - n, axis=0)])
        logits = sess.run(None, {inp.name: batch})[0]
        preds.append(logits.reshape(len(batch), -1)[:n].argmax(axis=1))
    return np.concatenate(preds)


def evaluate(row: dict, eval_x: np.ndarray, labels: np.ndarray | None, fp32_pred: np.ndarray, bs: int) -> None:
    for figure, optimized in (("sim", False), ("ort", True)):
        pred = predict(row["model"], eval_x, optimized, bs)
        row[f"{figure}_agree"] = float(100.0 * np.mean(pred == fp32_pred))
        row[f"{figure}_top1"] = float(100.0 * np.mean(pred == labels)) if labels is not None else None
    row.update(qdq_summary(row["model"]))


# ----------------------------------------------------------------------------------------------- reporting
def targets(rows: dict[str, dict]) -> list[dict]:
    ours = rows.get(TRTGLM_ROW, {})

    def ran(r: dict) -> bool:
        return bool(r) and "error" not in r and "sim_agree" in r

    peers = {n: r for n, r in rows.items() if TOOLS_BY_NAME[n].family != "trtglm" and ran(r)}
    out = []

    def add(name, ok, text):
        out.append({"target": name, "pass": ok, "detail": text})

    ok_ours = ran(ours)
    wall_peer = peers.get(WALL_PEER)
    if ok_ours and wall_peer and ours.get("quantize_s") and wall_peer.get("quantize_s"):
        ratio = ours["quantize_s"] / wall_peer["quantize_s"]
        add("wall time", ratio <= 0.5,
            f"{TRTGLM_ROW}/{WALL_PEER} quantize wall time {ratio:.2f}x (target <= 0.50x; whole process, with "
            f"imports and trtglm's verification: {ours['process_s'] / wall_peer['process_s']:.2f}x, for information)")
    else:
        add("wall time", False, f"{TRTGLM_ROW} or {WALL_PEER} did not run")
    mem_peers = {n: r for n, r in peers.items() if r.get("quantize_peak_rss_mb")}
    if ok_ours and mem_peers and ours.get("quantize_peak_rss_mb"):
        low_name = min(mem_peers, key=lambda n: mem_peers[n]["quantize_peak_rss_mb"])
        ratio = ours["quantize_peak_rss_mb"] / mem_peers[low_name]["quantize_peak_rss_mb"]
        add("peak memory", ratio <= 1.0,
            f"{TRTGLM_ROW}/{low_name} (lowest peer) peak RSS up to the written Q/DQ model {ratio:.2f}x "
            f"(target <= 1.00x; whole process {ours['peak_rss_mb'] / peers[low_name]['peak_rss_mb']:.2f}x, "
            "for information)")
    else:
        add("peak memory", False, f"{TRTGLM_ROW} or every peer has no quantize peak RSS")
    if ok_ours and peers:
        for fig in ("sim", "ort"):
            key = f"{fig}_top1" if ours.get(f"{fig}_top1") is not None else f"{fig}_agree"
            best_name = max(peers, key=lambda n: peers[n][key])
            diff = ours[key] - peers[best_name][key]
            add(f"accuracy {fig}", diff >= 0,
                f"{TRTGLM_ROW} {key} {ours[key]:.2f}% vs best peer {best_name} {peers[best_name][key]:.2f}% "
                f"({diff:+.2f} points; target >= +0.00)")
    else:
        add("peak memory", False, f"{TRTGLM_ROW} or every peer failed")
        add("accuracy", False, f"{TRTGLM_ROW} or every peer failed")
    return out


COLUMNS = ("tool", "quantize s", "calib s", "process s", "quantize peak MB", "process peak MB", "torch", "sim top1 %", "sim agree %",
           "ort top1 %", "ort agree %", "Q/DQ", "TRT-ready")


def _fp32(result: dict) -> str:
    top1 = result["fp32_top1"]
    return "no labels: accuracy is agreement with FP32" if top1 is None else f"FP32 top-1 {top1:.2f}%"


def table_cells(name: str, r: dict) -> list[str]:
    if "sim_agree" not in r:  # no model came out
        return [name, fmt(r.get("quantize_s")), "—", fmt(r.get("process_s")),
                fmt(r.get("quantize_peak_rss_mb"), ".0f"), fmt(r.get("peak_rss_mb"), ".0f"),
                yes_no(r.get("torch_loaded")), "failed", "", "", "", "", ""]
    return [name, fmt(r.get("quantize_s")), fmt(r.get("calib_stage_s")), fmt(r["process_s"]),
            fmt(r.get("quantize_peak_rss_mb"), ".0f"), fmt(r["peak_rss_mb"], ".0f"), yes_no(r.get("torch_loaded")), fmt(r.get("sim_top1")),
            fmt(r.get("sim_agree")), fmt(r.get("ort_top1")), fmt(r.get("ort_agree")),
            f"{r.get('quantize_nodes', 0)}/{r.get('dequantize_nodes', 0)}",
            "yes" if r.get("trt_int8_symmetric") else f"no ({', '.join(r.get('trt_problems', []))})"]


def floor_line(result: dict) -> str:
    f = result["floor"]
    torch = "loaded" if f["torch_loaded"] else "not loaded"
    return (f"Floor: Python + numpy + ONNX Runtime running the FP32 model over the calibration set peaks at "
            f"{f['peak_rss_mb']:.0f} MB RSS in {f['process_s']:.2f} s (torch {torch}).")


def markdown(result: dict) -> str:
    rows = result["rows"]
    cpu = result["cpu"]
    head = (f"Model `{result['model']}`, {result['calib_samples']} calibration / {result['eval_samples']} held-out "
            f"samples, CPU {cpu['name']} ({cpu['cores']} cores, VNNI: {'yes' if cpu['vnni'] else 'no'}); "
            f"{_fp32(result)}.")
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in rows.items():
        lines.append("| " + " | ".join(table_cells(name, r)) + " |")
    lines += ["", floor_line(result), ""]
    for t in result["targets"]:
        lines.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['detail']}")
    lines.append("")
    lines.append("Settings:")
    lines += [f"- {name}: `{r['settings']}`" for name, r in rows.items() if r.get("settings")]
    lines.append("")
    lines.append(f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.")
    return "\n".join(lines) + "\n"


def print_rich(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170))
    table = Table(title=f"INT8 calibration: {Path(result['model']).name}, {result['calib_samples']} calibration / "
                        f"{result['eval_samples']} held-out samples, {_fp32(result)}")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for name, r in result["rows"].items():
        table.add_row(*table_cells(name, r), style="bold" if name == TRTGLM_ROW else None)
    console.print(table)
    console.print(floor_line(result))
    for name, r in result["rows"].items():
        if "error" in r:
            console.print(f"[red]{name}: {r['error']}[/red]")
    for t in result["targets"]:
        tag = "[green]PASS[/green]" if t["pass"] else "[red]FAIL[/red]"
        console.print(f"{tag} {t['target']}: {t['detail']}")


# ----------------------------------------------------------------------------------------------- main
def run_bench(args) -> int:
    args.model, args.calib_dir, args.eval_dir = (p.resolve() for p in (args.model, args.calib_dir, args.eval_dir))
    for path in (args.model, args.calib_dir, args.eval_dir):
        if not path.exists():
            sys.exit(f"{path} does not exist (the digits example: make demo, or examples/digits/train.py)")
    np.random.seed(SEED)
    cpu = cpu_info()
    print(f"CPU: {cpu['name']}, {cpu['cores']} cores, VNNI: "
          f"{'yes (' + ', '.join(cpu['vnni_flags']) + ')' if cpu['vnni'] else 'no'}")

    calib_x = load_inputs(args.calib_dir, args.model)
    eval_x = load_inputs(args.eval_dir, args.model)
    labels_path = args.eval_dir / "labels.npy"
    labels = np.load(labels_path).reshape(-1) if labels_path.exists() else None
    fp32_pred = predict(str(args.model), eval_x, True, args.batch_size)
    fp32_top1 = float(100.0 * np.mean(fp32_pred == labels)) if labels is not None else None

    tools = [TOOLS_BY_NAME[n] for n in args.tools]
    scratch = Path(tempfile.mkdtemp(prefix="trtglm-bench-"))
    rows: dict[str, dict] = {}
    try:
        run_child(worker_cmd("warmup", args, scratch / "w.onnx", scratch / "w.json"), scratch / "warmup.log",
                  args.timeout)
        floor = run_child(worker_cmd("floor", args, scratch / "f.onnx", scratch / "f.json"), scratch / "floor.log",
                          args.timeout)
        for tool in tools:
            print(f"running {tool.name} ...", flush=True)
            samples = []
            for rep in range(args.repeat):
                samples.append(measure(tool, args, scratch / f"rep{rep}"))
            # The fastest successful repetition's times; the highest peak memory of any repetition.
            row = min(samples, key=lambda r: ("error" in r, r.get("quantize_s") or r["process_s"]))
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in samples)
            if row.get("model"):
                evaluate(row, eval_x, labels, fp32_pred, args.batch_size)
            row["settings"] = tool.settings.format(p=args.percentile)
            if not args.keep:
                row.pop("model", None)
            rows[tool.name] = row
    finally:
        if args.keep:
            print(f"kept the tools' outputs and logs in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    result = {"model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
              "calib_samples": len(calib_x), "eval_samples": len(eval_x), "batch_size": args.batch_size,
              "percentile": args.percentile, "repeat": args.repeat, "cpu": cpu, "versions": versions(),
              "fp32_top1": fp32_top1, "floor": {k: floor[k] for k in ("process_s", "peak_rss_mb", "torch_loaded")},
              "rows": rows}
    result["targets"] = targets(rows) if TRTGLM_ROW in rows else []
    print_rich(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results_dir / "calibration.md").write_text(markdown(result))
    print(f"wrote {args.results_dir / 'calibration.json'} and {args.results_dir / 'calibration.md'}")
    return 0


def parse_args(argv=None):
    digits = REPO / "calibration" / "digits"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=digits / "digits_cnn.onnx", help="single-input classifier ONNX")
    p.add_argument("--calib-dir", type=Path, default=digits / "calib", help="calibration samples: <input>.npy")
    p.add_argument("--eval-dir", type=Path, default=digits / "eval", help="held-out <input>.npy and labels.npy")
    p.add_argument("--batch-size", type=int, default=32, help="calibration and evaluation batch size, every tool")
    p.add_argument("--percentile", type=float, default=99.99, help="for trtglm-percentile and ort-percentile")
    p.add_argument("--tools", nargs="+", default=[t.name for t in TOOLS], choices=[t.name for t in TOOLS])
    p.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest is reported")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per tool run")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--keep", action="store_true", help="keep every tool's output model and log")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
