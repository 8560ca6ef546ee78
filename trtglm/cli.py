"""Command line: options -> BuildConfig -> pipeline.build. TrtglmError -> one line, non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trtglm import __version__
from trtglm.errors import ConfigError, TrtglmError

_PATH = click.Path(path_type=Path)


def _engine_options(fn):
    """TensorRT builder options shared by `build` and `engine`."""
    options = [
        click.option("--shapes", "shapes", multiple=True,
                     help="Engine profile NAME:MIN/OPT/MAX[,NAME:...] (shapes as 1x128); repeat for more profiles."),
        click.option("--batch", "batch_profile", help="Engine profile over axis 0 of the dynamic inputs: MIN:OPT:MAX."),
        click.option("--opt-level", default=3, show_default=True, help="TensorRT builder optimization level 0..5."),
        click.option("--workspace", type=int, help="TensorRT workspace memory pool limit in MiB."),
        click.option("--timing-cache", type=_PATH, help="TensorRT timing cache: read if present, updated after."),
        click.option("--plugins", multiple=True, type=_PATH,
                     help="Plugin library .so, Python plugin module .py, or `aot` (trtglm's ops as AOT plugins); repeatable; "
                          "also $TRTGLM_PLUGINS."),
        click.option("--implicit-int8", "implicit_cache", type=_PATH,
                     help="TensorRT 10 only: implicit INT8 from this calibration cache (TensorRT 11 has none)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _engine_config(shapes, batch_profile, opt_level, workspace, timing_cache, plugins, implicit_cache):
    from trtglm.config import EngineOptions
    from trtglm.engine.build import env_plugins
    from trtglm.profiles import parse_shapes

    opts = EngineOptions(opt_level=opt_level, workspace_mb=workspace, timing_cache=timing_cache,
                         plugins=tuple(plugins) + env_plugins(), implicit_cache=implicit_cache)
    return tuple(parse_shapes(text) for text in shapes), batch_profile, opts


def _run(ctx: click.Context, fn, *args):
    try:
        return fn(*args)
    except TrtglmError as e:
        if ctx.obj.get("debug"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtglm")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool):
    """trtglm: ONNX/PyTorch -> fused, calibrated INT8 Q/DQ ONNX -> TensorRT engine."""
    ctx.ensure_object(dict)["debug"] = debug


@main.command()
@click.argument("model", type=_PATH)
@click.option("--int8/--no-int8", default=True, show_default=True, help="Calibrate and insert Q/DQ.")
@click.option("--weight-only", type=click.Choice(["int8", "int4"]),
              help="Weight-only quantization with blocked scales (opset 21), no calibration data.")
@click.option("--block-size", default=128, show_default=True, help="--weight-only: weights per scale along K.")
@click.option("--asymmetric", is_flag=True, help="--weight-only: uint weights with zero points (ONNX Runtime).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
              help="auto: also build a TensorRT engine when TensorRT and a GPU are here; tensorrt: fail without.")
@click.option("--kv-cache", default="float", show_default=True, type=click.Choice(["float", "int8"]),
              help="int8: the KV cache (past/present tensors) as int8 with per-head scales; needs --calib.")
@click.option("--fp16", is_flag=True, help="Write the float part of the graph in FP16 (inputs/outputs keep their types).")
@click.option("--attention", default="decomposed", show_default=True, type=click.Choice(["decomposed", "native"]),
              help="native: rewrite attention blocks as the opset-23 Attention op (TensorRT >= 10.14 IAttention).")
@click.option("--tokenizer", type=_PATH, help="Local Hugging Face tokenizer dir: --calib/--eval are text files.")
@click.option("--max-seq", default=128, show_default=True, help="Text data: tokens per sample (truncation).")
@click.option("--calib", type=_PATH, help="Calibration data: .npy per input, .npz batches, or images.")
@click.option("--calib-script", help="file.py:fn returning an iterable of input dicts.")
@click.option("--calib-cache", type=_PATH, help="TensorRT calibration cache to use instead of data.")
@click.option("--calib-method", default="auto", show_default=True,
              type=click.Choice(["entropy", "minmax", "percentile", "mse", "auto"]),
              help="auto: per tensor, the method with the least error in the layers that read it.")
@click.option("--percentile", default=99.99, show_default=True, help="For --calib-method percentile.")
@click.option("--preprocess", help="Images: resize=..,crop=..,mean=..,std=..,layout=NCHW|NHWC")
@click.option("--eval", "eval_", type=_PATH, help="Held-out data (default: 20%% of the calibration data).")
@click.option("--exclude", multiple=True, help="Node name or op type (glob) kept in float; repeatable.")
@click.option("--int8-attention", is_flag=True, help="Also quantize attention BMMs (Q.K^T, P.V).")
@click.option("--unsigned/--no-unsigned", default=True, show_default=True,
              help="Quantize ReLU outputs read by Conv/Gemm as x - amax/2 on all 255 int8 levels (the shift goes "
                   "into the consumer's bias); --no-unsigned keeps them on the symmetric grid's 0..127.")
@click.option("--smoothquant", default="auto", show_default=True,
              help="SmoothQuant: auto (alpha searched per activation by output error), off, or an alpha in [0, 1].")
@click.option("--accuracy-budget", type=float,
              help="Keep the most sensitive linear layers in float until 1 - cosine vs FP32 is at most this.")
@click.option("--quant-config", type=_PATH, help="quant_config.json of an earlier build (edited or not) to apply.")
@click.option("--target", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "ort-cpu"]),
              help="Where the Q/DQ model will run; ort-cpu on CPUs without VNNI uses 7-bit weights.")
@click.option("--check-tol", type=float, help="Fail if INT8 loses more points than this (top-1, or 100*(1-cos)).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--max-calib-samples", type=int, help="Use at most this many calibration units.")
@click.option("--out", type=_PATH, help="Output directory (default: MODEL.trtglm/).")
@click.option("-o", "out_onnx", type=_PATH, help="Write the Q/DQ model to FILE.onnx; the rest beside it.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="ray: calibration as shards on Ray actors (pip install 'trtglm[ray]'); the same bytes as local.")
@click.option("--ray-address", help="--executor ray: the cluster to join (default: start a local one).")
@click.option("--workers", default=2, show_default=True, help="--executor ray: calibration actors.")
@click.option("--equalize", is_flag=True, help="Cross-layer equalization of Conv -> ReLU/ReLU6 -> Conv weight ranges.")
@click.option("--explicit-pads", is_flag=True,
              help="Convs that pad implicitly (PyTorch's 3x3) and read a ReLU output get an explicit Pad, so that "
                   "the ReLU output takes the unsigned grid (a Pad TensorRT cannot fuse).")
@click.option("--weight-rounding", default="nearest", show_default=True, type=click.Choice(["nearest", "adaround"]),
              help="adaround: learned up/down rounding per weight, minimizing each layer's output error on the "
                   "calibration data.")
@click.option("--bias-correction", default="none", show_default=True,
              type=click.Choice(["none", "empirical", "sequential", "analytic"]),
              help="Fold each quantized layer's expected output shift into its bias: from the calibration data "
                   "(empirical: each layer's own; sequential: also what earlier layers' noise shifts, measured "
                   "layer by layer on the quantized model, slower) or from BatchNorm statistics (analytic, "
                   "data-free).")
@click.option("--plugin-ops", is_flag=True,
              help="Also write MODEL.plugins.onnx with trtglm's plugin ops (residual+norm) for TensorRT; the engine "
                   "is built from it (see `trtglm plugins`).")
@_engine_options
@click.pass_context
def build(ctx, model, int8, weight_only, block_size, asymmetric, backend, kv_cache, fp16, attention, tokenizer, max_seq, calib, calib_script, calib_cache, calib_method, percentile, preprocess, eval_,
          exclude, int8_attention, unsigned, smoothquant, accuracy_budget, quant_config, target, check_tol, batch_size, max_calib_samples, out, out_onnx,
          executor, ray_address, workers, equalize, explicit_pads, weight_rounding, bias_correction, plugin_ops, shapes, batch_profile, opt_level, workspace, timing_cache, plugins, implicit_cache):
    """Fuse, calibrate and quantize MODEL; verify INT8 against FP32 on ONNX Runtime."""
    from trtglm import pipeline
    from trtglm.config import BuildConfig

    def go():
        if out is not None and out_onnx is not None:
            raise ConfigError("give either --out DIR or -o FILE.onnx, not both")
        profiles, batch, engine = _engine_config(shapes, batch_profile, opt_level, workspace, timing_cache, plugins,
                                                 implicit_cache)
        cfg = BuildConfig(model=model, out=out, out_onnx=out_onnx, int8=int8, weight_only=weight_only,
                          block_size=block_size, asymmetric=asymmetric, backend=backend, kv_cache=kv_cache, fp16=fp16, attention=attention,
                          tokenizer=tokenizer, max_seq=max_seq, calib=calib,
                          calib_script=calib_script, calib_cache=calib_cache, calib_method=calib_method,
                          percentile=percentile, preprocess=preprocess, eval=eval_, exclude=tuple(exclude), int8_attention=int8_attention,
                          unsigned=unsigned,
                          smoothquant=_smoothquant(smoothquant), accuracy_budget=accuracy_budget,
                          quant_config=quant_config,
                          target=target, check_tol=check_tol, batch_size=batch_size,
                          max_calib_samples=max_calib_samples, profiles=profiles, batch_profile=batch,
                          engine=engine, plugin_ops=plugin_ops, executor=executor, ray_address=ray_address,
                          workers=workers, equalize=equalize, explicit_pads=explicit_pads,
                          weight_rounding=weight_rounding,
                          bias_correction=bias_correction)
        pipeline.build(cfg)

    _run(ctx, go)


def _smoothquant(text: str) -> float | str | None:
    if text in ("auto", "off"):
        return None if text == "auto" else "off"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--smoothquant {text!r}: give auto, off, or an alpha in [0, 1]") from None


@main.command()
@click.argument("factory", required=False)
@click.option("--input", "inputs", multiple=True, help="name:shape:dtype, e.g. input:1x3x224x224:float32")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--opset", default=17, show_default=True)
@click.option("--hf-config", type=_PATH, help="GLM / GLM-4 config.json: export it with a KV cache (random weights).")
@click.option("--weights", type=_PATH, help="With --hf-config: a directory of safetensors weights.")
@click.option("--split", is_flag=True, help="With --hf-config: a prefill and a decode graph instead of one.")
@click.option("--max-batch", default=8, show_default=True, help="With --hf-config: shape profiles' largest batch.")
@click.option("--max-seq", type=int, help="With --hf-config: longest prompt (default: min(256, positions / 2)).")
@click.option("--max-cache", type=int, help="With --hf-config: longest past a decode step reads (default: "
                                             "max_position_embeddings - 1).")
@click.option("-o", "--output", type=_PATH, required=True, help="ONNX file to write (a directory with --hf-config).")
@click.pass_context
def export(ctx, factory, inputs, dynamic_batch, opset, hf_config, weights, split, max_batch, max_seq, max_cache,
           output):
    """Export FACTORY (module.py:fn returning a torch.nn.Module) to ONNX, or a GLM with --hf-config."""

    def go():
        if (factory is None) == (hf_config is None):
            raise ConfigError("give either FACTORY (module.py:fn) with --input, or --hf-config config.json")
        try:
            if hf_config is not None:
                from trtglm.export import glm
            else:
                from trtglm.export import torch_export
        except ImportError as e:
            raise ConfigError(f"trtglm export needs torch: pip install 'trtglm[export]' ({e})") from e
        if hf_config is not None:
            from trtglm.onnx_io import staged_directory

            model = glm.glm_from_config(hf_config, weights)
            with staged_directory(output) as staging:  # all files appear together, or none
                manifest = glm.export_glm(model, staging, split=split)
                lines = _write_profiles(staging, manifest, model.config, max_batch, max_seq, max_cache)
            for line in lines:
                click.echo(line.replace(str(staging), str(output)))
            return
        if not inputs:
            raise ConfigError("FACTORY needs --input name:shape:dtype (one per model input)")
        args = [torch_export.parse_input_arg(text) for text in inputs]
        result = torch_export.onnx_from_torch(torch_export.load_factory(factory), args, output,
                                              dynamic_batch=dynamic_batch, opset=opset)
        click.echo(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset})")

    _run(ctx, go)


def _write_profiles(out: Path, manifest: dict, config, max_batch: int, max_seq: int | None,
                    max_cache: int | None) -> list[str]:
    """A shape-profile manifest beside each exported graph (the engine stage reads it)."""
    import onnx

    from trtglm import profiles

    positions = int(config.max_position_embeddings)
    max_cache = max_cache if max_cache is not None else positions - 1
    max_seq = max_seq if max_seq is not None else min(256, positions // 2, max_cache)
    lines, graphs = [], manifest["graphs"]
    for role, name in sorted(graphs.items()):
        if role == "prefill" and graphs["prefill"] == graphs["decode"]:
            continue  # one graph serves both: one manifest with both profiles
        path = out / name
        phases = ("decode",) if manifest["split"] and role == "decode" else None
        found = profiles.profiles_for(onnx.load(path, load_external_data=False), max_batch, max_seq, max_cache,
                                      phases=phases, max_positions=positions)
        written = profiles.write_manifest(profiles.manifest_path(path), found, path)
        lines.append(f"wrote {path} and {written} ({len(found)} shape profile{'s' * (len(found) != 1)})")
    return lines


@main.command()
@click.argument("model", type=_PATH)
@click.option("--prompt-ids", help="Comma-separated token ids; ';' separates prompts of a batch.")
@click.option("--prompt", "prompts_text", multiple=True, help="Prompt text (repeatable: a batch); needs --tokenizer.")
@click.option("--tokenizer", type=_PATH, help="Local Hugging Face tokenizer directory for --prompt.")
@click.option("--max-new-tokens", default=16, show_default=True)
@click.pass_context
def generate(ctx, model, prompt_ids, prompts_text, tokenizer, max_new_tokens):
    """Greedy-decode with the KV cache on ONNX Runtime (MODEL: an export directory or an ONNX file)."""
    from trtglm import generate as gen

    def go():
        if (prompt_ids is None) == (not prompts_text):
            raise ConfigError("give either --prompt-ids 1,2,3 or --prompt TEXT --tokenizer DIR")
        decode = None
        if prompts_text:
            if tokenizer is None:
                raise ConfigError("--prompt needs --tokenizer DIR (a local Hugging Face tokenizer)")
            from trtglm.calib.text import text_codec

            encode, decode = text_codec(tokenizer)
            prompts = [encode(text) for text in prompts_text]
        else:
            try:
                prompts = [[int(t) for t in row.split(",") if t.strip()] for row in prompt_ids.split(";")]
            except ValueError:
                raise ConfigError(f"--prompt-ids {prompt_ids!r}: give integers like 1,2,3 (';' between prompts)") \
                    from None
        tokens, _, t = gen.greedy(model, prompts, max_new_tokens)
        for row in tokens:
            click.echo(decode(row) if decode else ",".join(map(str, row)))
        click.echo(f"time to first token {1e3 * t.ttft_s:.1f} ms; {t.tokens_per_s:.0f} tokens/s "
                   f"(decode, {len(prompts)} prompt{'s' * (len(prompts) != 1)}, ONNX Runtime CPU)", err=True)

    _run(ctx, go)


@main.command("bench-decode")
@click.argument("model", type=_PATH)
@click.option("--batch", "batches", default="1,4,16", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt-len", default=16, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.pass_context
def bench_decode(ctx, model, batches, prompt_len, new_tokens):
    """Per batch size: median / P99 per-token latency and tokens/s with the KV cache, and the speedup over
    decoding without a cache (ONNX Runtime CPU)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from trtglm import generate as gen

    def go():
        try:
            sizes = tuple(int(b) for b in batches.split(","))
        except ValueError:
            raise ConfigError(f"--batch {batches!r}: give batch sizes like 1,4,16") from None
        if min(sizes) < 1 or new_tokens < 2 or prompt_len < 1:
            raise ConfigError("--batch sizes, --prompt-len must be >= 1 and --new-tokens >= 2")
        vocab = _vocab(model)
        result = gen.bench_decode(model, sizes, prompt_len, new_tokens, vocab)
        table = Table(title=f"greedy decode, prompt {prompt_len} tokens, {new_tokens} new tokens, ONNX Runtime CPU")
        for col in ("batch", "TTFT ms", "median ms/token", "P99 ms/token", "tokens/s"):
            table.add_column(col, justify="right")
        for r in result["rows"]:
            table.add_row(str(r["batch"]), f"{r['ttft_ms']:.2f}", f"{r['median_ms']:.3f}", f"{r['p99_ms']:.3f}",
                          f"{r['tokens_per_s']:.0f}")
        Console(highlight=False).print(table)
        click.echo(f"batch 1, {new_tokens} tokens: KV cache {result['cache_tokens_per_s']:.0f} tokens/s vs no cache "
                   f"{result['no_cache_tokens_per_s']:.0f} tokens/s: {result['cache_speedup']:.2f}x "
                   f"(same tokens: {'yes' if result['same_tokens'] else 'NO'})")
        click.echo(json.dumps(result), err=True)

    _run(ctx, go)


