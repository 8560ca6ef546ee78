"""Build configuration: one frozen dataclass; CLI flags are the kebab-case of its fields. None means default."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trtglm.errors import ConfigError

CALIB_METHODS = ("entropy", "minmax", "percentile", "mse", "auto")
TARGETS = ("tensorrt", "ort-cpu")
ATTENTION = ("decomposed", "native")
WEIGHT_ONLY = ("int8", "int4")


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile entry for a dynamic input: min <= opt <= max, per axis."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ConfigError(f"shape profile {self}: min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not lo <= mid <= hi:
                raise ConfigError(f"shape profile {self}: need min <= opt <= max on every axis")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which nodes get INT8 beyond TensorRT's placement rules (the rules themselves live in passes/insert_qdq)."""

    exclude: tuple[str, ...] = ()  # node names or op types (glob) kept in float
    # Attention BMMs (Q.K^T, P.V: MatMuls of two activations) stay float by default: TensorRT's INT8 fused
    # attention needs head size 16/32/64 and sequence <= 512, and they carry the softmax's dynamic range.
    int8_attention: bool = False
    keep_float: frozenset[str] = frozenset()  # exact node names kept in float (accuracy budget, --quant-config)
    unsigned: bool = True  # non-negative activations (ReLU outputs) on the unsigned grid (passes/insert_qdq)


@dataclass(frozen=True)
class EngineOptions:
    """TensorRT builder settings (the engine stage); recorded in the trtexec command of every build."""

    opt_level: int = 3  # builder optimization level 0..5
    workspace_mb: int | None = None  # workspace memory pool limit; None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None  # read if present, written back after the build
    plugins: tuple[Path, ...] = ()  # plugin libraries (.so) and Python plugin modules (.py)
    implicit_cache: Path | None = None  # TensorRT 10 only, on request: implicit INT8 from this calibration cache


