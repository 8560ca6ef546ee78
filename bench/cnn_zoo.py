"""CNN zoo: a robustness sweep of trtglm's hard-CNN techniques over architectures they were not developed on.

The unsigned grid, `--explicit-pads`, equalization, bias correction, AdaRound and the accuracy budget were developed
on EfficientNet-Lite. This bench builds small networks in the styles of MobileNetV2 (ReLU6, depthwise, inverted
residuals), MobileNetV3 (hardswish, squeeze-excitation with hardsigmoid), ResNet (7x7 stem, padded max-pool, basic
blocks, strided 1x1 shortcuts), DenseNet (concatenation, pre-activation BatchNorm, average pooling) and ShuffleNetV2
(channel split, shuffle by Reshape/Transpose) in torch, with random weights and randomized BatchNorm statistics (no
download), exports each as PyTorch does (implicit padding, opset 17), and runs `trtglm build --int8` in each mode on
smooth random 64x64 images. Per build: exit status and last output line when it fails, the FP32 passes' rewrites,
the unsigned tensors, the optimized FP32 graph's max relative error and the INT8 logits cosine (sim, ort). Random
weights make the accuracy a smoke signal: it catches crashes and silent breakage, not quantization quality.

    .venv-bench/bin/python bench/cnn_zoo.py [--archs mbv2,resnet] [--modes int8,all]    # about 5 minutes

Results: bench/results/cnn_zoo.{json,md}; builds and logs under --work (default /tmp/trtglm-cnn-zoo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import REPO, run_child, trtglm_exe

ALL = ["--bias-correction", "sequential", "--weight-rounding", "adaround", "--explicit-pads"]
MODES = {"int8": [], "explicit-pads": ["--explicit-pads"], "equalize": ["--equalize"],
         "analytic": ["--bias-correction", "analytic"], "all": ALL, "all+budget": ALL + ["--accuracy-budget", "0.0005"]}
SIZE = 64


def architectures() -> dict:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def cbr(i, o, k=3, s=1, g=1, act=nn.ReLU6):
        return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o),
                             act() if act else nn.Identity())

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * F.hardsigmoid(self.b(F.relu(self.a(F.adaptive_avg_pool2d(x, 1)))))

    class InvertedResidual(nn.Module):
        def __init__(self, i, o, stride, expand, act, se):
            super().__init__()
            h = i * expand
            self.body = nn.Sequential(cbr(i, h, 1, act=act), cbr(h, h, 3, stride, h, act=act),
                                      SE(h) if se else nn.Identity(), cbr(h, o, 1, act=None))
            self.residual = stride == 1 and i == o

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    def mobilenet(act, se):
        blocks = [InvertedResidual(i, o, s, e, act, se) for i, o, s, e in
                  ((16, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6), (32, 32, 1, 6))]
        return nn.Sequential(cbr(3, 16, 3, 2, act=act), *blocks, cbr(32, 128, 1, act=act), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(128, 10))

    class Basic(nn.Module):
        def __init__(self, i, o, stride):
            super().__init__()
            self.a, self.b = cbr(i, o, 3, stride, act=nn.ReLU), cbr(o, o, 3, act=None)
            self.shortcut = cbr(i, o, 1, stride, act=None) if stride != 1 or i != o else nn.Identity()

        def forward(self, x):
            return F.relu(self.b(self.a(x)) + self.shortcut(x))

    class Dense(nn.Module):
        def __init__(self, i, growth):
            super().__init__()
            self.layer = nn.Sequential(nn.BatchNorm2d(i), nn.ReLU(), nn.Conv2d(i, growth, 3, 1, 1, bias=False))

        def forward(self, x):
            return torch.cat([x, self.layer(x)], 1)

    class Shuffle(nn.Module):
        def __init__(self, c):
            super().__init__()
            h = c // 2
            self.branch = nn.Sequential(cbr(h, h, 1, act=nn.ReLU), cbr(h, h, 3, g=h, act=None), cbr(h, h, 1, act=nn.ReLU))

        def forward(self, x):
            a, b = x.chunk(2, 1)
            y = torch.cat([a, self.branch(b)], 1)
            n, c, hh, ww = y.shape
            return y.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)

    return {
        "mobilenetv2": lambda: mobilenet(nn.ReLU6, False),
        "mobilenetv3": lambda: mobilenet(nn.Hardswish, True),
        "resnet": lambda: nn.Sequential(cbr(3, 16, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1), Basic(16, 16, 1),
                                        Basic(16, 32, 2), Basic(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(64, 10)),
        "densenet": lambda: nn.Sequential(cbr(3, 16, 3, 2, act=nn.ReLU), Dense(16, 8), Dense(24, 8),
                                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.AvgPool2d(2),
                                          Dense(16, 8), Dense(24, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                          nn.Linear(32, 10)),
        "shufflenetv2": lambda: nn.Sequential(cbr(3, 24, 3, 2, act=nn.ReLU), Shuffle(24), Shuffle(24),
                                              cbr(24, 48, 3, 2, act=nn.ReLU), Shuffle(48), nn.AdaptiveAvgPool2d(1),
                                              nn.Flatten(), nn.Linear(48, 10)),
    }


def export(name: str, folder: Path) -> Path:
    """The architecture with random weights and BatchNorm statistics like a trained network's, as ONNX, plus
    calibration and evaluation images (low-frequency noise with a little pixel noise)."""
    import torch

    torch.manual_seed(0)
    model = architectures()[name]()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.05)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    model.eval()
    path = folder / "model.onnx"
    torch.onnx.export(model, torch.randn(1, 3, SIZE, SIZE), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    rng = np.random.default_rng(0)
    for split, n in (("calib", 64), ("eval", 128)):
        coarse = rng.standard_normal((n, 3, SIZE // 4, SIZE // 4)).astype(np.float32)
        images = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
        images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
        (folder / split).mkdir(exist_ok=True)
        np.save(folder / split / "input.npy", images)
    return path


def build(model: Path, mode: str, work: Path, timeout: float) -> dict:
    out = work / f"out-{mode}"
    cmd = [trtglm_exe(), "build", str(model), "--int8", "--calib", str(model.parent / "calib"), "--eval",
           str(model.parent / "eval"), "--out", str(out), "--backend", "onnxruntime"] + MODES[mode]
    log = work / f"{mode}.log"
    child = run_child(cmd, log, timeout)
    row = {"mode": mode, "rc": child["rc"], "seconds": round(child["process_s"], 1)}
    if child["rc"] != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        row["error"] = lines[-1][:200] if lines else "no output"
        return row
    rep = json.loads((out / "report.json").read_text())
    logits = rep["accuracy"]["outputs"]["logits"]
    row.update(rewrites={k: v for k, v in rep["passes"].items() if v and k in ("explicit_pads", "fold_batchnorm")},
               unsigned=len(rep["quantization"]["unsigned_activations"]),
               signed_non_negative=len(rep["quantization"]["signed_non_negative"]),
               int8_mac_fraction=rep["quantization"]["int8_mac_fraction"],
               fp32_max_rel_err=rep["accuracy"]["fp32_optimized_max_rel_err"],
               cosine_sim=logits["sim"]["cosine"], cosine_ort=logits["ort"]["cosine"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | mode | exit | unsigned | non-negative left signed | INT8 MACs | FP32 max rel err | "
             "cosine sim | cosine ort | s |", "|" + "---|" * 10]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['arch']} | {r['mode']} | {r['rc']}: {r.get('error', '')} | | | | | | | "
                         f"{r['seconds']} |")
            continue
        lines.append(f"| {r['arch']} | {r['mode']} | 0 | {r['unsigned']} | {r['signed_non_negative']} | "
                     f"{100 * r['int8_mac_fraction']:.1f}% | {r['fp32_max_rel_err']:.1e} | {r['cosine_sim']:.5f} | "
                     f"{r['cosine_ort']:.5f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(architectures()))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/trtglm-cnn-zoo"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    archs, modes = args.archs.split(","), args.modes.split(",")
    unknown = [a for a in archs if a not in architectures()] + [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown {unknown}: architectures {list(architectures())}, modes {list(MODES)}")
    rows = []
    for arch in archs:
        work = args.work / arch
        work.mkdir(parents=True, exist_ok=True)
        model = export(arch, work)
        for mode in modes:
            row = {"arch": arch, **build(model, mode, work, args.timeout)}
            rows.append(row)
            state = row.get("error") or (f"unsigned {row['unsigned']}, cosine sim {row['cosine_sim']:.5f}, "
                                         f"ort {row['cosine_ort']:.5f}")
            print(f"{arch:13} {mode:14} exit {row['rc']}: {state} ({row['seconds']} s)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cnn_zoo.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.results / "cnn_zoo.md").write_text(markdown(rows))
    print(markdown(rows))
    failed = [f"{r['arch']}/{r['mode']}" for r in rows if r["rc"] != 0]
    print(f"{len(rows) - len(failed)}/{len(rows)} builds succeeded" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
