"""Calibration and evaluation data readers: `<input>.npy` per input (axis 0 indexes samples), `.npz` batches,
images with a `--preprocess` spec, or a script returning batches. Every file is checked against the model up front,
so a bad sample fails in a second with a message naming the file and tensor, not in ONNX Runtime an hour in.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from PIL import Image

from trtglm.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELS = "labels"  # array / file name holding integer ground-truth labels; never a model input


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str | None, ...]  # int: static, str: symbolic, None: unknown
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in (vi for vi in model.graph.input if vi.name not in inits):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


class Dataset:
    """Units are samples (.npy, images: batched here; a static batch axis in the model overrides batch_size and drops
    a short last batch) or whole batches (.npz, script: yielded as they are). `read(group)`: arrays in spec order."""

    def __init__(self, source: str, specs: list[InputSpec], n: int, read: Callable[[list[int]], list[np.ndarray]],
                 read_labels: Callable[[list[int]], np.ndarray] | None = None, per_sample: bool = False):
        self.source, self.specs, self._n, self._read, self._read_labels = source, specs, n, read, read_labels
        self.per_sample, self.has_labels = per_sample, read_labels is not None
        fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)} if per_sample else set()
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        if self.fixed_batch and self.fixed_batch > n:
            raise DataError(f"{source}: fewer samples than the model's fixed batch size {self.fixed_batch}")

    def __len__(self) -> int:
        return self._n

    def groups(self, indices: Sequence[int], batch_size: int) -> list[list[int]]:
        """The unit indices that make up each batch, in order."""
        if not self.per_sample:
            return [[int(i)] for i in indices]
        bs = self.fixed_batch or batch_size
        out = [[int(i) for i in indices[s:s + bs]] for s in range(0, len(indices), bs)]
        return out[:-1] if self.fixed_batch and out and len(out[-1]) < bs else out

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for group in self.groups(indices, batch_size):
            yield self.batch(group)

    def batch(self, group: list[int]) -> dict[str, np.ndarray]:
        """The batch made of the units `group` (one entry of `groups`)."""
        return {s.name: np.ascontiguousarray(a, dtype=s.dtype) for s, a in zip(self.specs, self._read(group))}

    def labels(self, indices: Sequence[int]) -> np.ndarray | None:
        """Labels in the order `batches` yields samples (any batch_size gives the same order)."""
        if not self.has_labels:
            return None
        parts = [np.asarray(self._read_labels(g)) for g in self.groups(indices, 1)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def batch_count(dataset: Dataset, indices: Sequence[int], batch_size: int) -> int:
    return len(dataset.groups(indices, batch_size))


def split(n: int, eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (calibration, evaluation) indices; evaluation is a seeded random subset."""
    if n < 2 or eval_fraction <= 0.0:
        return list(range(n)), []
    k = min(max(int(round(n * eval_fraction)), 1), n - 1)
    held = {int(i) for i in np.random.default_rng(seed).choice(n, size=k, replace=False)}
    return [i for i in range(n) if i not in held], sorted(held)


def open_dataset(path: Path | None, specs: list[InputSpec], preprocess: str | None = None,
                 script: str | None = None, what: str = "calibration", check: bool = True) -> Dataset:
    """Detect the layout of `path` (or load `script`) and validate every file against `specs`. check=False skips
    the passes that read every sample (NaN/Inf scans, per-file checks): for a worker re-opening data the driver has
    already validated (--executor ray)."""
    if script is not None:
        return _script_dataset(script, specs, what)
    if path is None:
        raise DataError(f"no {what} data given: pass a data directory or a script FILE.py:fn")
    path, where = Path(path), f"{what} directory {path}/"
    if not path.is_dir():
        raise DataError(f"{where}: not found" if not path.exists() else f"{where}: not a directory")
    files = sorted(p for p in path.iterdir() if p.is_file())
    by = {k: [p for p in files if p.suffix.lower() in sfx]
          for k, sfx in (("npy", (".npy",)), ("npz", (".npz",)), ("image", IMAGE_SUFFIXES))}
    if [p.name for p in by["npy"]] == [LABELS + ".npy"] and by["image"]:
        by["npy"] = []  # labels.npy beside images holds their labels
    kinds = [k for k, v in by.items() if v]
    if len(kinds) != 1:
        raise DataError(f"{where}: mixes {' and '.join(kinds)} files; keep one layout per directory" if kinds
                        else f"{where}: no .npy, .npz or image files found")
    if preprocess is not None and kinds[0] != "image":
        raise ConfigError(f"--preprocess applies to image directories; {path}/ holds {kinds[0]} files")
    if kinds[0] == "npy":
        return _npy_dataset(path, by["npy"], specs, what, check)
    if kinds[0] == "npz":
        units = [(f"{what} sample {p}", p) for p in by["npz"]]
        return _batch_dataset(f"{len(units)} .npz batches from {path}/", specs, units, check)
    return _image_dataset(path, by["image"], specs, preprocess, what, check)


