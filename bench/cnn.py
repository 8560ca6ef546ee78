"""Hard-CNN INT8 benchmark: EfficientNet-Lite with its real ImageNet weights, trtglm's techniques alone and combined,
against NVIDIA ModelOpt's ONNX PTQ and ONNX Runtime's quantize_static, in one run on the same data.

    bash bench/setup.sh && .venv-bench/bin/python bench/cnn.py [--variant lite1] [--rows trtglm,modelopt-entropy]

Data: examples/efficientnet/export.py (run here when calibration/efficientnet is missing) crops scikit-image's and
scikit-learn's bundled photographs; calibration and evaluation crops come from disjoint source images. Every tool
calibrates on the same preprocessed arrays, and the bench evaluates every tool's Q/DQ ONNX the same way against the
FP32 model: top-1 and top-5 agreement with FP32's prediction and the logits' cosine, in the `sim` figure (ONNX
Runtime with graph optimizations off: Q/DQ computed literally, as TensorRT computes them) and the `ort` figure
(ONNX Runtime CPU's INT8 kernels on this machine). Each tool runs in its own child process: its wall time and peak
memory (ru_maxrss) are its own. Results: bench/results/cnn.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from calibration import TOOLS_BY_NAME, worker_cmd
from common import REPO, cpu_info, fmt, qdq_summary, run_child, session, trtglm_exe, trtglm_stage_times, versions

SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}
MEAN, STD = 0.498, 0.502  # TensorFlow's (x - 127) / 128 for the Lite family, on [0, 1] pixels
BUDGET = "0.002"
# The combination: the techniques that help here (--explicit-pads only acts on a PyTorch-style graph: --implicit-pads). --equalize is measured alone and left out of it: with per-channel
# weights it only moves range between the per-tensor activation and the next layer's columns, and here it hurts.
ALL = ["--bias-correction", "sequential", "--weight-rounding", "adaround", "--explicit-pads"]
TRTGLM_ROWS = {  # row -> extra `trtglm build` arguments
    "trtglm --no-unsigned": ["--no-unsigned"],  # what the unsigned grid (on by default) buys
    "trtglm": [],
    "trtglm +equalize": ["--equalize"],
    "trtglm +bias-correction empirical": ["--bias-correction", "empirical"],
    "trtglm +bias-correction analytic": ["--bias-correction", "analytic"],
    "trtglm +bias-correction sequential": ["--bias-correction", "sequential"],
    "trtglm +adaround": ["--weight-rounding", "adaround"],
    "trtglm +explicit-pads": ["--explicit-pads"],
    "trtglm +all": ALL,
    f"trtglm +all +budget {BUDGET}": ALL + ["--accuracy-budget", BUDGET],
}
PEER_ROWS = ("modelopt-entropy", "modelopt-max", "ort-minmax", "ort-minmax-trt")
TARGET_ROW, BUDGET_ROW = "trtglm +all", f"trtglm +all +budget {BUDGET}"


def load_images(folder: Path) -> np.ndarray:
    """The crops as the models read them: float32 (N, 3, S, S), ((x / 255) - mean) / std, as `--preprocess`."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    if not files:
        sys.exit(f"{folder}: no .png crops; run examples/efficientnet/export.py")
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files]) / np.float32(255)
    return np.ascontiguousarray(((x - np.float32(MEAN)) / np.float32(STD)).transpose(0, 3, 1, 2))


def logits(model: str, x: np.ndarray, optimized: bool, batch: int = 32) -> np.ndarray:
    sess = session(model, optimized)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    best = ref.argmax(axis=1)
    top5 = np.argsort(-out, axis=1)[:, :5]
    cos = (ref * out).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return {"top1": float(np.mean(out.argmax(axis=1) == best)), "top5": float(np.mean((top5 == best[:, None]).any(1))),
            "cosine": float(np.mean(cos))}