@main.command("build-matrix")
@click.argument("model", type=_PATH)
@click.option("--gpus", required=True, help="GPU kinds, as Ray names them: A100,H100,L4 (one engine each).")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Calibrate and insert Q/DQ.")
@click.option("--calib", type=_PATH, help="Calibration data (as for build).")
@click.option("--eval", "eval_", type=_PATH, help="Held-out data (default: 20%% of the calibration data).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--out", type=_PATH, help="Output directory (default: MODEL.trtglm/); engines in OUT/<kind>/.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for all engine builds.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="Where calibration runs (the engine builds always run on Ray).")
@click.option("--ray-address", help="The Ray cluster (default: start a local one).")
@click.option("--workers", default=2, show_default=True, help="--executor ray: calibration actors.")
@_engine_options
@click.pass_context
def build_matrix_cmd(ctx, model, gpus, int8, calib, eval_, batch_size, out, timeout, executor, ray_address, workers,
                     shapes, batch_profile, opt_level, workspace, timing_cache, plugins, implicit_cache):
    """One Q/DQ model and calibration, then one TensorRT engine per GPU kind, each built by a Ray task on a node
    of that kind; OUT/<kind>/model.engine with its sidecar."""
    from trtglm import pipeline
    from trtglm.config import BuildConfig, ShapeProfile
    from trtglm.engine.matrix import build_matrix, parse_gpus

    def go():
        kinds = parse_gpus(gpus)
        if timeout <= 0:
            raise ConfigError(f"--timeout {timeout}: give seconds > 0")
        profiles, batch, engine = _engine_config(shapes, batch_profile, opt_level, workspace, timing_cache, plugins,
                                                 implicit_cache)
        cfg = BuildConfig(model=model, out=out, int8=int8, calib=calib, eval=eval_, batch_size=batch_size,
                          backend="onnxruntime", executor=executor, ray_address=ray_address, workers=workers,
                          profiles=profiles, batch_profile=batch, engine=engine)
        rep = pipeline.build(cfg)
        qdq = pipeline.Artefacts.of(cfg).qdq
        found = [{name: ShapeProfile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for name, p in prof.items()}
                 for prof in rep["engine"]["profiles"]]
        built = build_matrix(qdq, qdq.parent, kinds, found, engine, timeout, ray_address)
        for kind, path in built.items():
            click.echo(f"{kind}: wrote {path} and {path}.json")

    _run(ctx, go)


@main.command("engine")
@click.argument("model", type=_PATH)
@click.option("-o", "--output", type=_PATH, help="Engine file to write (default: MODEL with .engine).")
@_engine_options
@click.pass_context
def engine_cmd(ctx, model, output, shapes, batch_profile, opt_level, workspace, timing_cache, plugins, implicit_cache):
    """Build a TensorRT engine from an ONNX file (a Q/DQ ONNX from `trtglm build`, or any ONNX) with its sidecar."""
    import onnx

    from trtglm import profiles as prof
    from trtglm.engine.build import build_engine

    def go():
        found, batch, opts = _engine_config(shapes, batch_profile, opt_level, workspace, timing_cache, plugins,
                                            implicit_cache)
        if found and batch is not None:
            raise ConfigError("give the engine's shapes with either --shapes or --batch, not both")
        engine_path = output or model.with_suffix(".engine")
        if batch is not None:
            found = (prof.batch_profile(_inputs_only(model), batch),)
        elif not found and prof.manifest_path(model).is_file():
            found = tuple(prof.read_manifest(prof.manifest_path(model)).profiles)
        sidecar = build_engine(model, engine_path, list(found), opts.opt_level, opts.workspace_mb, opts.timing_cache,
                               opts.plugins, opts.implicit_cache)
        layers = sidecar["layers"]
        click.echo(f"wrote {engine_path} ({sidecar['build_seconds']:.1f} s; {layers['int8']} of {layers['count']} "
                   f"layers run INT8; TensorRT {sidecar['tensorrt_version']}) and {engine_path}.json")

    def _inputs_only(path):
        if not path.is_file():
            raise ConfigError(f"model {path}: file not found")
        return onnx.load(str(path), load_external_data=False)

    _run(ctx, go)


@main.command("run")
@click.argument("engine", type=_PATH)
@click.option("--inputs", type=_PATH, required=True, help=".npz with one array per engine input.")
@click.option("-o", "--output", type=_PATH, help="Write the outputs to this .npz.")
@click.option("--plugins", multiple=True, type=_PATH, help="Plugin library or module to load (repeatable).")
@click.pass_context
def run_cmd(ctx, engine, inputs, output, plugins):
    """Run ENGINE once on the inputs; print each output's shape and range, optionally save them."""
    import numpy as np

    from trtglm.engine.build import env_plugins
    from trtglm.engine.runtime import EngineSession, read_inputs
    from trtglm.onnx_io import atomic_path

    def go():
        feeds = read_inputs(inputs)
        with EngineSession(engine, tuple(plugins) + env_plugins()) as session:
            outputs = session.infer(feeds)
        for name, array in outputs.items():
            finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
            span = f"min {finite.min():.6g} max {finite.max():.6g}" if finite.size else "empty"
            click.echo(f"{name}: {array.dtype} {'x'.join(map(str, array.shape))} {span}")
        if output is not None:
            with atomic_path(output) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **outputs)
            click.echo(f"wrote {output}")

    _run(ctx, go)


