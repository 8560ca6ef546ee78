"""Command line: options -> BuildConfig -> pipeline.build. TrtglmError -> one line, non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trtglm import __version__
from trtglm.errors import ConfigError, TrtglmError

_PATH = click.Path(path_type=Path)


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
@click.pass_context
def build(ctx, model, int8, weight_only, block_size, asymmetric, fp16, attention, tokenizer, max_seq, calib, calib_script, calib_cache, calib_method, percentile, preprocess, eval_,
          exclude, int8_attention, smoothquant, accuracy_budget, quant_config, target, check_tol, batch_size, max_calib_samples, out, out_onnx):
    """Fuse, calibrate and quantize MODEL; verify INT8 against FP32 on ONNX Runtime."""
    from trtglm import pipeline
    from trtglm.config import BuildConfig

    def go():
        if out is not None and out_onnx is not None:
            raise ConfigError("give either --out DIR or -o FILE.onnx, not both")
        cfg = BuildConfig(model=model, out=out, out_onnx=out_onnx, int8=int8, weight_only=weight_only,
                          block_size=block_size, asymmetric=asymmetric, fp16=fp16, attention=attention,
                          tokenizer=tokenizer, max_seq=max_seq, calib=calib,
                          calib_script=calib_script, calib_cache=calib_cache, calib_method=calib_method,
                          percentile=percentile, preprocess=preprocess, eval=eval_, exclude=tuple(exclude), int8_attention=int8_attention,
                          smoothquant=_smoothquant(smoothquant), accuracy_budget=accuracy_budget,
                          quant_config=quant_config,
                          target=target, check_tol=check_tol, batch_size=batch_size,
                          max_calib_samples=max_calib_samples)
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
@click.argument("factory")
@click.option("--input", "inputs", multiple=True, required=True, help="name:shape:dtype, e.g. input:1x3x224x224:float32")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--opset", default=17, show_default=True)
@click.option("-o", "--output", type=_PATH, required=True, help="ONNX file to write.")
@click.pass_context
def export(ctx, factory, inputs, dynamic_batch, opset, output):
    """Export FACTORY (module.py:fn returning a torch.nn.Module) to ONNX."""

    def go():
        try:
            from trtglm.export import torch_export
        except ImportError as e:
            raise ConfigError(f"trtglm export needs torch: pip install 'trtglm[export]' ({e})") from e
        args = [torch_export.parse_input_arg(text) for text in inputs]
        result = torch_export.onnx_from_torch(torch_export.load_factory(factory), args, output,
                                              dynamic_batch=dynamic_batch, opset=opset)
        click.echo(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset})")

    _run(ctx, go)


if __name__ == "__main__":
    main()