def pytorch_style(src: Path, dst: Path) -> int:
    """The model as PyTorch exports such a network: every zero Pad in front of a Conv folded into the Conv's `pads`
    attribute (after trtglm's FP32 passes, which turn the TensorFlow-style padding arithmetic into constants).
    Returns the number of Pads folded."""
    import onnx
    import onnx_graphsurgeon as gs

    from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes
    from trtglm.passes.match import constant_value, pad_value

    model = onnx.load(str(src))
    graph = gs.import_onnx(model)
    run_passes(graph, DEFAULT_PIPELINE, PassContext(opset=model.opset_import[0].version))
    folded = 0
    for pad in [n for n in graph.nodes if n.op == "Pad" and len(n.inputs) <= 3]:
        readers, pads = pad.outputs[0].outputs, constant_value(pad.inputs[1])
        if len(readers) != 1 or readers[0].op != "Conv" or pads is None or pad_value(pad) != 0.0:
            continue
        half = len(pads) // 2
        if any(pads[:2]) or any(pads[half:half + 2]):
            continue
        conv, spatial = readers[0], [int(p) for p in (*pads[2:half], *pads[half + 2:])]
        conv.attrs["pads"] = [int(a) + b for a, b in zip(conv.attrs.get("pads", [0] * len(spatial)), spatial)]
        conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    graph.cleanup().toposort()
    onnx.save(gs.export_onnx(graph), str(dst))
    return folded


def measure(name: str, args, work: Path, data: Path) -> dict:
    work.mkdir(parents=True)
    log = work / "log.txt"
    if name in TRTGLM_ROWS:
        out_dir = work / "out"
        # --eval: trtglm's own check on a few held-out crops, so that it calibrates on all the samples, as the
        # peers do (without it, 20% of the calibration data would be held out for that check).
        cmd = [trtglm_exe(), "build", str(args.model), "--int8", "--calib", str(data / "calib"),
               "--eval", str(data / "check"), "--batch-size", "32", "--out", str(out_dir),
               "--backend", "onnxruntime"] + TRTGLM_ROWS[name]
        child = run_child(cmd, log, args.timeout)
        model, row = out_dir / "model.int8.qdq.onnx", trtglm_stage_times(out_dir)
        try:
            rep = json.loads((out_dir / "report.json").read_text())
            row["int8_mac_fraction"] = rep["quantization"]["int8_mac_fraction"]
            row["weight_decisions"] = rep["quantization"].get("weight_decisions")
        except (OSError, ValueError, KeyError):
            pass
    else:
        wargs = argparse.Namespace(model=args.model, calib_dir=data / "calib", batch_size=32, percentile=99.99)
        model, result = work / "model.int8.qdq.onnx", work / "result.json"
        child = run_child(worker_cmd(name, wargs, model, result), log, args.timeout,
                          cwd=Path(__file__).resolve().parent)
        row = json.loads(result.read_text()) if result.exists() else {}
        row["int8_mac_fraction"] = None
    row.update(child)
    if child["rc"] != 0 or not model.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-2:] if log.exists() else []
        row["error"] = f"exit {child['rc']}: " + " | ".join(tail)
        return row
    row["model"] = str(model)
    row.update(qdq_summary(str(model)))
    return row


