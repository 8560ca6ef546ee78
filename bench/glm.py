"""GLM end to end: export with a KV cache, greedy decode vs transformers, INT8 and weight-only INT4 accuracy, and
the KV cache's speedup, on the tiny trained GLM of examples/glm and on a random-weight GLM of the same shape.

    python bench/glm.py            # trains examples/glm into calibration/glm first if it is missing (~2 min)

Every step runs the trtglm CLI as a user would (export, build, bench-decode); the bench compares against
transformers itself for the decode check. Accuracy of a build is its report's `logits` row on the held-out byte
stream (prefill, teacher forcing: every position's next-token prediction): top-1 agreement with FP32 and the cosine
of each sequence's logits; and the same through 64 decode steps with the KV cache (4 prompts, fed FP32's greedy
tokens), which is where an INT8 cache shows. Results: bench/results/glm.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "glm" / "config.json"
PROMPT_LEN, NEW_TOKENS, PROMPTS = 16, 16, 4


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=REPO / "calibration" / "glm")
    p.add_argument("--work", type=Path, default=REPO / "out" / "glm-bench")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if not (args.weights / "model.safetensors").is_file():
        _run([sys.executable, str(REPO / "examples" / "glm" / "train.py"), "--out", str(args.weights)])
    data = _token_dirs(args.weights, args.work / "data")
    rows, facts = [], {}
    for label, weights in (("trained", args.weights), ("random", None)):
        fp32 = args.work / label / "fp32"
        cmd = ["export", "--hf-config", str(CONFIG), "-o", str(fp32)]
        _trtglm(cmd + (["--weights", str(weights)] if weights else []))
        if weights is not None:
            facts["decode_check"] = _decode_check(weights, fp32, np.load(args.weights / "eval" / "tokens.npy"))
            facts["bench_decode"] = _bench_decode(fp32)
        stream = np.load(args.weights / "eval" / "tokens.npy")
        for mode, flags in (("int8", ["--calib", str(data / "calib")]),
                            ("int8, KV cache int8", ["--calib", str(data / "calib"), "--kv-cache", "int8"]),
                            ("int4 weight-only", ["--weight-only", "int4"])):
            out = args.work / label / mode.replace(" ", "-").replace(",", "")
            start = time.perf_counter()
            _trtglm(["build", str(fp32 / "model.onnx"), *flags, "--eval", str(data / "eval"), "--out", str(out)])
            rows.append({**_row(label, mode, out, fp32, time.perf_counter() - start),
                         **_decode_agreement(fp32, out, stream)})
    _write(args.results, rows, facts)
    return 0


def _token_dirs(weights: Path, root: Path) -> Path:
    """calib/ and eval/ as .npy per model input: the byte streams, full masks, positions, an empty cache."""
    config = json.loads(CONFIG.read_text())
    layers, kv = config["num_hidden_layers"], config["num_key_value_heads"]
    for split in ("calib", "eval"):
        tokens = np.load(weights / split / "tokens.npy").astype(np.int64)
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        n, s = tokens.shape
        np.save(d / "input_ids.npy", tokens)
        np.save(d / "attention_mask.npy", np.ones((n, s), np.int64))
        np.save(d / "position_ids.npy", np.tile(np.arange(s, dtype=np.int64), (n, 1)))
        for i in range(layers):
            for kind in ("key", "value"):
                np.save(d / f"past_key_values.{i}.{kind}.npy", np.zeros((n, kv, 0, config["head_dim"]), np.float32))
    return root


def _decode_check(weights: Path, fp32: Path, stream: np.ndarray) -> dict:
    """16-token greedy decode in ONNX Runtime (prefill + KV-cache steps) vs transformers' generate on CPU."""
    import torch
    from transformers import GlmForCausalLM

    from trtglm.generate import greedy

    model = GlmForCausalLM.from_pretrained(str(weights), local_files_only=True, dtype=torch.float32).eval()
    prompts = stream[:PROMPTS, :PROMPT_LEN]
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompts), attention_mask=torch.ones_like(torch.from_numpy(prompts)),
                             max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    ref_tokens = out.sequences[:, PROMPT_LEN:].numpy()
    ref_logits = torch.stack(out.logits).numpy()  # [steps, batch, vocab]
    tokens, logits, timings = greedy(fp32, prompts.tolist(), NEW_TOKENS)
    return {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "same_tokens": bool((np.array(tokens) == ref_tokens).all()),
            "logits_max_rel_err": float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()),
            "ttft_ms": 1e3 * timings.ttft_s, "tokens_per_s": timings.tokens_per_s}


