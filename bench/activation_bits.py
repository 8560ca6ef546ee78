"""How many activation bits an evaluation set needs: a CNN's agreement with FP32 when every Conv/Gemm input is
rounded to a per-tensor grid of 2^b levels, for b = 8, 9, 10, with the weights left in float; and, as the floor of
the metric, its agreement with no INT8 at all, every tensor stored in FP16.

    python bench/activation_bits.py [--variant lite1] [--bits 8,9,10]      # about 2 minutes
    python bench/activation_bits.py --model cnn.onnx --calib calib/ --eval eval/   # any single-input classifier
    python bench/activation_bits.py --bits 8 --by-reader      # which inputs the 8-bit error comes from

Why: TensorRT's INT8 keeps activations per tensor, 8 bits. The grid here is better than TensorRT's: affine (its own
low end per tensor, zero kept exact), its range chosen per tensor by the rounding-plus-clipping error on the
calibration crops, every tensor on it (TensorRT's symmetric grid, or trtglm's unsigned one, uses at best as many
levels), and the weights stay float. So its 8-bit row is about the most any post-training INT8 recipe reaches on
this data: calibration, rounding and per-channel tricks work within it. Not a strict bound: bias correction takes
the mean out of the rounding error, which this grid leaves in, and moves an INT8 model slightly past it. The rows
for 9 and 10 bits say what a target above the 8-bit row asks for. The FP32 logits' margins (top-1 minus top-2) say
why: a prediction whose margin is below the logit error flips, and random crops of photographs have many small
margins. The FP16 rows (every tensor and Conv/Gemm weight stored in FP16, as exported and with BatchNorm folded,
the graph TensorRT runs) are the floor: no INT8 at all, only the precision of a layer kept out of INT8.
Results: bench/results/activation_bits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from cnn import SIZES, agreement, load_images, logits
from common import REPO, session

from trtglm.passes import DEFAULT_PIPELINE, run_passes

SAMPLED = 50_000  # values per tensor and batch that the range search sees
BATCH = 16


def conv_inputs(model: onnx.ModelProto) -> list[str]:
    graph = gs.import_onnx(model)
    return sorted({n.inputs[0].name for n in graph.nodes if n.op in ("Conv", "Gemm")
                   and isinstance(n.inputs[0], gs.Variable)})


def depthwise_inputs(model: onnx.ModelProto) -> set[str]:
    """The inputs of depthwise convolutions (one group per input channel)."""
    graph = gs.import_onnx(model)
    return {n.inputs[0].name for n in graph.nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant)
            and n.inputs[1].values.shape[1] == 1 and int(n.attrs.get("group", 1)) == n.inputs[1].values.shape[0] > 1}


def samples(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed random sample of each tensor's values over the calibration crops."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    sess = session(probe.SerializeToString(), False)
    feed = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    got: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), BATCH):
        for name, v in zip(names, sess.run(names, {feed: x[i:i + BATCH]})):
            flat = v.reshape(-1)
            got[name].append(flat[rng.integers(0, flat.size, min(SAMPLED, flat.size))])
    return {n: np.concatenate(v) for n, v in got.items()}


def grid(v: np.ndarray, levels: int) -> tuple[float, float]:
    """(low, step) of the affine grid with the least squared error on v, zero on the grid."""
    lo, hi = float(v.min()), float(v.max())
    best = (np.inf, lo, 1.0)
    for top in np.linspace(0.3, 1.0, 36):
        for bottom in (np.linspace(0.3, 1.0, 15) if lo < 0 else (1.0,)):
            low, high = lo * bottom, hi * top
            step = (high - low) / (levels - 1) or 1.0
            if low < 0 < high:
                low = -np.round(-low / step) * step
            q = np.clip(np.rint((v - low) / step), 0, levels - 1) * step + low
            err = float(np.mean((q - v) ** 2))
            if err < best[0]:
                best = (err, low, step)
    return best[1], best[2]


def fake_quantized(model: onnx.ModelProto, grids: dict[str, tuple[float, float]], levels: int) -> bytes:
    """The model with every Conv/Gemm input rounded to its grid (float ops: any number of levels)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name, (low, step) in sorted(grids.items()):
        x = tensors[name]
        readers = [n for n in x.outputs if n.op in ("Conv", "Gemm") and n.inputs[0] is x]
        c = {k: gs.Constant(f"{name}_{k}", np.asarray(v, np.float32)) for k, v in
             (("low", low), ("step", step), ("zero", 0.0), ("top", levels - 1.0))}
        a, b, r, k, m, y = (gs.Variable(f"{name}_fq{i}", dtype=np.float32) for i in range(6))
        graph.nodes += [gs.Node("Sub", inputs=[x, c["low"]], outputs=[a]),
                        gs.Node("Div", inputs=[a, c["step"]], outputs=[b]), gs.Node("Round", inputs=[b], outputs=[r]),
                        gs.Node("Clip", inputs=[r, c["zero"], c["top"]], outputs=[k]),
                        gs.Node("Mul", inputs=[k, c["step"]], outputs=[m]),
                        gs.Node("Add", inputs=[m, c["low"]], outputs=[y])]
        for node in readers:
            node.inputs[0] = y
    graph.cleanup().toposort()
    return gs.export_onnx(graph).SerializeToString()


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph `trtglm build` quantizes (and TensorRT runs): BatchNorm folded into the Convs, constants folded."""
    graph = gs.import_onnx(model)
    run_passes(graph, DEFAULT_PIPELINE)
    return gs.export_onnx(graph)


def fp16_stored(model: onnx.ModelProto) -> bytes:
    """The model with every float tensor and Conv/Gemm weight stored in FP16 (a Cast there and back), the
    arithmetic left in FP32: what TensorRT's FP16 layers compute, the precision a layer kept out of INT8 gets."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    rounded: dict[str, gs.Variable] = {}
    for node in list(graph.nodes):
        if node.op in ("Conv", "Gemm") and isinstance(node.inputs[1], gs.Constant):
            node.inputs[1].values = node.inputs[1].values.astype(np.float16).astype(np.float32)
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Variable) and t.dtype == np.float32:
                if t.name not in rounded:
                    half, back = (gs.Variable(f"{t.name}_{k}", dtype=d) for k, d in (("f16", np.float16),
                                                                                       ("f32", np.float32)))
                    graph.nodes += [gs.Node("Cast", inputs=[t], outputs=[half], attrs={"to": onnx.TensorProto.FLOAT16}),
                                    gs.Node("Cast", inputs=[half], outputs=[back], attrs={"to": onnx.TensorProto.FLOAT})]
                    rounded[t.name] = back
                node.inputs[i] = rounded[t.name]
    graph.cleanup().toposort()
    return gs.export_onnx(graph).SerializeToString()