def _fmt(shape) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_names(names, specs: list[InputSpec], where: str, suffix: str = "") -> None:
    known = [s.name for s in specs]
    for name in names:
        if name not in known and name != LABELS:
            raise DataError(f"{where}: unknown input '{name}'{f' (file {name}{suffix})' if suffix else ''}; "
                            f"model inputs are: {', '.join(known)} ('{LABELS}' holds ground-truth labels)")
    for s in specs:
        if s.name not in names:
            found = ", ".join(n + suffix for n in sorted(names)) or "nothing"
            raise DataError(f"{where}: model input '{s.name}' missing{f' (no {s.name}{suffix})' if suffix else ''}"
                            f"; found: {found}")


def _check_array(dtype: np.dtype, shape: tuple, spec: InputSpec, where: str, per_sample: bool = False) -> None:
    """dtype and shape; per_sample compares a .npy file's shape[1:] with the model's shape[1:]."""
    want = spec.dtype
    if not (dtype.kind == "f" if want.kind == "f" else dtype.kind in "iub" and np.can_cast(dtype, want, "safe")):
        raise DataError(f"{where}: input '{spec.name}' has dtype {dtype}, model expects {want}")
    model = spec.shape[1:] if per_sample else spec.shape
    if len(shape) != len(model) or any(isinstance(m, int) and d != m for d, m in zip(shape, model)):
        if per_sample:
            raise DataError(f"{where}: input '{spec.name}' has samples of shape {_fmt(shape)}, model expects "
                            f"{_fmt(model)} per sample (input {_fmt(spec.shape)}; axis 0 of the file indexes samples)")
        raise DataError(f"{where}: input '{spec.name}' has shape {_fmt(shape)}, model expects {_fmt(model)}")


def _check_finite(arr: np.ndarray, name: str, where: str, offset: int = 0) -> None:
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, 1)).all(axis=1)
        if bad.any():
            raise DataError(f"{where}: input '{name}' holds NaN or Inf (first in sample {offset + int(bad.argmax())})")


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataError(f"{where}: '{LABELS}' must be a 1-D integer array, got {labels.dtype} {_fmt(labels.shape)}")
    if len(labels) != n:
        raise DataError(f"{where}: '{LABELS}' holds {len(labels)} labels for {n} samples")
    return labels


def _labels_file(root: Path, n: int, what: str) -> np.ndarray | None:
    path = root / (LABELS + ".npy")
    labels = _read(path, where := f"{what} data {path}") if path.is_file() else None
    return labels if labels is None else _check_labels(labels, n, where)


def _read(path: Path, where: str):
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{where}: unreadable {path.suffix} file ({_first_line(e)})") from e


