"""FP32 vs INT8 on the embedded backend: ONNX Runtime CPU runs both through Polygraphy's comparator.

Two INT8 figures, because they answer two questions:
- `sim`: ORT with graph optimizations off, so Q/DQ execute literally as float math: what TensorRT computes.
- `ort`: ORT-CPU with its optimizations, which fuse Q/DQ into its INT8 kernels: what a user deploying the
  Q/DQ ONNX on ORT-CPU gets on this machine (on x86 CPUs without VNNI those kernels can saturate).
Metrics are accumulated batch by batch, never holding all outputs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from trtglm import runtime

G_LOGGER.module_severity = G_LOGGER.WARNING
FIGURES = ("sim", "ort")


@dataclass
class _Acc:
    """Running error metrics of one output of one INT8 figure against FP32."""

    max_abs: float = 0.0
    sum_abs: float = 0.0
    n_values: int = 0
    sum_cos: float = 0.0
    n_samples: int = 0
    top1_same: int = 0
    top5_same: int | None = None  # FP32's top-1 class among the INT8 top-5 (more than 5 classes)
    top1_correct: int = 0
    n_top1: int = 0

    def update(self, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, classify: bool) -> None:
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        err = np.abs(ref64 - out64)
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        self.sum_abs += float(err.sum())
        self.n_values += err.size
        cos = sample_cosines(ref64, out64)
        self.sum_cos += float(cos.sum())
        self.n_samples += cos.shape[0]
        if classify:
            best = ref.argmax(-1)
            self.top1_same += int((best == out.argmax(-1)).sum())
            if ref.shape[-1] > 5:
                top5 = np.argpartition(-out, 5, axis=-1)[..., :5]
                self.top5_same = (self.top5_same or 0) + int((top5 == best[..., None]).any(axis=-1).sum())
            self.n_top1 += int(np.prod(ref.shape[:-1]))
            if labels is not None:
                self.top1_correct += int((out.argmax(-1) == labels).sum())

    def summary(self, with_labels: bool, classify: bool) -> dict:
        row = {"max_abs_err": self.max_abs, "mean_abs_err": self.sum_abs / max(self.n_values, 1),
               "cosine": self.sum_cos / max(self.n_samples, 1)}
        if classify:
            row["top1_agreement"] = 100.0 * self.top1_same / max(self.n_top1, 1)
            if self.top5_same is not None:
                row["top5_agreement"] = 100.0 * self.top5_same / max(self.n_top1, 1)
            if with_labels:
                row["top1_accuracy"] = 100.0 * self.top1_correct / max(self.n_top1, 1)
        return row


def sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (first axis) of `out` with `ref`; 1 where both are zero."""
    a = ref.astype(np.float64).reshape(ref.shape[0], -1)
    b = out.astype(np.float64).reshape(out.shape[0], -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0)


@dataclass
class Comparison:
    """Per output: FP32 figures and, per INT8 figure, its errors against FP32."""

    samples: int = 0
    outputs: dict[str, dict] = field(default_factory=dict)  # name -> {"fp32": {...}, "sim": {...}, "ort": {...}}

    def figure(self, name: str, key: str) -> dict[str, float]:
        return {fig: self.outputs[name][fig][key] for fig in FIGURES if key in self.outputs[name].get(fig, {})}


class OrtRunner(OnnxrtRunner):
    """OnnxrtRunner for numpy feeds only: its own infer_impl probes every feed for a torch tensor, which
    imports torch (seconds and hundreds of MB) wherever torch is installed."""

    def infer_impl(self, feed_dict):
        types = {i.name: i.type for i in self.sess.get_inputs()}
        feed_dict = {name: _as_input(value, types.get(name)) for name, value in feed_dict.items()}
        start = time.perf_counter()
        outputs = self.sess.run(None, feed_dict)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((meta.name, out) for meta, out in zip(self.sess.get_outputs(), outputs))


def _as_input(value: np.ndarray, ort_type: str | None) -> np.ndarray:
    """An empty array (a prefill's zero-length KV cache) in the type this model declares for it (an INT8 cache)."""
    if value.size or ort_type is None or not ort_type.startswith("tensor("):
        return value
    dtype = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(float16)": np.float16,
             "tensor(float)": np.float32}.get(ort_type)
    return value.astype(dtype) if dtype is not None else value


def is_classifier_output(shape: tuple, name: str) -> bool:
    """Logits: a float output whose last axis indexes classes (an embedding, a hidden state or a KV-cache tensor
    is not one)."""
    lower = name.lower()
    if any(word in lower for word in ("embed", "hidden", "pool", "feature", "present", "past_key", "cache")):
        return False
    return len(shape) >= 2 and (2 <= shape[-1] <= 1000 or "logit" in lower)


def compare_with_fp32(fp32: onnx.ModelProto, int8: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]],
                      labels: np.ndarray | None = None) -> Comparison:
    runners = [OrtRunner(runtime.session(fp32, optimize=True), name="fp32"),
               OrtRunner(runtime.session(int8, optimize=False), name="sim"),
               OrtRunner(runtime.session(int8, optimize=True), name="ort")]
    accs: dict[tuple[str, str], _Acc] = {}
    fp32_correct: dict[str, int] = {}
    classify: dict[str, bool] = {}
    result = Comparison()
    offset = 0
    for iteration in Comparator.run(runners, data_loader=batches, streaming=True):
        outs = {name: iters[0] for name, iters in iteration.items()}
        ref = outs["fp32"]
        n = next(iter(ref.values())).shape[0]
        batch_labels = labels[offset:offset + n] if labels is not None else None
        offset += n
        result.samples += n
        for name in ref.keys():
            r = np.asarray(ref[name])
            if not all(np.issubdtype(np.asarray(outs[fig][name]).dtype, np.floating) for fig in FIGURES):
                continue  # an INT8 KV cache output: its effect shows in the logits of the next decode steps
            classify.setdefault(name, is_classifier_output(r.shape, name))
            if classify[name] and batch_labels is not None and r.ndim == 2:
                fp32_correct[name] = fp32_correct.get(name, 0) + int((r.argmax(-1) == batch_labels).sum())
            for fig in FIGURES:
                accs.setdefault((name, fig), _Acc()).update(r, np.asarray(outs[fig][name]),
                                                            batch_labels if r.ndim == 2 else None, classify[name])
    for (name, fig), acc in sorted(accs.items()):
        with_labels = labels is not None and name in fp32_correct
        entry = result.outputs.setdefault(name, {"fp32": {}, "classifier": classify[name]})
        entry[fig] = acc.summary(with_labels, classify[name])
        if with_labels:
            entry["fp32"]["top1_accuracy"] = 100.0 * fp32_correct[name] / max(result.samples, 1)
    return result


def max_relative_error(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """max |a - b| / max |a| over all outputs, both models run literally (no ORT rewrites)."""
    outs_a = runtime.session(a, optimize=False).run(None, feeds)
    outs_b = runtime.session(b, optimize=False).run(None, feeds)
    worst = 0.0
    for x, y in zip(outs_a, outs_b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max(initial=0.0) / max(np.abs(x).max(initial=0.0), 1e-12)))
    return worst