def load(folder: Path) -> np.ndarray:
    """A data folder as the model reads it: bench/cnn.py's preprocessed .png crops, or one .npy array (N, ...)."""
    arrays = sorted(p for p in folder.glob("*.npy") if p.name != "labels.npy")
    return np.load(arrays[0]).astype(np.float32) if arrays else load_images(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(SIZES), default="lite1")
    parser.add_argument("--data", type=Path, default=REPO / "calibration" / "efficientnet")
    parser.add_argument("--model", type=Path, help="any single-input classifier ONNX (default: EfficientNet --variant)")
    parser.add_argument("--calib", type=Path, help="with --model: .npy (N, ...) or .png crops")
    parser.add_argument("--eval", type=Path, help="with --model: the same, held out")
    parser.add_argument("--bits", default="8,9,10")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--by-reader", action="store_true",
                        help="also round, at 8 bits, only the depthwise convolutions' inputs, then all but those")
    args = parser.parse_args(argv)
    size = SIZES[args.variant]
    path = args.model or args.data / f"efficientnet-{args.variant}.onnx"
    if not path.exists():
        sys.exit(f"{path} missing: python examples/efficientnet/export.py --variant {args.variant} --out {args.data}")
    if args.model and not (args.calib and args.eval):
        sys.exit("--model needs --calib and --eval")
    model = onnx.load(str(path))
    calib = load(args.calib or args.data / f"calib-{size}")[:args.calib_samples]
    evaluation = load(args.eval or args.data / f"eval-{size}")
    ref = logits(str(path), evaluation, optimized=False)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    names = conv_inputs(model)
    values = samples(model, names, calib)
    print(f"{path.name}: {len(names)} Conv/Gemm inputs, ranges from {len(calib)} calibration crops, "
          f"{len(evaluation)} evaluation crops")
    print(f"FP32 top-1 margin (logits): median {np.median(margin):.3f}; "
          + ", ".join(f"{100 * np.mean(margin < t):.1f}% below {t}" for t in (0.02, 0.05, 0.1)))
    rows, grids = [], {}

    def row(label: str, bits: int, chosen: dict, **extra) -> None:
        got = agreement(ref, logits(fake_quantized(model, chosen, 2 ** bits), evaluation, optimized=False))
        rows.append({"bits": bits, **extra, **got})
        print(f"{label:36} {100 * got['top1']:15.1f}% {100 * got['top5']:6.1f}% {got['cosine']:9.5f}"
              + (f"   ({len(chosen)} tensors)" if extra else ""))

    print(f"{'activation grid':36} {'top-1 agreement':>16} {'top-5':>7} {'cosine':>9}")
    for label, graph_of in (("as exported", model), ("BatchNorm folded", folded(model))):
        fp16 = agreement(ref, logits(fp16_stored(graph_of), evaluation, optimized=False))
        rows.append({"bits": 16, "only": f"FP16 storage, FP32 arithmetic, {label}", **fp16})
        print(f"{'FP16, no INT8, ' + label:36} {100 * fp16['top1']:15.1f}% {100 * fp16['top5']:6.1f}% "
              f"{fp16['cosine']:9.5f}")
    for bits in (int(b) for b in args.bits.split(",")):
        grids[bits] = {n: grid(values[n], 2 ** bits) for n in names}
        row(f"{bits} bits per tensor, affine", bits, grids[bits])
    if args.by_reader:  # which inputs the 8-bit error comes from
        depthwise = depthwise_inputs(model)
        eight = grids.get(8) or {n: grid(values[n], 256) for n in names}
        for label, keep in (("depthwise inputs only", lambda n: n in depthwise),
                            ("all but depthwise inputs", lambda n: n not in depthwise)):
            chosen = {n: g for n, g in eight.items() if keep(n)}
            row(f"8 bits, {label}", 8, chosen, only=label, tensors=len(chosen))
    out = REPO / "bench" / "results" / "activation_bits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(path), "eval": len(evaluation), "calib": len(calib),
                               "margin_quantiles": {str(q): float(np.quantile(margin, q)) for q in (0.02, 0.05, 0.1, 0.5)},
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
