"""Sentence-embedding accuracy of an INT8 Q/DQ MiniLM against FP32 (the metrics of bench/minilm.py, for one model).

    python bench/minilm_probe.py calibration/minilm/minilm.onnx OUT/model.int8.qdq.onnx [--eval calibration/minilm/eval]

Prints, for the `sim` (ORT, no graph optimizations: what TensorRT computes) and `ort` (ORT-CPU) figures, the mean
cosine of each held-out sentence's embedding with its FP32 embedding, and the nearest-neighbour agreement: how
often the nearest other held-out sentence (by cosine) is the same under INT8 as under FP32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minilm import embed, embedding_metrics, load_feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", type=Path)
    p.add_argument("int8", type=Path)
    p.add_argument("--eval", type=Path, default=Path("calibration/minilm/eval"))
    args = p.parse_args()
    feeds = load_feeds(args.eval)
    ref = embed(args.fp32, feeds, optimized=True)
    for fig, optimized in (("sim", False), ("ort", True)):
        m = embedding_metrics(ref, embed(args.int8, feeds, optimized))
        print(f"{fig}: mean cosine {m['cos']:.4f} (min {m['cos_min']:.4f}), nearest-neighbour agreement "
              f"{m['nn']:.1f}% on {len(ref)} sentences")


if __name__ == "__main__":
    main()