@main.command("bench")
@click.argument("engine", type=_PATH)
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--warmup", default=20, show_default=True, help="Untimed launches per batch size.")
@click.option("--iterations", default=200, show_default=True, help="Timed launches per batch size.")
@click.option("--plugins", multiple=True, type=_PATH, help="Plugin library or module to load (repeatable).")
@click.option("--json", "json_path", type=_PATH, help="Where to save the results (default: ENGINE.bench.json).")
@click.pass_context
def bench_cmd(ctx, engine, batches, warmup, iterations, plugins, json_path):
    """Per batch size: median and P99 latency of one launch (CUDA events) and throughput; a table and JSON."""
    import json

    from rich.console import Console
    from rich.table import Table

    from trtglm.engine.build import env_plugins
    from trtglm.engine.runtime import EngineSession, bench_shapes, latency_stats, synthetic_feeds
    from trtglm.onnx_io import atomic_path

    def go():
        sizes = _batch_sizes(batches)
        if warmup < 0 or iterations < 1:
            raise ConfigError("--warmup must be >= 0 and --iterations >= 1")
        rows = []
        with EngineSession(engine, tuple(plugins) + env_plugins()) as session:
            for batch in sizes:
                profile, shapes = bench_shapes(session.ranges, batch, f"engine {engine}") if session.ranges else \
                    (0, dict(session.static))
                shapes = {**session.static, **shapes}
                feeds = synthetic_feeds(shapes, session.dtypes)
                row = latency_stats(session.time(feeds, warmup, iterations), batch)
                rows.append({**row, "profile": profile, "shapes": {n: list(s) for n, s in sorted(shapes.items())}})
            sidecar = session.sidecar
        table = Table(title=f"{engine.name}: GPU time per launch (CUDA events), {iterations} iterations")
        for col in ("batch", "profile", "median ms", "P99 ms", "mean ms", "samples/s"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r["batch"]), str(r["profile"]), f"{r['median_ms']:.3f}", f"{r['p99_ms']:.3f}",
                          f"{r['mean_ms']:.3f}", f"{r['throughput']:.0f}")
        Console(highlight=False).print(table)
        target = json_path or engine.with_name(engine.name + ".bench.json")
        result = {"engine": str(engine), "tensorrt_version": sidecar.get("tensorrt_version"),
                  "gpu": sidecar.get("gpu"), "warmup": warmup, "rows": rows}
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {target}")

    _run(ctx, go)