def _decode_agreement(fp32: Path, out: Path, stream: np.ndarray, steps: int = 64) -> dict:
    """Decode steps through the KV cache, teacher-forced with FP32's greedy tokens: how often the quantized model's
    next token is FP32's, and the cosine of their logits (this is where an INT8 cache shows)."""
    from trtglm.generate import greedy

    prompts = stream[:PROMPTS, :PROMPT_LEN].tolist()
    tokens, ref, _ = greedy(fp32, prompts, steps)
    model = json.loads((out / "report.json").read_text())["artefacts"]["qdq"]
    _, got, _ = greedy(model, prompts, steps, forced=tokens)
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"decode_top1": 100.0 * float((a.argmax(1) == b.argmax(1)).mean()), "decode_cos": float(cos.mean())}


def _bench_decode(fp32: Path) -> dict:
    text = _trtglm(["bench-decode", str(fp32), "--new-tokens", "128"])
    return json.loads(text.strip().splitlines()[-1])  # bench-decode prints its JSON last, on stderr


def _row(label: str, mode: str, out: Path, fp32: Path, seconds: float) -> dict:
    report = json.loads((out / "report.json").read_text())
    logits = report["accuracy"]["outputs"]["logits"]
    model = Path(report["artefacts"]["qdq"])  # the quantized model (model.int8.qdq.onnx / model.int4.wo.onnx)
    fp32_bytes = sum(f.stat().st_size for f in fp32.glob("model.onnx*"))
    return {"model": label, "mode": mode, "build_s": round(seconds, 1),
            "top1_sim": logits["sim"]["top1_agreement"], "top1_ort": logits["ort"]["top1_agreement"],
            "cos_sim": logits["sim"]["cosine"], "cos_ort": logits["ort"]["cosine"],
            "size_vs_fp32": model.stat().st_size / fp32_bytes,
            "int8_mac_fraction": report["quantization"]["int8_mac_fraction"]}


def _write(results: Path, rows: list[dict], facts: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "glm.json").write_text(json.dumps({"rows": rows, **facts}, indent=1) + "\n")
    d, b = facts["decode_check"], facts["bench_decode"]
    lines = ["| model | build | top-1 agreement sim / ort % | logits cosine sim / ort | decode top-1 % / cosine "
             "| file vs FP32 | build s |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['top1_sim']:.2f} / {r['top1_ort']:.2f} | "
              f"{r['cos_sim']:.5f} / {r['cos_ort']:.5f} | {r['decode_top1']:.2f} / {r['decode_cos']:.5f} | "
              f"{r['size_vs_fp32']:.2f} | {r['build_s']} |" for r in rows]
    lines += ["", f"- decode check (trained): {d['prompts']} prompts x {d['new_tokens']} greedy tokens, ONNX Runtime "
              f"prefill + KV cache vs transformers generate: same tokens {d['same_tokens']}, logits max relative "
              f"error {d['logits_max_rel_err']:.2e}",
              f"- bench-decode (trained, batch 1, {b['new_tokens']} tokens): KV cache {b['cache_tokens_per_s']:.0f} "
              f"tokens/s vs no cache {b['no_cache_tokens_per_s']:.0f}: {b['cache_speedup']:.2f}x"]
    lines += [f"- batch {r['batch']}: median {r['median_ms']:.3f} ms/token, P99 {r['p99_ms']:.3f} ms/token, "
              f"{r['tokens_per_s']:.0f} tokens/s" for r in b["rows"]]
    text = "\n".join(lines) + "\n"
    (results / "glm.md").write_text(text)
    print(text)


def _trtglm(args: list[str]) -> str:
    return _run([sys.executable, "-m", "trtglm.cli", *args])


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/glm.py: {' '.join(cmd[1:4])} ... failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


if __name__ == "__main__":
    sys.exit(main())
