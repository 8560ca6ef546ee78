"""Transformer zoo: a robustness sweep of `trtglm build` over Hugging Face architectures it was not developed on.

trtglm's transformer support (LayerNorm/RMSNorm, GELU, attention and QKV fusions, SmoothQuant, per-tensor
calibration search, Q/DQ placement) was developed on all-MiniLM-L6-v2. This bench instantiates other
architectures offline from tiny configs with random weights (no download), exports each to ONNX (TorchScript
exporter at opset 17, else the dynamo exporter; --exporter forces one), writes random calibration/eval data, and
runs the CLI in three modes (INT8; INT8 with --attention native; INT8 with --fp16). Per build it records the exit
status and one-line error, the fusions found against what the architecture has, the optimized FP32 graph's max
relative error, the INT8 cosine (sim and ort figures) and the wall time. Random weights make the accuracy figures
a smoke signal only.

    /tmp/venv/bin/python bench/zoo.py [--archs bert,llama] [--modes int8,native,fp16] [--exporter dynamo]

Results: bench/results/zoo.{json,md} (--results DIR elsewhere). The exporters' output, every build's full output
and, for a build whose attention count falls short, the expression behind each Softmax of its optimized graph go
to WORK/logs/ (--work, default /tmp/trtglm-zoo).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from common import REPO, SEED, cpu_info, run_child, trtglm_exe, versions

VOCAB = 1000
SEQ = 32
IMAGE = 32  # ViT: 32x32 images, 8x8 patches; Swin: 4x4 patches, 4x4 windows
MEL_BINS, AUDIO_FRAMES = 16, 32  # Whisper encoder: 2 convolutions (stride 1, 2) -> 16 positions
CALIB_SAMPLES, EVAL_SAMPLES = 128, 64
OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
MODES = {"int8": (), "native": ("--attention", "native"), "fp16": ("--fp16",)}
WEIGHT_STD = 0.2  # hidden 64: projections of unit-variance activations have std ~1.6
MIN_COSINE = 0.98
MAX_FP32_REL_ERR = 1e-4
BUILD_TIMEOUT_S = 300
FUSIONS = ("attention", "layernorm", "rmsnorm", "gelu", "qkv_groups", "linear_layers")


@dataclass(frozen=True)
class Arch:
    """A Hugging Face model from a tiny config, and how many of each fusable block it has."""

    name: str
    make: Callable[[], object]  # () -> torch.nn.Module (a transformers model with random weights)
    layers: int
    layernorm: int = 0
    rmsnorm: int = 0
    gelu: int = 0
    qkv: int = 0  # groups of sibling projections fuse_qkv can merge: separate Q/K/V, SwiGLU's gate/up
    extra_linear: int = 0  # linear layers (MatMul/Gemm/Conv) besides each layer's QKV, output, FFN in and out
    kind: str = "text"  # text: input_ids, attention_mask; image: pixel_values; audio: input_features
    note: str = ""

    def expected(self) -> dict[str, int]:
        """The fusion summary counts blocks fused, and blocks recognised but kept decomposed below their opset."""
        return {"attention": self.layers, "layernorm": self.layernorm, "rmsnorm": self.rmsnorm, "gelu": self.gelu,
                "qkv_groups": self.qkv, "linear_layers": 4 * self.layers + self.extra_linear}


def _archs() -> dict[str, Arch]:
    import transformers as tf

    L, H, HEADS, FF = 2, 64, 4, 128  # layers, hidden, heads, intermediate
    LN, ATTN = 2 * L + 1, {"qkv": L}  # LayerNorms (two per layer and one more), a QKV group per layer
    small = {"num_hidden_layers": L, "hidden_size": H, "num_attention_heads": HEADS, "intermediate_size": FF,
             "vocab_size": VOCAB}
    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the tiny vocabulary
    decoder = {**small, **tokens, "num_key_value_heads": 2, "use_cache": False, "max_position_embeddings": 128}
    gpt2 = {"vocab_size": VOCAB, "n_embd": H, "n_layer": L, "n_head": HEADS, "use_cache": False,
            "bos_token_id": 1, "eos_token_id": 2}
    eager = {"attn_implementation": "eager"}  # the explicit MatMul/Softmax code path (default: SDPA)
    vit = {k: v for k, v in small.items() if k != "vocab_size"}
    archs = [
        Arch("bert", lambda: tf.BertModel(tf.BertConfig(**small)), L, layernorm=LN, gelu=L, **ATTN),
        Arch("bert-eager", lambda: tf.BertModel(tf.BertConfig(**small, **eager)), L, layernorm=LN, gelu=L, **ATTN),
        Arch("distilbert", lambda: tf.DistilBertModel(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=H, n_layers=L, n_heads=HEADS, hidden_dim=FF)), L, layernorm=LN, gelu=L, **ATTN),
        Arch("roberta", lambda: tf.RobertaModel(tf.RobertaConfig(**small)), L, layernorm=LN, gelu=L, **ATTN),
        Arch("electra", lambda: tf.ElectraModel(tf.ElectraConfig(**small, embedding_size=32)), L, layernorm=LN,
             gelu=L, extra_linear=1, **ATTN, note="embedding projection 32 -> 64"),
        Arch("albert", lambda: tf.AlbertModel(tf.AlbertConfig(**small, embedding_size=32)), L, layernorm=LN,
             gelu=L, extra_linear=1, **ATTN, note="one layer's weights shared by all layers; gelu_new (tanh)"),
        Arch("modernbert", lambda: tf.ModernBertModel(tf.ModernBertConfig(
            **small, global_attn_every_n_layers=2, local_attention=16, cls_token_id=1, sep_token_id=2, **tokens)),
             L, layernorm=LN, gelu=L, note="one Wqkv; GeGLU (one Wi); RoPE; layer 2 sliding-window (16) attention; "
             "layer 1 has no attention norm"),
        Arch("mpnet", lambda: tf.MPNetModel(tf.MPNetConfig(**small)), L, layernorm=LN, gelu=L, **ATTN,
             note="relative position bias added to the scores"),
        Arch("deberta-v2", lambda: tf.DebertaV2Model(tf.DebertaV2Config(
            **small, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
            max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm")), L, layernorm=LN, gelu=L,
             **ATTN, note="DeBERTa-v3 layout: disentangled attention (c2p/p2c biases from Q and K), 3-D BMMs"),
        Arch("t5-encoder", lambda: tf.T5EncoderModel(tf.T5Config(
            vocab_size=VOCAB, d_model=H, d_kv=H // HEADS, d_ff=FF, num_layers=L, num_heads=HEADS,
            feed_forward_proj="gated-gelu", use_cache=False)), L, rmsnorm=LN, gelu=L, qkv=2 * L,
             note="no 1/sqrt(d) scale; relative position bias; T5LayerNorm is an RMSNorm; gated-gelu (tanh)"),
        Arch("vit", lambda: tf.ViTModel(tf.ViTConfig(**vit, image_size=IMAGE, patch_size=8), add_pooling_layer=False),
             L, layernorm=LN, gelu=L, extra_linear=1, **ATTN, kind="image", note="patch Conv"),
        Arch("swin", lambda: tf.SwinModel(tf.SwinConfig(
            image_size=IMAGE, patch_size=4, embed_dim=32, depths=[L], num_heads=[HEADS], window_size=4,
            mlp_ratio=2.0), add_pooling_layer=False), L, layernorm=LN + 1, gelu=L, extra_linear=1, **ATTN,
             kind="image", note="4 windows of 16 patches; relative position bias; block 2 shifted (window mask)"),
        Arch("whisper-encoder", lambda: tf.WhisperModel(tf.WhisperConfig(
            vocab_size=VOCAB, d_model=H, encoder_layers=L, decoder_layers=1, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_mel_bins=MEL_BINS,
            max_source_positions=AUDIO_FRAMES // 2, max_target_positions=SEQ, decoder_start_token_id=1,
            **tokens)).get_encoder(), L, layernorm=LN, gelu=L + 2, extra_linear=2, **ATTN, kind="audio",
             note="Conv1d+GELU front end; k_proj has no bias (q_proj and v_proj have one)"),
        Arch("gpt2", lambda: tf.GPT2Model(tf.GPT2Config(**gpt2)), L, layernorm=LN, gelu=L,
             note="Conv1D layers; one c_attn QKV projection; gelu_new (tanh); causal"),
        Arch("gpt2-eager", lambda: tf.GPT2Model(tf.GPT2Config(**gpt2, **eager)), L, layernorm=LN, gelu=L),
        Arch("opt", lambda: tf.OPTModel(tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, ffn_dim=FF,
            word_embed_proj_dim=H, use_cache=False)), L, layernorm=LN, **ATTN, note="ReLU; causal"),
        Arch("gpt-neox", lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(**small, use_cache=False, rotary_pct=0.5)), L,
             layernorm=LN, gelu=L, note="one interleaved QKV projection; partial rotary; parallel residual"),
        Arch("llama", lambda: tf.LlamaModel(tf.LlamaConfig(**decoder)), L, rmsnorm=LN, qkv=2 * L,
             note="GQA 4/2, RoPE, SwiGLU"),
        Arch("llama-eager", lambda: tf.LlamaModel(tf.LlamaConfig(**decoder, **eager)), L, rmsnorm=LN, qkv=2 * L),
        Arch("qwen2", lambda: tf.Qwen2Model(tf.Qwen2Config(**decoder)), L, rmsnorm=LN, qkv=2 * L,
             note="GQA 4/2, RoPE, QKV biases"),
        Arch("gemma", lambda: tf.GemmaModel(tf.GemmaConfig(**decoder, head_dim=16)), L, rmsnorm=LN, gelu=L,
             qkv=2 * L, note="GQA, RoPE, GeGLU (tanh), RMSNorm with (1 + w), scaled embeddings"),
        Arch("phi3", lambda: tf.Phi3Model(tf.Phi3Config(**decoder)), L, rmsnorm=LN,
             note="one qkv_proj, one gate_up_proj"),
        Arch("glm", lambda: tf.GlmModel(tf.GlmConfig(**decoder, head_dim=16)), L, rmsnorm=LN, **ATTN,
             note="GQA, partial interleaved rotary, gate_up_proj"),
    ]
    return {a.name: a for a in archs}


# ----------------------------------------------------------------------------------------------- export
@dataclass
class Export:
    exporter: str | None = None  # torchscript | dynamo
    opset: int | None = None
    seconds: float | None = None
    errors: dict[str, str] = field(default_factory=dict)  # exporter -> its one-line failure
    torch_max_abs_err: float | None = None  # ORT on the exported model vs PyTorch (see _export_error)
    ops: dict[str, int] = field(default_factory=dict)


def _randomize(model):
    """Weights large enough for peaked attention and non-trivial norms: HF's default init (std 0.02, LayerNorm
    gamma 1, beta 0) makes every softmax nearly uniform, so a fusion that got the scale, mask or gamma wrong would
    still match the original. Matrices ~ N(0, WEIGHT_STD); vectors (biases, norm weights) get N(0, 0.1) added."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, WEIGHT_STD)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@contextmanager
