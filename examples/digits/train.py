"""Train the bundled example model: a small ResNet-style CNN on scikit-learn's 8x8 digits (no downloads).

    python examples/digits/train.py --out calibration/digits [--force]

Writes into --out:
    digits_cnn.onnx     FP32 model; input 'input' (N, 1, 8, 8) float32, output 'logits' (N, 10); opset 17, dynamic
                        batch axis 'batch', BatchNormalization nodes kept (trtglm's fusion pass folds them)
    calib/input.npy     300 calibration samples, preprocessed exactly like the model input
    eval/input.npy      297 held-out samples (disjoint from training and calibration data)
    eval/labels.npy     their int64 class labels

Preprocessing: x = (pixels / 16 - MEAN) / STD with the constants below (pixels are 0..16).
Everything is seeded and runs on a fixed number of threads with deterministic algorithms, so a re-run on the same
machine writes the same bytes. Training takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

try:
    import trtglm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import onnx  # noqa: E402

from trtglm.export.torch_export import InputArg, onnx_from_torch  # noqa: E402
from trtglm.onnx_io import atomic_path  # noqa: E402

MEAN = 0.3053  # mean of all digits pixels / 16
STD = 0.3760  # their standard deviation
SEED = 0
N_EVAL = 297
N_CALIB = 300  # the remaining 1200 images train the model
THREADS = 2  # fixed, so that results do not depend on the machine's core count

EPOCHS = 40
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 5e-4

OUTPUTS = ("digits_cnn.onnx", "calib/input.npy", "eval/input.npy", "eval/labels.npy")


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus a shortcut (identity, or a strided 1x1 Conv-BN projection), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + skip)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = ResidualBlock(width, width)  # 8x8
        self.block2 = ResidualBlock(width, 2 * width, stride=2)  # 4x4, projection shortcut
        self.block3 = ResidualBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def split_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded split into train / calib / eval; images as float32 in [0, 1], shape (N, 1, 8, 8)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, eval_idx = train_test_split(index, test_size=N_EVAL, stratify=labels, random_state=SEED)
    train_idx, calib_idx = train_test_split(rest, test_size=N_CALIB, stratify=labels[rest], random_state=SEED)
    return {name: (images[idx], labels[idx]) for name, idx in
            (("train", train_idx), ("calib", calib_idx), ("eval", eval_idx))}


def normalize(images):
    return (images - MEAN) / STD


def shift_by_one(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Move each image by -1, 0 or +1 pixel on each axis (zero fill): light, label-preserving augmentation."""
    padded = F.pad(images, (1, 1, 1, 1))
    crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    choice = torch.randint(0, 9, (images.shape[0],), generator=gen)
    return crops[choice, torch.arange(images.shape[0])]


def train(train_x: np.ndarray, train_y: np.ndarray) -> DigitsCNN:
    gen = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, epochs=EPOCHS,
                                                   steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            inputs = normalize(shift_by_one(x[batch], gen))
            loss = F.cross_entropy(model(inputs), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def onnx_top1(path: Path, inputs: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": inputs})
    return top1(logits, labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("calibration/digits"), help="output directory")
    parser.add_argument("--force", action="store_true", help="retrain and rewrite even if the outputs exist")
    args = parser.parse_args(argv)
    out: Path = args.out
    if not args.force and all((out / name).is_file() for name in OUTPUTS):
        print(f"{out}: digits example already present (use --force to rebuild)")
        return 0

    started = time.perf_counter()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    data = split_data()
    calib_x = normalize(data["calib"][0]).astype(np.float32)
    eval_x, eval_y = normalize(data["eval"][0]).astype(np.float32), data["eval"][1]
    save_npy(out / "calib" / "input.npy", calib_x)
    save_npy(out / "eval" / "input.npy", eval_x)
    save_npy(out / "eval" / "labels.npy", eval_y)

    model = train(*data["train"])
    trained = time.perf_counter()
    with torch.no_grad():
        fp32_top1 = top1(model(torch.from_numpy(eval_x)).numpy(), eval_y)

    onnx_path = out / "digits_cnn.onnx"
    result = onnx_from_torch(model, [InputArg("input", (1, 1, 8, 8), "float32")], onnx_path, dynamic_batch=True,
                             opset=17, dynamo=False, output_names=("logits",), keep_batchnorm=True)
    ops = Counter(node.op_type for node in onnx.load(str(onnx_path)).graph.node)
    if not ops["BatchNormalization"]:
        print(f"{onnx_path}: the exporter folded BatchNormalization; the example needs it kept", file=sys.stderr)
        return 1
    ort_top1 = onnx_top1(onnx_path, eval_x, eval_y)

    print(f"trained on {len(data['train'][1])} images in {trained - started:.1f} s "
          f"({EPOCHS} epochs, {THREADS} threads)")
    print(f"FP32 top-1 on {len(eval_y)} held-out images: torch {fp32_top1:.2%}, ONNX Runtime {ort_top1:.2%}")
    print(f"{onnx_path}: {result.exporter} exporter, opset {result.opset}, "
          + ", ".join(f"{n} {op}" for op, n in sorted(ops.items())))
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
