"""Greedy decoding of an exported GLM (trtglm.export.glm) with ONNX Runtime, the KV cache carried between steps.

Why: decoding is how an LLM deployment is used and verified: one prefill over the prompt, then one decode step
per token that reads the previous step's presents as its pasts. The presents stay ONNX Runtime OrtValues bound
with IO binding from one step to the next, so the cache is not copied through numpy per token; only the last
position's logits come back to numpy, to pick the next token and to report them.

Prompts of different lengths are left-padded (token 0, attention_mask 0) and positions count real tokens only,
as transformers' generate does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trtglm.errors import ConfigError, ModelError


_CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


@dataclass
class Timings:
    ttft_s: float  # prefill and the first token
    step_s: list[float]  # one entry per decode step
    tokens_per_s: float  # tokens generated per second over the decode steps (all rows of the batch)


def greedy(model_dir_or_paths: str | Path | tuple[str | Path, str | Path], prompt_ids: list[list[int]],
           max_new_tokens: int, threads: int = 0,
           forced: list[list[int]] | None = None) -> tuple[list[list[int]], np.ndarray, Timings]:
    """Greedy-decode max_new_tokens tokens for each prompt.

    model_dir_or_paths: a directory holding manifest.json (export_glm's output), one ONNX file serving prefill
        and decode, or a (prefill, decode) pair of files.
    Returns (new tokens per prompt, logits [max_new_tokens, batch, vocab] that chose each token, timings).
    forced: feed these tokens back instead of the argmax (teacher forcing: compares two models step by step).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: give at least 1")
    if not prompt_ids or any(not row for row in prompt_ids):
        raise ConfigError("prompt ids: give one or more non-empty prompts")
    prefill_file, decode_file = _graph_files(model_dir_or_paths)
    decode = _session(decode_file, threads)
    prefill = decode if prefill_file == decode_file else _session(prefill_file, threads)
    pasts = [i for i in decode.get_inputs() if i.name.startswith("past_key_values.")]
    presents = [o.name for o in decode.get_outputs() if o.name.startswith("present.")]
    if not pasts or len(pasts) != len(presents):
        raise ModelError(f"{decode_file}: expected past_key_values.* inputs and as many present.* outputs, got "
                         f"{len(pasts)} and {len(presents)}")

    batch = len(prompt_ids)
    ids, mask = _left_padded(prompt_ids)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    start = time.perf_counter()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    if prefill is decode:  # one graph: prefill is a decode step with an empty cache
        for p in pasts:
            _, heads, _, head_dim = p.shape
            feeds[p.name] = np.zeros((batch, heads, 0, head_dim), _CACHE_TYPES.get(p.type, np.float32))
    binding = prefill.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    cache = _run(prefill, binding, presents)
    logits = binding.get_outputs()[0].numpy()[:, -1]
    steps = [logits]
    tokens = logits.argmax(-1)
    ttft = time.perf_counter() - start

    step_s = []
    new = [tokens]
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens - 1):
        if forced is not None:
            tokens = np.array([row[step] for row in forced], dtype=np.int64)
        t0 = time.perf_counter()
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        binding = decode.io_binding()
        binding.bind_cpu_input("input_ids", tokens[:, None].astype(np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", next_pos)
        for p, value in zip(pasts, cache):
            binding.bind_ortvalue_input(p.name, value)
        cache = _run(decode, binding, presents)
        logits = binding.get_outputs()[0].numpy()[:, -1]
        tokens = logits.argmax(-1)
        steps.append(logits)
        new.append(tokens)
        next_pos = next_pos + 1
        step_s.append(time.perf_counter() - t0)
    decode_s = sum(step_s)
    timings = Timings(ttft, step_s, batch * len(step_s) / decode_s if decode_s else 0.0)
    return np.stack(new, axis=1).tolist(), np.stack(steps), timings


def greedy_no_cache(model_dir_or_paths, prompt_ids: list[list[int]], max_new_tokens: int,
                    threads: int = 0) -> tuple[list[list[int]], Timings]:
    """The baseline a KV cache must beat: every token by re-running the prefill graph over the whole sequence."""
    prefill_file, _ = _graph_files(model_dir_or_paths)
    session = _session(prefill_file, threads)
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    batch = len(prompt_ids)
    ids, mask = _left_padded(prompt_ids)
    new, step_s, start = [], [], time.perf_counter()
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
        for p in pasts:
            feeds[p.name] = np.zeros((batch, p.shape[1], 0, p.shape[3]), _CACHE_TYPES.get(p.type, np.float32))
        tokens = session.run(["logits"], feeds)[0][:, -1].argmax(-1)
        new.append(tokens)
        ids = np.concatenate([ids, tokens[:, None].astype(np.int64)], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        step_s.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return np.stack(new, axis=1).tolist(), Timings(step_s[0], step_s[1:], batch * max_new_tokens / total)


def bench_decode(model_dir_or_paths, batch_sizes: tuple[int, ...] = (1, 4, 16), prompt_len: int = 16,
                 new_tokens: int = 128, vocab: int = 2, threads: int = 0, seed: int = 0) -> dict:
    """Per batch size: median and P99 per-token latency and tokens/s with the KV cache; at batch 1 also the same
    decode without a cache, and the ratio. Prompts are seeded random token ids below `vocab`."""
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batch_sizes:
        prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
        greedy(model_dir_or_paths, prompts[:1], 2, threads)  # warm-up: sessions, allocator
        _, _, t = greedy(model_dir_or_paths, prompts, new_tokens, threads)
        rows.append({"batch": batch, "ttft_ms": 1e3 * t.ttft_s, "median_ms": 1e3 * float(np.median(t.step_s)),
                     "p99_ms": 1e3 * float(np.percentile(t.step_s, 99)), "tokens_per_s": t.tokens_per_s})
    prompts = rng.integers(0, vocab, (1, prompt_len)).tolist()
    cached, _, with_cache = greedy(model_dir_or_paths, prompts, new_tokens, threads)
    uncached, without = greedy_no_cache(model_dir_or_paths, prompts, new_tokens, threads)
    cache_tps = new_tokens / (with_cache.ttft_s + sum(with_cache.step_s))  # prefill included, as in the baseline
    return {"rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "no_cache_tokens_per_s": without.tokens_per_s, "cache_tokens_per_s": cache_tps,
            "cache_speedup": cache_tps / without.tokens_per_s, "same_tokens": cached == uncached}


def _left_padded(prompt_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) with every prompt right-aligned: token 0 and mask 0 in front of shorter ones."""
    width = max(len(row) for row in prompt_ids)
    ids = np.zeros((len(prompt_ids), width), np.int64)
    mask = np.zeros((len(prompt_ids), width), np.int64)
    for r, row in enumerate(prompt_ids):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    return ids, mask


def _run(session: ort.InferenceSession, binding: ort.IOBinding, presents: list[str]) -> list[ort.OrtValue]:
    """Run with every output left in ONNX Runtime's memory; return the presents as OrtValues."""
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")
    session.run_with_iobinding(binding)
    values = dict(zip((o.name for o in session.get_outputs()), binding.get_outputs()))
    return [values[name] for name in presents]


def _graph_files(source) -> tuple[Path, Path]:
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ConfigError(f"model {source}: give one ONNX file, a directory, or a (prefill, decode) pair")
        files = (Path(source[0]), Path(source[1]))
    elif Path(source).is_dir():
        manifest = Path(source) / "manifest.json"
        try:
            graphs = json.loads(manifest.read_text())["graphs"]
            files = (Path(source) / graphs["prefill"], Path(source) / graphs["decode"])
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"model directory {source}: no readable manifest.json with graphs.prefill and "
                             f"graphs.decode ({e}); export it with trtglm export --hf-config") from e
    else:
        files = (Path(source), Path(source))
    for file in files:
        if not file.is_file():
            raise ModelError(f"model {file}: file not found")
    return files


def _session(file: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"model {file}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0]}") from e