def _output_to(log: Path):
    """Send file descriptors 1 and 2 to `log`: the exporters also print from C++ (the TorchScript graph dump)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _wrap(model, names: list[str]):
    """The model with positional tensor inputs (in `names` order) and one output, last_hidden_state."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(names, tensors))).last_hidden_state

    return LastHiddenState().eval()


def export(arch: Arch, path: Path, feeds: dict[str, np.ndarray], exporters: tuple[str, ...], log: Path) -> Export:
    """The first of `exporters` that works (TorchScript at opset 17, dynamo at 18); dynamic batch (and sequence
    for text). The exporters' own output goes to `log`."""
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    torch.manual_seed(SEED)
    names = list(feeds)
    module = _wrap(_randomize(arch.make().eval()), names)
    args = tuple(torch.from_numpy(feeds[n][:2]) for n in names)
    axes = {0: "batch", 1: "sequence"} if arch.kind == "text" else {0: "batch"}
    result = Export()
    for exporter in exporters:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), _output_to(log):
                warnings.simplefilter("ignore")
                if exporter == "torchscript":
                    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                                      output_names=["last_hidden_state"],
                                      dynamic_axes={**{n: axes for n in names}, "last_hidden_state": axes})
                else:
                    dims = {i: torch.export.Dim.DYNAMIC for i in axes}
                    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=names,
                                      output_names=["last_hidden_state"], dynamic_shapes=(tuple(dims for _ in names),),
                                      external_data=False)
        except Exception as e:  # noqa: BLE001 - an exporter fails in many ways: record it, try the next one
            cause = e.__cause__ or e  # the dynamo exporter wraps the error that says what failed
            result.errors[exporter] = _one_line(f"{type(cause).__name__}: {cause}")
            continue
        result.exporter, result.seconds = exporter, round(time.perf_counter() - start, 2)
        break
    if result.exporter is None:
        return result
    import onnx

    model = onnx.load(str(path))
    result.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    result.ops = dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
    check = {n: a[2:10, : SEQ - 8] if arch.kind == "text" else a[2:10] for n, a in feeds.items()}
    result.torch_max_abs_err = _export_error(module, path, check)
    return result