def _npy_dataset(root: Path, files: list[Path], specs: list[InputSpec], what: str, check: bool = True) -> Dataset:
    """Header (dtype, shape) checks through mmap first, then a chunked NaN/Inf scan."""
    where, names = f"{what} directory {root}/", [p.stem for p in files]
    _check_names(names, specs, where, suffix=".npy")
    arrays = {p.stem: _read(p, f"{what} data {p}") for p in files if p.stem != LABELS}
    for s in specs:
        a, w = arrays[s.name], f"{what} data {root / (s.name + '.npy')}"
        if not a.ndim or not len(a):
            raise DataError(f"{w}: input '{s.name}' holds no samples (axis 0 of the file indexes samples)")
        _check_array(a.dtype, a.shape[1:], s, w, per_sample=True)
    counts = {s.name: len(arrays[s.name]) for s in specs}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: input files hold different sample counts "
                        f"({', '.join(f'{k}.npy: {v}' for k, v in counts.items())})")
    n = counts[specs[0].name]
    labels = _labels_file(root, n, what)
    for s in specs if check else ():
        a, step = arrays[s.name], max(1, (64 << 20) // max(1, arrays[s.name][:1].nbytes))  # 64 MiB chunks
        for start in range(0, n, step):
            _check_finite(np.asarray(a[start:start + step]), s.name, f"{what} data {root / (s.name + '.npy')}", start)
    return Dataset(f"{n} samples from {root}/ (.npy per input)", specs, n,
                   lambda g: [arrays[s.name][g] for s in specs], None if labels is None else lambda g: labels[g],
                   per_sample=True)


def _batch_dataset(source: str, specs: list[InputSpec], units: list[tuple[str, Path | dict]],
                   check: bool = True) -> Dataset:
    """Units that are whole batches: .npz files (one in memory at a time) or materialized script items."""
    def unit(i: int) -> dict[str, np.ndarray]:
        where, u = units[i]
        return _read(u, where) if isinstance(u, Path) else u

    has = []
    for i, (where, _) in enumerate(units if check else ()):  # unchecked: no labels either (calibration needs none)
        arrays = unit(i)
        _check_names(list(arrays), specs, where)
        for s in specs:
            _check_array(arrays[s.name].dtype, arrays[s.name].shape, s, where)
            _check_finite(arrays[s.name], s.name, where)
        if LABELS in arrays:
            lead = next((arrays[s.name].shape[0] for s in specs if arrays[s.name].ndim), len(arrays[LABELS]))
            _check_labels(arrays[LABELS], lead, where)
        has.append(LABELS in arrays)
    if any(has) and not all(has):
        raise DataError(f"{units[has.index(False)][0]}: no '{LABELS}' array, but other batches have one")
    return Dataset(source, specs, len(units), lambda g: [unit(g[0])[s.name] for s in specs],
                   (lambda g: unit(g[0])[LABELS]) if has and all(has) else None)


def _script_dataset(script: str, specs: list[InputSpec], what: str) -> Dataset:
    """`file.py:fn` (default fn: load_data): fn() returns an iterable of {input name: array} batches."""
    file, sep, fn = script.rpartition(":")
    if not sep or not fn.isidentifier():
        file, fn = script, "load_data"
    path, where = Path(file), f"{what} script {script}"
    if not path.is_file():
        raise DataError(f"{where}: file {path} not found")
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_trtglm_data_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        items = list(getattr(module, fn)())
    except Exception as e:  # import error, no such function, or fn() raised
        raise DataError(f"{where}: loading batches failed: {_first_line(e)}") from e
    if not items:
        raise DataError(f"{where}: {fn}() returned no batches")
    units = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"{where} batch {i}: got {type(item).__name__}, expected a dict of input name -> array")
        units.append((f"{where} batch {i}", {str(k): np.asarray(v) for k, v in item.items()}))
    return _batch_dataset(f"{len(units)} batches from script {script}", specs, units)


_HINTS = {"resize": "a positive integer (shorter side)", "crop": "N or HxW, positive integers",
          "mean": "numbers separated by ';'", "std": "non-zero numbers separated by ';'", "layout": "NCHW or NHWC"}


def parse_preprocess(text: str | None) -> dict:
    """`resize=256,crop=224,mean=0.485;0.456;0.406,std=0.229;0.224;0.225,layout=NCHW`; every key optional."""
    out: dict = {"resize": None, "crop": None, "mean": (0.0,), "std": (1.0,), "layout": None}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or key not in _HINTS:
            problem = f"unknown key {key!r}" if sep else "expected key=value"
            raise ConfigError(f"--preprocess {item!r}: {problem}; keys are {', '.join(_HINTS)}")
        try:
            if key in ("resize", "crop"):
                xs = tuple(int(x) for x in value.lower().split("x"))
                if min(xs) < 1 or len(xs) > (1 if key == "resize" else 2):
                    raise ValueError
                out[key] = xs[0] if key == "resize" else (xs * 2)[:2]  # crop: (H, W)
            elif key in ("mean", "std"):
                out[key] = tuple(float(x) for x in value.split(";"))
                if not np.isfinite(out[key]).all() or key == "std" and 0.0 in out[key]:
                    raise ValueError
            else:
                out[key] = {"NCHW": "NCHW", "NHWC": "NHWC"}[value.upper()]
        except (ValueError, KeyError):
            raise ConfigError(f"--preprocess {key}={value!r}: expected {_HINTS[key]}") from None
    return out