@dataclass(frozen=True)
class BuildConfig:
    model: Path
    out: Path | None = None  # output directory (default: <model stem>.trtglm/ beside the model)
    out_onnx: Path | None = None  # -o FILE.onnx: the Q/DQ model alone; the rest is written beside it
    int8: bool = True
    fp16: bool = False  # convert the float part of the graph to FP16 (TensorRT 11 has no FP16 builder flag)
    weight_only: str | None = None  # int8 | int4: blocked weight-only quantization instead of calibrated INT8
    block_size: int = 128  # weight-only: weights per scale along the reduction axis
    asymmetric: bool = False  # weight-only: uint weights with zero points (ONNX Runtime; TensorRT wants symmetric)
    backend: str = "auto"  # auto: a TensorRT engine when TensorRT and a GPU are here | tensorrt | onnxruntime
    kv_cache: str = "float"  # int8: past/present KV-cache tensors as int8 with per-head scales
    attention: str = "decomposed"  # native: rewrite attention blocks as the opset-23 Attention op
    tokenizer: Path | None = None  # --calib/--eval are text files, tokenized with this local tokenizer
    max_seq: int = 128  # text: truncate (and pad, for a static sequence axis) to this many tokens
    calib: Path | None = None  # data directory (.npy per input, .npz batches, or images)
    calib_script: str | None = None  # file.py:fn returning an iterable of input dicts
    calib_cache: Path | None = None  # TensorRT calibration cache instead of data
    calib_method: str = "auto"  # per tensor, by the error in the layers that read it; or one method for all
    percentile: float = 99.99
    preprocess: str | None = None  # images only: resize=..,crop=..,mean=..,std=..,layout=NCHW|NHWC
    eval: Path | None = None  # held-out data; default: a split of the calibration data
    exclude: tuple[str, ...] = ()  # node names or op types (glob) kept in float
    int8_attention: bool = False  # also quantize the attention BMMs
    unsigned: bool = True  # non-negative activations on the unsigned grid (passes/insert_qdq)
    smoothquant: float | str | None = None  # alpha in [0, 1], "off"; None: auto (per tensor, by output error)
    accuracy_budget: float | None = None  # keep the most sensitive layers float until 1 - cosine <= this
    quant_config: Path | None = None  # decisions of an earlier build (quant_config.json), edited or not
    target: str = "tensorrt"  # tensorrt | ort-cpu
    check_tol: float | None = None  # max allowed drop in top-1 points (logits) or 1 - cosine otherwise
    batch_size: int = 32
    max_calib_samples: int | None = None
    profiles: tuple[dict[str, ShapeProfile], ...] = field(default_factory=tuple)  # --shapes (one per profile)
    batch_profile: str | None = None  # --batch MIN:OPT:MAX: one profile over axis 0 of the dynamic inputs
    executor: str = "local"  # local: in-process | ray: calibration shards on Ray actors (same bytes)
    ray_address: str | None = None  # --executor ray: an existing cluster; None: a local one of `workers` CPUs
    workers: int = 2  # --executor ray: calibration actors (one ONNX Runtime thread each)
    equalize: bool = False  # cross-layer equalization of Conv -> ReLU -> Conv pairs (after BatchNorm folding)
    explicit_pads: bool = False  # a Conv's implicit padding as a Pad, so that its ReLU input takes the unsigned grid
    weight_rounding: str = "nearest"  # nearest | adaround: learned up/down rounding on the layer's input statistics
    bias_correction: str = "none"  # none | empirical | sequential (calibration data) | analytic (BatchNorm statistics)
    plugin_ops: bool = False  # also write the model with trtglm's plugin ops (TensorRT only), checked via its fallback
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self):
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"--calib-method {self.calib_method!r}: choose one of {', '.join(CALIB_METHODS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile {self.percentile}: must be in (50, 100]")
        if self.smoothquant not in (None, "off") and not (
                isinstance(self.smoothquant, float) and 0.0 <= self.smoothquant <= 1.0):
            raise ConfigError(f"--smoothquant {self.smoothquant}: give auto, off, or an alpha in [0, 1]")
        if isinstance(self.smoothquant, float) and self.calib_cache is not None:
            raise ConfigError("--smoothquant needs calibration data (per-channel statistics), not --calib-cache")
        if self.accuracy_budget is not None and not 0.0 < self.accuracy_budget < 1.0:
            raise ConfigError(f"--accuracy-budget {self.accuracy_budget}: give 1 - cosine in (0, 1), e.g. 0.005")
        if self.accuracy_budget is not None and self.calib_cache is not None:
            raise ConfigError("--accuracy-budget needs calibration data to measure sensitivity, not --calib-cache")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.attention not in ATTENTION:
            raise ConfigError(f"--attention {self.attention!r}: choose one of {', '.join(ATTENTION)}")
        if self.int8_attention and self.attention == "native":
            raise ConfigError("--int8-attention needs --attention decomposed: the Attention op takes no Q/DQ inside")
        if self.tokenizer is not None and self.calib is None and self.eval is None:
            raise ConfigError("--tokenizer applies to text files given with --calib or --eval")
        if self.max_seq < 2:
            raise ConfigError(f"--max-seq {self.max_seq}: must be at least 2")
        if not self.int8 and (self.accuracy_budget is not None or self.quant_config is not None):
            raise ConfigError("--accuracy-budget and --quant-config apply to INT8 builds; drop --no-int8")
        if self.weight_only is not None and self.weight_only not in WEIGHT_ONLY:
            raise ConfigError(f"--weight-only {self.weight_only!r}: choose one of {', '.join(WEIGHT_ONLY)}")
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size {self.block_size}: give a power of two >= 2 (128 is typical)")
        if self.backend not in ("auto", "tensorrt", "onnxruntime"):
            raise ConfigError(f"--backend {self.backend!r}: choose auto, tensorrt or onnxruntime")
        if self.kv_cache not in ("float", "int8"):
            raise ConfigError(f"--kv-cache {self.kv_cache!r}: choose float or int8")
        if self.kv_cache == "int8" and (self.calib is None or not self.int8):
            raise ConfigError("--kv-cache int8 needs --calib data (per-head scales) and an INT8 or --weight-only build")
        if self.asymmetric and self.weight_only is None:
            raise ConfigError("--asymmetric applies to --weight-only")
        if self.weight_only is not None and (self.accuracy_budget is not None or self.quant_config is not None
                                             or self.calib_cache is not None):
            raise ConfigError("--weight-only needs no calibration: drop --accuracy-budget/--quant-config/--calib-cache")
        if self.static_int8 and sum(x is not None for x in (self.calib, self.calib_script, self.calib_cache)) != 1:
            raise ConfigError("--int8 needs exactly one of --calib DIR, --calib-script FILE.py:fn, --calib-cache FILE")
        if self.preprocess is not None and self.calib is None:
            raise ConfigError("--preprocess applies to an image directory given with --calib")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"--executor {self.executor!r}: choose local or ray")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: give at least 1")
        if self.weight_rounding not in ("nearest", "adaround"):
            raise ConfigError(f"--weight-rounding {self.weight_rounding!r}: choose nearest or adaround")
        if self.bias_correction not in ("none", "empirical", "analytic", "sequential"):
            raise ConfigError(f"--bias-correction {self.bias_correction!r}: choose none, empirical, sequential or "
                              "analytic")
        if (self.weight_rounding == "adaround" or self.bias_correction in ("empirical", "sequential")) and \
                (not self.static_int8 or self.calib_cache is not None):
            raise ConfigError("--weight-rounding adaround and --bias-correction empirical/sequential need calibration "
                              "data and an INT8 build; without data, --bias-correction analytic uses the BatchNorm "
                              "statistics")
        if self.bias_correction == "analytic" and not self.static_int8:
            raise ConfigError("--bias-correction applies to INT8 builds")
        if self.profiles and self.batch_profile is not None:
            raise ConfigError("give the engine's shapes with either --shapes or --batch, not both")
        if self.engine.implicit_cache is not None and self.backend == "onnxruntime":
            raise ConfigError("--implicit-int8 is a TensorRT 10 engine build; drop --backend onnxruntime")

    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy(exclude=self.exclude, int8_attention=self.int8_attention,
                               unsigned=self.unsigned and not self.fp16_on_cpu)

    @property
    def fp16_on_cpu(self) -> bool:
        """--fp16 for ONNX Runtime's CPU: its FP16 convolutions accumulate in FP16, and an unsigned-grid layer's
        shifted bias (b + c * sum(W)) cancels against its centred input in that precision (logits cosine 0.74
        against 0.99 on a MobileNetV2-style net), so the grid stays off there. TensorRT's INT8 layers accumulate in
        int32 and are not affected."""
        return self.fp16 and self.target == "ort-cpu"

    @property
    def static_int8(self) -> bool:
        """Calibrated INT8 with activation Q/DQ (the default); --weight-only replaces it."""
        return self.int8 and self.weight_only is None

    @property
    def smoothquant_auto(self) -> bool:
        return self.smoothquant is None and self.calib_cache is None

    @property
    def out_dir(self) -> Path:
        if self.out_onnx is not None:
            return self.out_onnx.parent
        if self.out is not None:
            return self.out
        return self.model.with_suffix(".trtglm")