def markdown(result: dict) -> str:
    head = ("| tool | top-1 agree sim | top-1 agree ort | top-5 agree sim | cosine sim | INT8 MACs | quantize s "
            "| peak MB | settings |")
    style = ", PyTorch-style (implicit padding)" if result.get("implicit_pads") else ""
    lines = [f"EfficientNet-{result['variant']} (ImageNet weights{style}), {result['calib']} calibration crops, "
             f"{result['eval']} evaluation crops from other images; {result['cpu']['name']} "
             f"(VNNI: {result['cpu'].get('vnni')}); FP32 top-1 is the reference.", "", head,
             "|" + "---|" * 9]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |||||||")
            continue
        mac = fmt(100 * r["int8_mac_fraction"], ".1f") + "%" if r.get("int8_mac_fraction") is not None else "100%*"
        lines.append(f"| {name} | {100 * r['sim']['top1']:.1f}% | {100 * r['ort']['top1']:.1f}% | "
                     f"{100 * r['sim']['top5']:.1f}% | {r['sim']['cosine']:.4f} | {mac} | "
                     f"{fmt(r.get('quantize_s'), '.0f')} | {fmt(r.get('peak_rss_mb'), '.0f')} | "
                     f"{' '.join(TRTGLM_ROWS.get(name, [name]))} |")
    lines += ["", "*every Conv and Gemm the peer quantizes; trtglm's column is its report's MAC-weighted fraction.",
              "quantize s: trtglm's stages up to the Q/DQ ONNX (report.json), the peers' quantize call; peak MB: the "
              "whole child process."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(SIZES), default="lite1")
    parser.add_argument("--data", type=Path, default=REPO / "calibration" / "efficientnet")
    parser.add_argument("--rows", help="comma-separated subset of the rows")
    parser.add_argument("--implicit-pads", action="store_true",
                        help="every tool gets the model as PyTorch would export it: zero Pads folded into the Convs")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    size = SIZES[args.variant]
    args.model = args.data / f"efficientnet-{args.variant}.onnx"
    if not args.model.exists() or not (args.data / f"eval-{size}").is_dir():
        subprocess.run([sys.executable, str(REPO / "examples" / "efficientnet" / "export.py"), "--variant",
                        args.variant, "--out", str(args.data)], check=True)
    rows = list(TRTGLM_ROWS) + list(PEER_ROWS)
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",")]
        unknown = [r for r in rows if r not in TRTGLM_ROWS and r not in TOOLS_BY_NAME]
        if unknown:
            sys.exit(f"--rows: unknown {unknown}; choose from {list(TRTGLM_ROWS) + list(PEER_ROWS)}")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="trtglm-cnn-") as tmp:
        scratch = Path(tmp)
        if args.implicit_pads:
            folded = pytorch_style(args.model, scratch / "model.onnx")
            print(f"{args.model.name} PyTorch-style: {folded} zero Pads folded into their Convs' pads", flush=True)
            args.model = scratch / "model.onnx"
        calib, evaluation = load_images(args.data / f"calib-{size}"), load_images(args.data / f"eval-{size}")
        for split, x in (("calib", calib), ("eval", evaluation), ("check", evaluation[:32])):
            (scratch / "data" / split).mkdir(parents=True)
            np.save(scratch / "data" / split / "input.npy", x)
        ref = logits(str(args.model), evaluation, optimized=False)
        result = {"variant": args.variant, "implicit_pads": args.implicit_pads, "calib": len(calib), "eval": len(evaluation), "cpu": cpu_info(),
                  "versions": versions(), "rows": {}}
        for i, name in enumerate(rows):
            print(f"[{i + 1}/{len(rows)}] {name} ...", flush=True)
            row = measure(name, args, scratch / f"row{i}", scratch / "data")
            if "model" in row:
                for figure, optimized in (("sim", False), ("ort", True)):
                    row[figure] = agreement(ref, logits(row["model"], evaluation, optimized))
                print(f"    top-1 agreement sim {100 * row['sim']['top1']:.1f}%, ort {100 * row['ort']['top1']:.1f}%"
                      f"; cosine {row['sim']['cosine']:.4f}; {row.get('quantize_s') or 0:.0f} s", flush=True)
            else:
                print(f"    {row['error']}", flush=True)
            row.pop("model", None)
            result["rows"][name] = row
    result["wall_s"] = round(time.time() - start, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cnn.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.results / "cnn.md").write_text(markdown(result))
    print(markdown(result))
    target = result["rows"].get(TARGET_ROW, {})
    budget = result["rows"].get(BUDGET_ROW, {})
    checks = []
    if "sim" in target:
        checks.append((f"{TARGET_ROW}: top-1 agreement >= 95% (sim and ort)",
                       min(target["sim"]["top1"], target["ort"]["top1"]) >= 0.95))
    if "sim" in budget:
        checks.append((f"{BUDGET_ROW}: >= 98% with >= 95% of MACs INT8",
                       min(budget["sim"]["top1"], budget["ort"]["top1"]) >= 0.98
                       and (budget.get("int8_mac_fraction") or 0) >= 0.95))
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
