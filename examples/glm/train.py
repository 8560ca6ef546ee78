"""Train the tiny example GLM (examples/glm/config.json) on Python's standard-library docstrings (no downloads).

    python examples/glm/train.py --out calibration/glm

A GlmForCausalLM with GQA and GLM's partial rotary embedding, small enough to train on two CPU cores in about two
minutes, so that its next-token logits are peaked like a real language model's rather than flat like random
weights' (the hard and unrealistic case for INT8 calibration). Tokens are bytes: ids 0..255 are the UTF-8 bytes,
256 pad, 257 bos, 258 eos (written after every docstring), 259 unk (unused).

Writes into --out:
    config.json, model.safetensors, generation_config.json   save_pretrained of the trained model
    eval/tokens.npy     int64 (64, 128): a held-out token stream, from docstrings not used for training
    calib/tokens.npy    int64 (64, 128): another held-out stream, disjoint from training and eval

Every 10th docstring goes to eval, every 10th from the 5th to calib, the rest to training. Everything is seeded,
runs on a fixed number of threads with deterministic algorithms and a fixed number of steps, so a re-run on the
same machine and Python version writes the same weights; --max-seconds only cuts a run short on a slow machine.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import GlmConfig, GlmForCausalLM

SEED = 0
THREADS = 2  # fixed, so that results do not depend on the machine's core count
SEQ = 128
BATCH = 16
STEPS = 2400
LR = 3e-3
WARMUP = 20
WEIGHT_DECAY = 0.01
LOG_EVERY = 200
N_ROWS = 64  # rows of SEQ tokens in eval/ and in calib/
EOS = 258
CONFIG = Path(__file__).with_name("config.json")
MODULES = ("argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "builtins", "bz2", "calendar",
           "cmd", "codecs", "collections", "collections.abc", "colorsys", "concurrent.futures", "configparser",
           "contextlib", "copy", "cProfile", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
           "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
           "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser",
           "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
           "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "netrc",
           "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "plistlib", "pprint", "profile",
           "pstats", "pydoc", "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
           "signal", "smtplib", "socket", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
           "symtable", "sys", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
           "tokenize", "trace", "traceback", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request",
           "uuid", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo")


def docstrings() -> list[str]:
    """The docstrings of MODULES, their public classes and functions and those classes' public methods: in a
    fixed order, each once."""
    seen, out = set(), []

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            out.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io, typing.re
        for name in MODULES:
            module = importlib.import_module(name)
            add(module)
            for attr in sorted(dir(module)):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                add(obj)
                if inspect.isclass(obj) and obj.__module__ == module.__name__:
                    for method in sorted(vars(obj)):
                        if not method.startswith("_"):
                            add(getattr(obj, method, None))
    return out


def tokens(docs: list[str]) -> np.ndarray:
    """One int64 stream: each docstring's UTF-8 bytes followed by EOS."""
    return np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8).astype(np.int64), EOS) for d in docs])


def rows(stream: np.ndarray, what: str) -> np.ndarray:
    if stream.size < N_ROWS * SEQ:
        sys.exit(f"error: the {what} stream has {stream.size} tokens, {N_ROWS * SEQ} needed")
    return stream[: N_ROWS * SEQ].reshape(N_ROWS, SEQ)


@torch.no_grad()
def evaluate(model: GlmForCausalLM, ids: np.ndarray) -> tuple[float, float, float]:
    """Next-token cross-entropy (nats), top-1 accuracy and mean max-softmax probability over every position."""
    x = torch.from_numpy(ids)
    out = model(input_ids=x, labels=x)
    top, pred = out.logits[:, :-1].softmax(-1).max(-1)
    return out.loss.item(), (pred == x[:, 1:]).double().mean().item(), top.mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("calibration/glm"))
    parser.add_argument("--config", type=Path, default=CONFIG, help="a GlmConfig JSON file")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop training early past this wall time")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    docs = docstrings()
    train = tokens([d for i, d in enumerate(docs) if i % 10 not in (0, 5)])
    held_out = {"eval": rows(tokens(docs[0::10]), "eval"), "calib": rows(tokens(docs[5::10]), "calib")}

    config = GlmConfig.from_json_file(args.config)
    model = GlmForCausalLM(config)
    random_loss, _, random_top = evaluate(model.eval(), held_out["eval"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(SEED)
    stream = torch.from_numpy(train)
    print(f"{len(docs)} docstrings: {train.size} training tokens, held-out eval/calib {N_ROWS}x{SEQ} each; "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    model.train()
    t0, step, last = time.perf_counter(), 0, float("nan")
    while step < args.steps and time.perf_counter() - t0 < args.max_seconds:
        starts = torch.randint(0, stream.numel() - SEQ, (BATCH,), generator=generator)
        x = torch.stack([stream[s: s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        last = loss.item()
        if step % LOG_EVERY == 0 or step == args.steps:
            print(f"step {step:4d}  loss {last:.3f}  {time.perf_counter() - t0:5.1f} s", flush=True)
    if step < args.steps:
        print(f"warning: stopped at step {step} of {args.steps} after {args.max_seconds:.0f} s: "
              "these weights are not the deterministic result of a full run")
    train_time = time.perf_counter() - t0

    model.eval()
    eval_loss, eval_acc, eval_top = evaluate(model, held_out["eval"])
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for split, ids in held_out.items():
        (args.out / split).mkdir(exist_ok=True)
        np.save(args.out / split / "tokens.npy", ids)
    print(f"trained {step} steps in {train_time:.1f} s; last train loss {last:.3f}; held-out: loss {eval_loss:.3f} "
          f"nats/byte (random weights {random_loss:.3f}), next-byte top-1 accuracy {eval_acc:.3f}, mean max-softmax "
          f"{eval_top:.3f} (random weights {random_top:.4f}, 1/{config.vocab_size} = {1 / config.vocab_size:.4f}); "
          f"wrote {args.out}; {time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
