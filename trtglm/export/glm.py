"""GLM / GLM-4 (transformers) -> ONNX with the KV cache as graph inputs and outputs, ready for greedy decoding.

Why: a language model is deployed only when it decodes, and decoding needs a graph that reads the cache of past
keys/values and writes it back extended. TensorRT (and ONNX Runtime) see the cache as plain tensors, so the
exported graph takes `past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] and returns
`present.{i}.key/value` [batch, kv_heads, past + seq, head_dim] next to the logits. GQA stays in the graph as
HF's repeat_kv (fuse_attention recognises it) and GLM's partial rotary embedding as the exporter's slices.

Exporter: the TorchScript tracer fails on GLM's rotary code ("All tensors must have the same rank"), so the
torch.export-based exporter is used, with named dynamic axes (torch.export.Dim) batch, seq and past. Example
inputs use sizes >= 2 on every dynamic axis so that torch.export does not specialise them to 0/1; the graph then
also runs with past = 0 (prefill), seq = 1 (decode) and batch = 1, which `export_glm` checks against PyTorch
before it returns. One graph serves prefill (empty past) and decode; `split=True` writes a prefill graph without
past inputs and a decode graph, for engines that want one shape profile per phase.

torch and transformers are optional dependencies (`pip install 'trtglm[export]'`); import this module lazily.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from trtglm.errors import ConfigError, ModelError
from trtglm.export.torch_export import quiet_exporter_logs

SEED = 0
OPSET = 18
ARCHITECTURES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
TOTAL_AXIS = "past + seq"  # the exporter's own name for the presents' length axis
# ONNX Runtime vs PyTorch at the check shapes (float32 logits of a random model are O(1))
RTOL, ATOL = 1e-4, 1e-4
# (batch, seq, past) checked after export: the example shape, decode at past 1, prefill, batch 1 with a long past
CHECK_SHAPES = ((2, 3, 5), (1, 1, 1), (2, 4, 0), (1, 1, 9))


def glm_from_config(config_path: str | Path, weights_dir: str | Path | None = None):
    """A GlmForCausalLM or Glm4ForCausalLM (by the config's model_type, else its architectures) in eval mode.

    Without weights_dir the weights are random with a fixed seed; with it, safetensors weights are read from
    that directory (offline: local_files_only).
    """
    import transformers

    path = Path(config_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"GLM config {path}: cannot read it as JSON ({e})") from e
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        by_arch = {arch: kind for kind, arch in ARCHITECTURES.items()}
        model_type = next((by_arch[a] for a in data.get("architectures", []) if a in by_arch), None)
    if model_type is None:
        raise ConfigError(f"GLM config {path}: model_type {data.get('model_type')!r} / architectures "
                          f"{data.get('architectures')} is not one of {', '.join(ARCHITECTURES)} "
                          f"({', '.join(ARCHITECTURES.values())})")
    config_cls = transformers.Glm4Config if model_type == "glm4" else transformers.GlmConfig
    model_cls = getattr(transformers, ARCHITECTURES[model_type])
    if weights_dir is None:
        torch.manual_seed(SEED)
        try:
            model = model_cls(config_cls.from_dict({k: v for k, v in data.items() if k != "model_type"}))
        except (AssertionError, ValueError, TypeError, KeyError) as e:  # what transformers raises for bad fields
            raise ConfigError(f"GLM config {path}: transformers cannot build {model_cls.__name__} from it "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    else:
        config = config_cls.from_dict({k: v for k, v in data.items() if k != "model_type"})
        try:
            model = model_cls.from_pretrained(str(weights_dir), config=config, local_files_only=True,
                                              dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"GLM weights {weights_dir}: {str(e).splitlines()[0]}") from e
    return model.eval()


class CacheWrapper(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *pasts) -> (logits, *presents), flat tensors only.

    pasts/presents alternate key, value per layer. Without pasts (the prefill graph) the cache starts empty.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *pasts):
        from transformers import DynamicCache

        if pasts:
            cache = DynamicCache(ddp_cache_data=list(zip(pasts[0::2], pasts[1::2])))
        else:
            cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return (out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values)))


def io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of an exported graph."""
    kv = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    if with_past:
        inputs += [f"past_key_values.{i}.{kind}" for i, kind in kv]
    return inputs, ["logits"] + [f"present.{i}.{kind}" for i, kind in kv]


def export_glm(model, out_dir: str | Path, split: bool = False, opset: int = OPSET) -> dict:
    """Export `model` (from glm_from_config) to out_dir and check each graph against PyTorch with ONNX Runtime.

    split=False writes model.onnx, serving prefill (past length 0) and decode; split=True writes prefill.onnx
    (no past inputs) and decode.onnx (the same graph as model.onnx). Returns the manifest, also written to
    out_dir/manifest.json; generate.greedy reads it.
    Raises ModelError when an export fails or ONNX Runtime disagrees with PyTorch.
    """
    if opset not in (17, 18):
        raise ConfigError(f"GLM export opset {opset}: use 17 or 18")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    config = model.config
    wrapper = CacheWrapper(model).eval()
    shape = _cache_shape(config)
    if split:
        graphs = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
        _export_one(wrapper, out / graphs["prefill"], False, shape, opset)
    else:
        graphs = {"prefill": "model.onnx", "decode": "model.onnx"}
    _export_one(wrapper, out / graphs["decode"], True, shape, opset)
    inputs, outputs = io_names(config.num_hidden_layers, with_past=True)
    manifest = {
        "model_type": config.model_type,
        "split": split,
        "graphs": graphs,
        "opset": opset,
        "exporter": "dynamo",
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": shape[0],
        "head_dim": shape[1],
        "vocab_size": config.vocab_size,
        "dtype": "float32",
        "inputs": inputs,  # the decode graph's; the prefill graph has no past_key_values inputs
        "outputs": outputs,
        "axes": {"batch": "batch", "seq": "seq", "past": "past", "total": TOTAL_AXIS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cache_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of one cache tensor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads or config.num_attention_heads, head_dim


def _example(config, shape, batch: int, seq: int, past: int, with_past: bool, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    pasts = [torch.randn(batch, shape[0], past, shape[1], generator=gen)
             for _ in range(2 * config.num_hidden_layers)] if with_past else []
    return (ids, mask, positions, *pasts)


def _export_one(wrapper: CacheWrapper, file: Path, with_past: bool, shape: tuple[int, int], opset: int) -> None:
    config = wrapper.model.config
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    names, out_names = io_names(config.num_hidden_layers, with_past)
    if with_past:  # the mask's length is past + seq, which a Dim cannot say: the exporter derives it
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.DYNAMIC}, {0: batch, 1: seq},
                   tuple({0: batch, 2: past} for _ in range(2 * config.num_hidden_layers)))
        args = _example(config, shape, *CHECK_SHAPES[0], with_past=True, seed=SEED)
    else:
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
        args = _example(config, shape, 2, 3, 0, with_past=False, seed=SEED)
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_exporter_logs():
            warnings.simplefilter("ignore")  # the exporter's advice and axis-renaming notes
            torch.onnx.export(wrapper, args, str(file), dynamo=True, input_names=names, output_names=out_names,
                              opset_version=opset, dynamic_shapes=dynamic, external_data=True, verbose=False)
    except Exception as e:
        raise ModelError(f"GLM export {file}: {_summary(e)}") from e
    _name_total_axis(file, with_past)
    for check in CHECK_SHAPES if with_past else ((2, 4, 0), (1, 1, 0)):
        _check_with_ort(wrapper, file, names, out_names,
                        _example(config, shape, *check, with_past=with_past, seed=SEED + 1))


def _summary(e: Exception) -> str:
    """The exporter's one-line cause ('<class ...>: message' under its '## Exception summary'), else line one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith("<class ")), None)
    return cause or (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)


def _name_total_axis(file: Path, with_past: bool) -> None:
    """Give attention_mask's length axis the name the presents carry (the exporter names it s<N>)."""
    model = onnx.load(str(file), load_external_data=False)
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_param = TOTAL_AXIS if with_past else "seq"
    onnx.save(model, str(file))


def _check_with_ort(wrapper, file: Path, names, out_names, args) -> None:
    import onnxruntime as ort

    with torch.no_grad():
        want = [t.numpy() for t in wrapper(*args)]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    got = session.run(out_names, {n: t.numpy() for n, t in zip(names, args)})
    b, s = args[0].shape
    for name, g, w in zip(out_names, got, want):
        if g.shape != w.shape or not np.allclose(g, w, rtol=RTOL, atol=ATOL):
            diff = float(np.abs(g - w).max()) if g.shape == w.shape else float("nan")
            raise ModelError(f"GLM export {file}: output {name!r} at batch {b}, seq {s}, mask length "
                             f"{args[1].shape[1]}: ONNX Runtime gives shape {g.shape}, PyTorch {w.shape}, "
                             f"max abs diff {diff:.3g}")