@main.command("compare")
@click.argument("candidate", type=_PATH)
@click.argument("reference", type=_PATH)
@click.option("--inputs", type=_PATH, required=True, help=".npz of one batch, or a data directory (as --calib).")
@click.option("--max-samples", default=32, show_default=True, help="Data directory: samples compared.")
@click.option("--batch-size", default=8, show_default=True, help="Data directory: samples per run.")
@click.option("--atol", default=0.05, show_default=True, help="Polygraphy's absolute tolerance.")
@click.option("--rtol", default=0.05, show_default=True, help="Polygraphy's relative tolerance.")
@click.option("--error-stat", default="mean", show_default=True,
              type=click.Choice(["elemwise", "max", "mean", "median"]), help="Polygraphy's check_error_stat.")
@click.option("--per-layer", is_flag=True, help="Compare every intermediate tensor; find where they part.")
@click.option("--runner", default="auto", show_default=True, type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
              help="For an ONNX candidate: ONNX Runtime (auto), or TensorRT (built by Polygraphy).")
@click.option("--plugins", multiple=True, type=_PATH, help="Plugin library or module to load (repeatable).")
@click.option("--json", "json_path", type=_PATH, help="Save the comparison as JSON.")
@click.pass_context
def compare_cmd(ctx, candidate, reference, inputs, max_samples, batch_size, atol, rtol, error_stat, per_layer, runner,
                plugins, json_path):
    """CANDIDATE (engine or Q/DQ ONNX) against REFERENCE (FP32 ONNX, ONNX Runtime); exit 1 when an output fails."""
    import json

    from trtglm.engine.build import env_plugins
    from trtglm.engine.compare import compare, print_result
    from trtglm.onnx_io import atomic_path

    def go():
        feeds = _compare_feeds(reference, inputs, max_samples, batch_size)
        result = compare(candidate, reference, feeds, atol, rtol, error_stat, per_layer, runner,
                         tuple(plugins) + env_plugins())
        print_result(result)
        if json_path is not None:
            with atomic_path(json_path) as tmp:
                tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        if not result.passed:
            sys.exit(1)

    _run(ctx, go)


