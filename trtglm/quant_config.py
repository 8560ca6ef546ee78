"""The quantization decisions of a build, as an editable JSON file (`quant_config.json`; `--quant-config FILE`).

Why: automatic choices (SmoothQuant strengths, calibration methods, layers kept in float by the accuracy budget)
must be reviewable and pinnable. Every build writes what it decided; feeding the file back with `--quant-config`
reproduces those decisions without searching again, and a user can edit any entry:

    {"format": "trtglm-quant-config/1",
     "layers":      [{"node": "/encoder/layer.0/query/MatMul", "op": "MatMul", "precision": "int8" | "float", ...}],
     "activations": [{"tensor": "/encoder/layer.0/LayerNorm_output_0", "smoothquant": 0.8 | null,
                      "method": "entropy" | "minmax" | "percentile" | "mse", ...}]}

Other keys (MACs, sensitivity, amax, errors) are information for the reader and are ignored on input. Layers and
activations the file does not list get the automatic choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trtglm.calib.methods import METHODS
from trtglm.errors import ConfigError
from trtglm.onnx_io import atomic_path

FORMAT = "trtglm-quant-config/1"
PRECISIONS = ("int8", "float")


@dataclass
class QuantConfig:
    precision: dict[str, str] = field(default_factory=dict)  # node name -> int8 | float
    smoothquant: dict[str, float | None] = field(default_factory=dict)  # activation tensor -> alpha (None: off)
    method: dict[str, str] = field(default_factory=dict)  # activation tensor -> calibration method

    @property
    def keep_float(self) -> frozenset[str]:
        return frozenset(n for n, p in self.precision.items() if p == "float")


def read(path: Path, nodes: set[str], tensors: set[str]) -> QuantConfig:
    """Parse and check FILE against the model's node and tensor names; one-line errors name the entry."""
    where = f"--quant-config {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{where}: expected an object with \"format\": \"{FORMAT}\"")
    cfg = QuantConfig()
    for i, entry in enumerate(_entries(data, "layers", where)):
        node = _name(entry, "node", nodes, f"{where}: layers[{i}]")
        if "precision" in entry:
            if entry["precision"] not in PRECISIONS:
                raise ConfigError(f"{where}: layers[{i}] ('{node}'): precision {entry['precision']!r}; "
                                  f"choose one of {', '.join(PRECISIONS)}")
            cfg.precision[node] = entry["precision"]
    for i, entry in enumerate(_entries(data, "activations", where)):
        tensor = _name(entry, "tensor", tensors, f"{where}: activations[{i}]")
        if "smoothquant" in entry:
            alpha = entry["smoothquant"]
            if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
                raise ConfigError(f"{where}: activations[{i}] ('{tensor}'): smoothquant {alpha!r}; "
                                  "give an alpha in [0, 1] or null")
            cfg.smoothquant[tensor] = None if alpha is None else float(alpha)
        if "method" in entry:
            if entry["method"] not in METHODS:
                raise ConfigError(f"{where}: activations[{i}] ('{tensor}'): method {entry['method']!r}; "
                                  f"choose one of {', '.join(METHODS)}")
            cfg.method[tensor] = entry["method"]
    return cfg


def write(path: Path, layers: list[dict], activations: list[dict]) -> Path:
    text = json.dumps({"format": FORMAT, "layers": layers, "activations": activations}, indent=1, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def _entries(data: dict, key: str, where: str) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{where}: \"{key}\" must be a list of objects")
    return entries


def _name(entry: dict, key: str, known: set[str], where: str) -> str:
    name = entry.get(key)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: missing \"{key}\"")
    if name not in known:
        raise ConfigError(f"{where}: {key} '{name}' is not in the model")
    return name