def _export_error(module, path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Does the export generalise beyond the traced inputs (other samples, a shorter sequence)? ORT vs PyTorch,
    on real tokens only: padded query rows are undefined."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    keep = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else np.ones(ref.shape[:2], bool)
    return float(np.abs(got - ref)[keep].max())


# ----------------------------------------------------------------------------------------------- data
def make_data(arch: Arch, root: Path) -> dict[str, np.ndarray]:
    """calib/ and eval/ as .npy per input; returns the eval arrays. Masks: 1s, then padding at the end."""
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, n in (("calib", CALIB_SAMPLES), ("eval", EVAL_SAMPLES)):
        (root / split).mkdir(parents=True, exist_ok=True)
        if arch.kind == "image":
            arrays = {"pixel_values": rng.standard_normal((n, 3, IMAGE, IMAGE)).astype(np.float32)}
        elif arch.kind == "audio":
            arrays = {"input_features": rng.standard_normal((n, MEL_BINS, AUDIO_FRAMES)).astype(np.float32)}
        else:
            lengths = np.where(rng.random(n) < 0.25, SEQ, rng.integers(SEQ // 4, SEQ + 1, n))
            arrays = {"input_ids": rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64),
                      "attention_mask": (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)}
        for name, a in arrays.items():
            np.save(root / split / f"{name}.npy", a)
    return arrays


# ----------------------------------------------------------------------------------------------- build
def build(model: Path, data: Path, out: Path, mode: str, log: Path, expected: dict[str, int]) -> dict:
    cmd = [trtglm_exe(), "build", str(model), "--calib", str(data / "calib"), "--eval", str(data / "eval"),
           "--out", str(out), *MODES[mode]]
    run = run_child(cmd, log, BUILD_TIMEOUT_S)
    text = log.read_text(errors="replace")
    row = {"mode": mode, "rc": run["rc"], "seconds": round(run["process_s"], 1), "log": str(log),
           "status": "ok" if run["rc"] == 0 else "timeout" if run["timed_out"] else
           "crash" if "Traceback (most recent call last)" in text else "error",
           "error": None if run["rc"] == 0 else _error_line(text), "fused_line": _fused_line(text),
           "fusions": None, "expected": expected, "fp32_max_rel_err": None, "sim_cosine": None, "ort_cosine": None}
    try:
        rep = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return row
    acc = rep.get("accuracy") or {}
    outputs = list((acc.get("outputs") or {}).values())
    quant = rep["quantization"]
    row.update(fusions={**rep["fusions"], "linear_layers": quant["linear_layers"]},
               fp32_max_rel_err=acc.get("fp32_optimized_max_rel_err"), int8_linear=quant["int8_linear_layers"],
               sim_cosine=outputs[0]["sim"].get("cosine") if outputs else None,
               ort_cosine=outputs[0]["ort"].get("cosine") if outputs else None)
    return row


def _fused_line(text: str) -> str | None:
    return next((line.strip() for line in text.splitlines() if line.startswith("fused ")), None)


def _error_line(text: str) -> str:
    """The CLI's `error: ...` line, else the exception line that ends a traceback, else the last line."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    err = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    if err is None:
        err = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Fail)\w*: ", line)),
                   lines[-1] if lines else "")
    return err


def _one_line(text: str) -> str:
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:400]


def problems_of(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [f"{row['status']}: {row['error']}"]
    found = []
    got = row["fusions"] or {}
    for key in FUSIONS:
        if got.get(key, 0) != row["expected"][key]:
            found.append(f"{key} {got.get(key, 0)}/{row['expected'][key]}")
    if row["fp32_max_rel_err"] is not None and row["fp32_max_rel_err"] > MAX_FP32_REL_ERR:
        found.append(f"fused FP32 rel err {row['fp32_max_rel_err']:.2e}")
    for fig in ("sim", "ort"):
        cos = row[f"{fig}_cosine"]
        if cos is None or not np.isfinite(cos) or cos < MIN_COSINE:
            found.append(f"{fig} cosine {cos}")
    return found


# ----------------------------------------------------------------------------------------------- diagnosis
def softmax_context(model_path: Path, depth: int = 7) -> str:
    """For each Softmax left in a graph: the expression behind it (every non-constant input, `depth` ops deep;
    C a constant, `in:` a graph input, [n] a tensor with n readers) and the ops after it up to a MatMul, to see
    which element an attention matcher tripped over."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    read_by: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            read_by.setdefault(i, []).append(n)
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}

    def op(n) -> str:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.name in ("perm", "axis", "axes")}
        readers = len(read_by.get(n.output[0], []))
        return n.op_type + (str(attrs) if attrs else "") + (f"[{readers}]" if readers > 1 else "")

    def reaches_matmul(tensor: str, left: int) -> bool:
        node = made_by.get(tensor)
        return node is not None and left > 0 and (
            node.op_type == "MatMul" or any(reaches_matmul(i, left - 1) for i in node.input if i not in consts))

    def expr(tensor: str, left: int, behind_scores: bool = False) -> str:
        """Scores side: only the branch that leads to the Q.K^T MatMul is expanded (a mask or bias is `Op(…)`);
        behind that MatMul, Q's and K's producers to `depth // 2` ops."""
        if tensor in consts:
            return "C"
        if tensor not in made_by:
            return f"in:{tensor}"
        node = made_by[tensor]
        if node.op_type == "MatMul" and not behind_scores:
            return f"{op(node)}({', '.join(expr(i, depth // 2, True) for i in node.input)})"
        if left == 0 or node.op_type in ("MatMul", "Gemm", "Shape") \
                or (not behind_scores and not reaches_matmul(tensor, left)):
            return op(node) + ("(…)" if node.input else "")
        return f"{op(node)}({', '.join(expr(i, left - 1, behind_scores) for i in node.input if i)})"

    lines = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        forward, tensor = [], sm.output[0]
        for _ in range(4):
            readers = read_by.get(tensor, [])
            forward.append(" + ".join(op(r) for r in readers) or "(graph output)")
            if len(readers) != 1 or readers[0].op_type == "MatMul":
                break
            tensor = readers[0].output[0]
        lines.append(f"{sm.name}:\n  {expr(sm.output[0], depth)}\n  -> {' -> '.join(forward)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- reporting
def _cell(row: dict, key: str) -> str:
    if row["fusions"] is None:
        return "—"
    got, want = row["fusions"].get(key, 0), row["expected"][key]
    return f"{got}" if got == want else f"{got}/{want}!"


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


TABLE = ("arch", "export", "mode", "status", "s", "attn", "LN", "RMS", "GELU", "QKV", "linear", "INT8", "FP32 rel err",
         "sim cos", "ort cos", "problems")


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        exp = r["export"]
        if exp["exporter"] is None:
            rows.append([r["arch"], "failed", "—", "export", "—", *["—"] * (len(TABLE) - 6),
                         "; ".join(f"{k}: {v}" for k, v in exp["errors"].items())])
            continue
        for b in r["builds"]:
            rows.append([r["arch"], exp["exporter"], b["mode"], b["status"], _fmt(b["seconds"], ".0f"),
                         *(_cell(b, k) for k in FUSIONS), _fmt(b.get("int8_linear"), "d"),
                         _fmt(b["fp32_max_rel_err"], ".1e"), _fmt(b["sim_cosine"], ".5f"),
                         _fmt(b["ort_cosine"], ".5f"), "; ".join(b["problems"])])
    return rows


def write_markdown(path: Path, results: list[dict], meta: dict) -> None:
    lines = ["# trtglm transformer zoo", "",
             (f"`{meta['command']}` at trtglm {meta['trtglm_commit']} (transformers "
             f"{meta['versions']['transformers']}, torch {meta['versions']['torch']}) on {meta['cpu']['name']} "
             f"({meta['cpu']['cores']} cores), "
             f"{meta['seconds']:.0f} s. Tiny configs (2 layers, hidden 64, 4 heads), random weights (matrices "
             f"N(0, {WEIGHT_STD}), vectors perturbed by N(0, 0.1)); "
             f"{CALIB_SAMPLES} calibration / {EVAL_SAMPLES} eval samples, sequence {SEQ}. A count `got/expected!` "
             f"is a fusion that did not match; cosines below {MIN_COSINE} and FP32 errors above "
             f"{MAX_FP32_REL_ERR:g} are problems."), "",
             "| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(results)]
    lines += ["", "| arch | exporter | export vs PyTorch (max abs) | note |", "|---|---|---:|---|"]
    for r in results:
        exp = r["export"]
        failed = "; ".join(f"{k} failed: {v}" for k, v in exp["errors"].items())
        lines.append(f"| {r['arch']} | {exp['exporter'] or '—'} | {_fmt(exp['torch_max_abs_err'], '.1e')} | "
                     f"{'; '.join(x for x in (r['note'], failed) if x)} |")
    path.write_text("\n".join(lines) + "\n")


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trtglm transformer zoo")
    for col in TABLE:
        table.add_column(col, overflow="fold")
    for row in table_rows(results):
        table.add_row(*row, style="red" if row[-1] else None)
    Console(width=200).print(table)


# ----------------------------------------------------------------------------------------------- main
def run_arch(arch: Arch, work: Path, modes: list[str], exporter: str) -> dict:
    root = work / (arch.name if exporter == "auto" else f"{arch.name}-{exporter}")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    feeds = make_data(arch, root)
    model = root / f"{arch.name}.onnx"
    exp = export(arch, model, feeds, EXPORTERS if exporter == "auto" else (exporter,), logs / f"{root.name}.export.log")
    result = {"arch": arch.name, "note": arch.note, "export": asdict(exp), "builds": []}
    if exp.exporter is None:
        return result
    for mode in modes:
        row = build(model, root, root / f"out-{mode}", mode, logs / f"{root.name}.{mode}.log", arch.expected())
        row["problems"] = problems_of(row)
        if row["fusions"] is not None and row["fusions"]["attention"] < arch.layers:
            context = logs / f"{root.name}.{mode}.softmax.txt"
            context.write_text(softmax_context(root / f"out-{mode}" / "model.fp32.opt.onnx"))
            row["softmax_context"] = str(context)
        result["builds"].append(row)
        print(f"  {arch.name:<11} {mode:<7} {row['status']:<7} {row['seconds']:>5.1f}s  "
              f"{'; '.join(row['problems']) or 'ok'}", flush=True)
    return result


def _commit() -> str | None:
    """The repository's HEAD, with `+dirty` when trtglm/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "trtglm"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def main() -> int:
    archs = _archs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(archs), help="comma-separated subset of: " + ", ".join(archs))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--exporter", default="auto", choices=("auto", *EXPORTERS),
                    help="auto: TorchScript at opset 17, dynamo (opset 18) where TorchScript fails")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtglm-zoo"), help="models, data, outputs and logs")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    names, modes = args.archs.split(","), args.modes.split(",")
    unknown = [n for n in names if n not in archs] + [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown arch or mode: {', '.join(unknown)}")
    start = time.perf_counter()
    results = []
    for name in names:  # one at a time: the machine's cores are shared
        print(f"{name}: exporting", flush=True)
        results.append(run_arch(archs[name], args.work, modes, args.exporter))
        exp = results[-1]["export"]
        if exp["exporter"] is None:
            print(f"  {name:<11} export failed: {exp['errors']}", flush=True)
    meta = {"command": " ".join(["bench/zoo.py", *sys.argv[1:]]), "trtglm_commit": _commit(), "cpu": cpu_info(),
            "versions": {**versions(), "transformers": _version("transformers")},
            "seconds": round(time.perf_counter() - start, 1), "work": str(args.work)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "zoo.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    write_markdown(args.results / "zoo.md", results, meta)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