def _image_dataset(root: Path, files: list[Path], specs: list[InputSpec], preprocess: str | None,
                   what: str, check: bool = True) -> Dataset:
    """Pillow: RGB or L to match the model, resize (shorter side, bilinear), center crop, /255, mean/std."""
    where, pre, s = f"{what} directory {root}/", parse_preprocess(preprocess), specs[0]
    if len(specs) != 1 or len(s.shape) != 4 or s.dtype.kind != "f":
        raise DataError(f"{where}: images feed a model with one 4-D float input; model inputs are: "
                        + ", ".join(f"'{x.name}' {x.dtype} {_fmt(x.shape)}" for x in specs))
    layout = pre["layout"] or ("NHWC" if s.shape[3] in (1, 3) and s.shape[1] not in (1, 3) else "NCHW")
    c, h, w = (s.shape[1], s.shape[2], s.shape[3]) if layout == "NCHW" else (s.shape[3], s.shape[1], s.shape[2])
    if isinstance(c, int) and c not in (1, 3):
        raise ConfigError(f"--preprocess layout={layout}: input '{s.name}' {_fmt(s.shape)} has {c} channels; "
                          "images give 1 (grayscale) or 3 (RGB)")
    channels, mean, std = 1 if c == 1 else 3, np.float32(pre["mean"]), np.float32(pre["std"])
    for key in ("mean", "std"):
        if len(pre[key]) not in (1, channels):
            raise ConfigError(f"--preprocess {key}: give 1 or {channels} values for input '{s.name}'")
    crop = pre["crop"]

    def geometry(size: tuple[int, int], where: str) -> tuple[tuple[int, int], tuple | None]:
        (iw, ih), r = size, pre["resize"]
        rw, rh = ((r, max(1, round(ih * r / iw))) if iw <= ih else (max(1, round(iw * r / ih)), r)) if r else size
        if crop and (crop[0] > rh or crop[1] > rw):
            raise DataError(f"{where}: input '{s.name}': {rh}x{rw} after resize < crop {crop[0]}x{crop[1]}")
        box = (x := (rw - crop[1]) // 2, y := (rh - crop[0]) // 2, x + crop[1], y + crop[0]) if crop else None
        return (rw, rh), box

    first = None
    for p in files if check else ():
        try:
            with Image.open(p) as im:
                size = im.size
                im.verify()  # catches truncated or corrupt files without decoding them
        except Exception as e:
            raise DataError(f"{what} image {p}: unreadable image ({_first_line(e)})") from e
        (rw, rh), box = geometry(size, f"{what} image {p}")
        fh, fw = crop or (rh, rw)
        first = first or (fh, fw)  # dynamic H/W: every image must match the first one
        want = (h if isinstance(h, int) else first[0], w if isinstance(w, int) else first[1])
        if (fh, fw) != want:
            raise DataError(f"{what} image {p}: input '{s.name}' gets a {fh}x{fw} image, model expects {want[0]}x"
                            f"{want[1]} (input {_fmt(s.shape)}; one size for all); set --preprocess resize=..,crop=..")

    def load(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                (rw, rh), box = geometry(im.size, f"{what} image {p}")
                im = im.resize((rw, rh), Image.Resampling.BILINEAR) if (rw, rh) != im.size else im
                a = np.asarray(im.crop(box) if box else im, dtype=np.float32) / np.float32(255.0)
        except Exception as e:
            raise DataError(f"{what} image {p}: unreadable image ({_first_line(e)})") from e
        a = (a.reshape(a.shape[0], a.shape[1], -1) - mean) / std
        return a.transpose(2, 0, 1) if layout == "NCHW" else a

    labels = _labels_file(root, len(files), what)
    return Dataset(f"{len(files)} images from {root}/ ({preprocess or 'no preprocessing'}, {layout})", specs,
                   len(files), lambda g: [np.stack([load(files[i]) for i in g])],
                   None if labels is None else lambda g: labels[g], per_sample=True)
