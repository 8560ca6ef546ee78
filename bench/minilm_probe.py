"""Sentence-embedding accuracy of an INT8 Q/DQ MiniLM against FP32 (groundwork for the transformers bench).

    python bench/minilm_probe.py calibration/minilm/minilm.onnx OUT/model.int8.qdq.onnx [--eval calibration/minilm/eval]

Prints, for the `sim` (ORT, no graph optimizations: what TensorRT computes) and `ort` (ORT-CPU) figures, the mean
cosine of each held-out sentence's embedding with its FP32 embedding, and the nearest-neighbour agreement: how
often the nearest other held-out sentence (by cosine) is the same under INT8 as under FP32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

NAMES = ("input_ids", "attention_mask", "token_type_ids")


def embed(model: Path, feeds: dict[str, np.ndarray], optimize: bool, batch: int = 64) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    n = len(feeds[NAMES[0]])
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)]).astype(np.float64)


def nearest(e: np.ndarray) -> np.ndarray:
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", type=Path)
    p.add_argument("int8", type=Path)
    p.add_argument("--eval", type=Path, default=Path("calibration/minilm/eval"))
    args = p.parse_args()
    feeds = {k: np.load(args.eval / f"{k}.npy") for k in NAMES}
    ref = embed(args.fp32, feeds, optimize=True)
    ref_nn = nearest(ref)
    for fig, optimize in (("sim", False), ("ort", True)):
        out = embed(args.int8, feeds, optimize)
        cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
        print(f"{fig}: mean cosine {cos.mean():.4f} (min {cos.min():.4f}), nearest-neighbour agreement "
              f"{100 * np.mean(nearest(out) == ref_nn):.1f}% on {len(ref)} sentences")


if __name__ == "__main__":
    main()
