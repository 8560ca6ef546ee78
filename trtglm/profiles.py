"""Shape profiles: min/opt/max shapes of every dynamic input, checked against the model, and their manifest.

Why: TensorRT builds an engine for ranges of input shapes (optimization profiles) and tunes its kernels at each
profile's opt shape. A decoder with a KV cache sees two very different ranges, so it gets two profiles:
  prefill  batch 1..max_batch, sequence 1..max_seq, past 0
  decode   batch 1..max_batch, sequence 1,          past 1..max_cache
(a split export gets one per graph: `phases=("prefill",)` / `("decode",)`). Profiles come from `profiles_for`
(--max-batch/--max-seq/--max-cache) or from `parse_shapes` (--shapes), and `check_profiles` rejects a spec that
contradicts the model before any work, with one line naming the input, rather than after calibration or deep in
the TensorRT builder. The manifest (`<model>.profiles.json` beside the ONNX) carries them to the engine stage.

Axes are found by the input names transformers exports use:
  input_ids, position_ids             [batch, seq]
  attention_mask                      [batch, past + seq]
  past_key_values.{i}.key / .value    [batch, kv_heads, past, head_dim]   (kv_heads and head_dim static)
Any other dynamic input is derived when its dim_params name one of those axes (e.g. cache_position ['seq']).
A static dim in the model pins its axis (a decode graph exported with seq 1 gets only the decode profile).
Opt values: the middle of each range, (min + max) // 2 (TensorRT-LLM's choice), unless given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from trtglm.config import ShapeProfile
from trtglm.errors import ConfigError
from trtglm.onnx_io import atomic_path

FORMAT = "trtglm.profiles/1"
PHASES = ("prefill", "decode")
_VARIES = {"prefill": "seq", "decode": "past"}  # the axis whose range makes the phase
_PAST = re.compile(r"past_key_values\.\d+\.(key|value)")
_ROLES = {"input_ids": ("batch", "seq"), "position_ids": ("batch", "seq"), "attention_mask": ("batch", "total")}
_PAST_ROLES = ("batch", None, "past", None)
_SHAPE = re.compile(r"\d+(x\d+)*")

Dims = tuple[int | str | None, ...]
Span = tuple[int, int, int]


def model_inputs(model: onnx.ModelProto) -> dict[str, Dims | None]:
    """Graph inputs (initializers excluded) -> dims: int if static, the dim_param (or None) if dynamic."""
    inits = {i.name for i in model.graph.initializer}
    inputs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        inputs[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in tt.shape.dim) if tt.HasField("shape") else None
    return inputs


def profiles_for(model: onnx.ModelProto, max_batch: int, max_seq: int, max_cache: int, opt_batch: int | None = None,
                 opt_seq: int | None = None, opt_cache: int | None = None, phases: tuple[str, ...] | None = None,
                 max_positions: int | None = None) -> list[dict[str, ShapeProfile]]:
    """Prefill then decode profile (those of `phases`) for every dynamic input; profiles name no static input.

    max_cache is the longest past a decode step reads (it writes max_cache + 1). phases=None: prefill, and decode
    when the model has past_key_values inputs, less a phase that the model's static dims rule out or pin
    (a graph with seq fixed at 1 gets only the decode profile).
    """
    for flag, value in (("--max-batch", max_batch), ("--max-seq", max_seq), ("--max-cache", max_cache)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    inputs = model_inputs(model)
    has_past = any(_PAST.fullmatch(name) for name in inputs)
    chosen = phases is not None
    phases = phases or (PHASES if has_past else ("prefill",))
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"profile phase {unknown[0]!r}: choose from {', '.join(PHASES)}")
    if "decode" in phases and not has_past:
        raise ConfigError("decode profile: the model has no past_key_values.{i}.key/value inputs to read a cache from")
    if "decode" in phases and max_seq > max_cache:
        raise ConfigError(f"--max-seq {max_seq} is more than --max-cache {max_cache}: a decode step could not read "
                          f"the cache of the longest prompt")
    batch = _range("--opt-batch", 1, opt_batch, max_batch)
    wanted = {"prefill": {"batch": batch, "seq": _range("--opt-seq", 1, opt_seq, max_seq), "past": (0, 0, 0)},
              "decode": {"batch": batch, "seq": (1, 1, 1), "past": _range("--opt-cache", 1, opt_cache, max_cache)}}
    axes, pins = _axis_roles(inputs)
    fits = {phase: _fit(axes, pins, wanted[phase]) for phase in phases}
    if not chosen:  # keep the phases that fit, and drop one whose axis the model pins (seq 1: a decode graph)
        fitting = {phase: p for phase, p in fits.items() if p is not None}
        fits = {phase: p for phase, p in fitting.items() if _VARIES[phase] not in pins} or fitting or fits
    profiles = []
    for phase, profile in fits.items():
        if profile is None:
            raise ConfigError(f"{phase} profile: the model's static dims ({_pins(pins)}) leave no shape in batch "
                              f"{_fmt(batch)}, seq {_fmt(wanted[phase]['seq'])}, past {_fmt(wanted[phase]['past'])}")
        if profile not in profiles:
            profiles.append(profile)
    check_profiles(model, profiles, max_positions)
    return profiles


def parse_shapes(text: str) -> dict[str, ShapeProfile]:
    """One profile from `NAME:MIN/OPT/MAX,NAME:MIN/OPT/MAX,...`; `NAME:SHAPE` alone fixes the input at SHAPE.

    Shapes are trtexec's `AxBxC`, so `--shapes input_ids:1x1/4x64/8x512` is trtexec's
    `--minShapes=input_ids:1x1 --optShapes=input_ids:4x64 --maxShapes=input_ids:8x512`. The name is what comes
    before the last ':' (trtexec's quotes around it are allowed).
    """
    profile = {}
    for item in text.split(","):
        name, sep, spec = item.strip().rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name:
            raise ConfigError(f"--shapes {item.strip()!r}: write NAME:MIN/OPT/MAX, e.g. input_ids:1x1/4x64/8x512")
        if name in profile:
            raise ConfigError(f"--shapes: input '{name}' is given twice")
        shapes = [s.strip() for s in spec.split("/")]
        if len(shapes) not in (1, 3):
            raise ConfigError(f"--shapes: input '{name}' has {len(shapes)} shapes; give MIN/OPT/MAX or one shape")
        bad = next((s for s in shapes if not _SHAPE.fullmatch(s)), None)
        if bad is not None:
            raise ConfigError(f"--shapes: input '{name}': {bad!r} is not a shape such as 1x128 (integers joined by x)")
        dims = [tuple(int(d) for d in s.split("x")) for s in shapes]
        profile[name] = _profile("--shapes", name, *(dims * 3 if len(dims) == 1 else dims))
    return profile


def batch_profile(model: onnx.ModelProto, spec: str, example: dict[str, tuple[int, ...]] | None = None
                  ) -> dict[str, ShapeProfile]:
    """One profile from `--batch MIN:OPT:MAX` (or `MIN:MAX`, opt in the middle): axis 0 of every dynamic input
    spans it; its other dynamic axes take their size from `example` (a data sample), else it is an error asking
    for --shapes."""
    try:
        parts = [int(v) for v in spec.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise ConfigError(f"--batch {spec!r}: give MIN:OPT:MAX batch sizes (e.g. 1:8:32) or MIN:MAX")
    if parts != sorted(parts):
        raise ConfigError(f"--batch {spec!r}: need MIN <= OPT <= MAX")
    lo, opt, hi = _range("--batch", parts[0], parts[1] if len(parts) == 3 else None, parts[-1])
    profile = {}
    for name, dims in model_inputs(model).items():
        if dims is not None and all(isinstance(d, int) for d in dims):
            continue
        if not dims:
            raise ConfigError(f"--batch: input '{name}' has no known rank; give its shapes with --shapes")
        rest = []
        for axis, d in enumerate(dims[1:], start=1):
            if isinstance(d, int):
                rest.append(d)
            elif example is not None and name in example and len(example[name]) == len(dims):
                rest.append(int(example[name][axis]))
            else:
                raise ConfigError(f"--batch: input '{name}' axis {axis} ({d or '?'}) is dynamic too; give its "
                                  f"range with --shapes {name}:MIN/OPT/MAX")
        profile[name] = ShapeProfile((lo, *rest), (opt, *rest), (hi, *rest))
    return profile


def check_profiles(model: onnx.ModelProto, profiles: list[dict[str, ShapeProfile]],
                   max_positions: int | None = None) -> None:
    """Raise a one-line ConfigError naming the input if a profile contradicts the model.

    Checked: input names, ranks, static dims, every dynamic input present, axes of one dim_param (or of one role:
    batch, seq, past) equal across inputs, attention_mask length = past + seq, and past + seq <= max_positions
    (default: the model's metadata_props "max_position_embeddings", when present).
    """
    inputs = model_inputs(model)
    if max_positions is None:
        meta = {p.key: p.value for p in model.metadata_props}
        max_positions = int(meta["max_position_embeddings"]) if "max_position_embeddings" in meta else None
    dynamic = [n for n, dims in inputs.items() if dims is None or not all(isinstance(d, int) for d in dims)]
    for k, profile in enumerate(profiles):
        where = f"profile {k}"
        for name, p in profile.items():
            if name not in inputs:
                raise ConfigError(f"{where}: input '{name}' is not a model input (it has {_names(inputs)})")
            dims = inputs[name]
            if dims is None:
                continue
            if len(p.min) != len(dims):
                raise ConfigError(f"{where}: input '{name}' has rank {len(p.min)}, the model's is {len(dims)} "
                                  f"[{_dims(dims)}]")
            for axis, d in enumerate(dims):
                if isinstance(d, int) and _span(p, axis) != (d, d, d):
                    raise ConfigError(f"{where}: input '{name}' axis {axis} is {_fmt(_span(p, axis))}, the model "
                                      f"fixes it at {d} [{_dims(dims)}]")
        missing = next((n for n in dynamic if n not in profile), None)
        if missing is not None:
            raise ConfigError(f"{where}: input '{missing}' has dynamic axes [{_dims(inputs[missing] or ())}] but no "
                              f"shapes; add it")
        _check_axes(where, profile, inputs, max_positions)


@dataclass(frozen=True)
class Manifest:
    profiles: list[dict[str, ShapeProfile]]
    model: Path
    extra: dict = field(default_factory=dict)


def manifest_path(model_path: Path) -> Path:
    """Where the manifest of `model_path` lives: model.onnx -> model.profiles.json beside it."""
    return Path(model_path).with_suffix(".profiles.json")


def write_manifest(path: Path, profiles: list[dict[str, ShapeProfile]], model_path: Path,
                   extra: dict | None = None) -> Path:
    """Write the profiles as JSON, atomically; the model is stored relative to the manifest when beside it."""
    path, model_path = Path(path), Path(model_path)
    model = model_path.name if model_path.parent.resolve() == path.parent.resolve() else str(model_path.resolve())
    doc = {"format": FORMAT, "model": model,
           "profiles": [{name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                         for name, p in profile.items()} for profile in profiles],
           "extra": extra or {}}
    # one shape per line: a list that opens a line holds only ints (JSON strings cannot hold a raw newline)
    text = re.sub(r"\[\n[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group())), json.dumps(doc, indent=2))
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"manifest {path}: cannot read it as JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ConfigError(f"manifest {path}: format {found!r} is not {FORMAT!r}; rebuild it with this trtglm")
    try:
        profiles = [{name: _profile(f"manifest {path} profile {k}", name,
                                    *(tuple(spec[m]) for m in ("min", "opt", "max")))
                     for name, spec in profile.items()} for k, profile in enumerate(doc["profiles"])]
        return Manifest(profiles, path.parent / doc["model"], dict(doc["extra"]))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"manifest {path}: malformed ({type(e).__name__}: {e})") from e


def _profile(where: str, name: str, lo: tuple[int, ...], mid: tuple[int, ...], hi: tuple[int, ...]) -> ShapeProfile:
    if not len(lo) == len(mid) == len(hi):
        raise ConfigError(f"{where}: input '{name}' has min, opt, max of ranks {len(lo)}, {len(mid)}, {len(hi)}; "
                          f"they must be equal")
    for axis, dims in enumerate(zip(lo, mid, hi)):
        if not all(isinstance(d, int) for d in dims) or not 0 <= dims[0] <= dims[1] <= dims[2]:
            raise ConfigError(f"{where}: input '{name}' axis {axis} is {_fmt(dims)}; need integers "
                              f"0 <= min <= opt <= max")
    return ShapeProfile(tuple(lo), tuple(mid), tuple(hi))


def _range(flag: str, lo: int, opt: int | None, hi: int) -> Span:
    opt = (lo + hi) // 2 if opt is None else opt
    if not lo <= opt <= hi:
        raise ConfigError(f"{flag} {opt}: must be in {lo}..{hi}")
    return lo, opt, hi


def _roles(name: str, rank: int) -> tuple[str | None, ...] | None:
    roles = _PAST_ROLES if _PAST.fullmatch(name) else _ROLES.get(name)
    return roles if roles is not None and len(roles) == rank else None


def _axis_roles(inputs: dict[str, Dims | None]) -> tuple[dict[str, tuple[int | str, ...]], dict[str, int]]:
    """Input -> per axis its static size or role; and the roles that a static dim pins to one size."""
    named = {}  # dim_param -> role, from the inputs whose axes are known by name
    for name, dims in inputs.items():
        if dims is None:
            raise ConfigError(f"model input '{name}' has no shape; give its shapes with --shapes")
        for d, role in zip(dims, _roles(name, len(dims)) or ()):
            if isinstance(d, str) and role:
                named.setdefault(d, role)
    axes, pins = {}, {}
    for name, dims in inputs.items():
        roles = _roles(name, len(dims)) or (None,) * len(dims)
        entry = []
        for axis, (d, role) in enumerate(zip(dims, roles)):
            if isinstance(d, int):
                entry.append(d)
                if role:
                    pins.setdefault(role, d)
                continue
            role = role or named.get(d)
            if role is None:
                raise ConfigError(f"model input '{name}' axis {axis} ({d or 'unnamed'}) is dynamic but no batch, seq "
                                  f"or past axis; give its shapes with --shapes")
            entry.append(role)
        axes[name] = tuple(entry)
    return axes, pins


def _fit(axes: dict[str, tuple[int | str, ...]], pins: dict[str, int],
         sizes: dict[str, Span]) -> dict[str, ShapeProfile] | None:
    sizes = dict(sizes)
    for role in ("batch", "seq", "past"):
        if role in pins:
            if not sizes[role][0] <= pins[role] <= sizes[role][2]:
                return None
            sizes[role] = (pins[role],) * 3
    sizes["total"] = tuple(s + p for s, p in zip(sizes["seq"], sizes["past"]))
    if "total" in pins and sizes["total"] != (pins["total"],) * 3:
        return None
    return {name: ShapeProfile(*(tuple(a if isinstance(a, int) else sizes[a][m] for a in entry) for m in range(3)))
            for name, entry in axes.items() if not all(isinstance(a, int) for a in entry)}


def _check_axes(where: str, profile: dict[str, ShapeProfile], inputs: dict[str, Dims | None],
                max_positions: int | None) -> None:
    """Axes of one dim_param or one role agree; attention_mask = past + seq; positions within the model's."""
    spans: dict[object, tuple[str, Span]] = {}  # dim_param or role -> (first input, its span)
    for name, dims in inputs.items():
        if dims is None:
            continue
        p = profile.get(name)
        roles = _roles(name, len(dims)) or (None,) * len(dims)
        for axis, (d, role) in enumerate(zip(dims, roles)):
            span = _span(p, axis) if p is not None else (d, d, d)
            for key in (("dim", d) if isinstance(d, str) else None, ("role", role) if role else None):
                if key is None:
                    continue
                first = spans.setdefault(key, (name, span))
                if first[1] != span:
                    label = f"'{d}'" if key[0] == "dim" else role
                    raise ConfigError(f"{where}: input '{name}' axis {axis} ({label}) is {_fmt(span)} but input "
                                      f"'{first[0]}' has {_fmt(first[1])} on that axis; they must match")
    seq, past, total = spans.get(("role", "seq")), spans.get(("role", "past")), spans.get(("role", "total"))
    past = past or ("", (0, 0, 0))
    if seq and total:
        want = tuple(s + p for s, p in zip(seq[1], past[1]))
        if total[1] != want:
            raise ConfigError(f"{where}: input '{total[0]}' length is {_fmt(total[1])} but past + seq is "
                              f"{_fmt(want)} (past from '{past[0] or 'none: no cache'}', seq from '{seq[0]}')")
    if max_positions is not None and seq:
        longest = seq[1][2] + past[1][2]
        if longest > max_positions:
            raise ConfigError(f"{where}: input '{past[0] or seq[0]}' reaches past {past[1][2]} + seq {seq[1][2]} = "
                              f"{longest} positions, more than the model's max_position_embeddings {max_positions}")


def _span(p: ShapeProfile, axis: int) -> Span:
    return p.min[axis], p.opt[axis], p.max[axis]


def _fmt(span) -> str:
    return "/".join(str(d) for d in span)


def _dims(dims: Dims) -> str:
    return ", ".join(str(d) if d is not None else "?" for d in dims)


def _names(inputs: dict) -> str:
    names = list(inputs)
    return ", ".join(names[:6]) + (f", ... {len(names)} in all" if len(names) > 6 else "")


def _pins(pins: dict[str, int]) -> str:
    return ", ".join(f"{role} {size}" for role, size in pins.items())