@main.command("plugins")
@click.pass_context
def plugins_cmd(ctx):
    """List trtglm's TensorRT plugins: inputs, outputs, attributes, types, formats, and where they can come from."""
    from trtglm.engine.build import env_plugins
    from trtglm.plugins import CATALOG, VERSION

    def go():
        for s in CATALOG:
            click.echo(f"{s.name}  ({s.plugin_id}, version {VERSION}; kernels plugins/{s.kernel}/)")
            click.echo(f"  {s.summary}")
            click.echo(f"  inputs:     {', '.join(s.inputs)}")
            click.echo(f"  outputs:    {', '.join(s.outputs)}")
            for i, a in enumerate(s.attributes):
                click.echo(f"  {'attributes:' if i == 0 else '           '} {a.name} ({a.type}, default {a.default}): "
                           f"{a.doc}")
            click.echo(f"  types:      {', '.join(s.dtypes)}; formats: {s.formats}; {s.limits}\n")
        libraries = env_plugins()
        click.echo("plugin library: " + (", ".join(map(str, libraries)) if libraries else
                                         "none in $TRTGLM_PLUGINS (build it: see plugins/README.md)"))
        try:
            from trtglm.plugins.ptx import nvcc

            click.echo(f"ahead-of-time kernels: PTX compiled by {nvcc()}")
        except TrtglmError as e:
            click.echo(f"ahead-of-time kernels: unavailable: {e}")

    _run(ctx, go)


def _compare_feeds(reference: Path, inputs: Path, max_samples: int, batch_size: int) -> list:
    import onnx

    from trtglm.calib.data import input_specs, open_dataset
    from trtglm.engine.runtime import read_inputs

    if inputs.is_file():
        return [read_inputs(inputs)]
    if not reference.is_file():
        raise ConfigError(f"reference {reference}: file not found")
    data = open_dataset(inputs, input_specs(onnx.load(str(reference), load_external_data=False)), what="input")
    return list(data.batches(range(min(len(data), max_samples)), batch_size))


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch {text!r}: give batch sizes like 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch {text!r}: batch sizes must be >= 1")
    return sizes


def _vocab(model: Path) -> int:
    import json

    manifest = model / "manifest.json" if model.is_dir() else None
    if manifest is not None and manifest.is_file():
        return int(json.loads(manifest.read_text()).get("vocab_size", 2))
    return 2


if __name__ == "__main__":
    main()
