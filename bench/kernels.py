"""GPU benchmark of trtglm's plugin kernels (residual_norm, rotary, attention) against torch, in one run.

Per kernel and shape: time, bandwidth or TFLOP/s, % of the copy bandwidth measured in the same run, torch's time for
the same op on the same data, and the max relative error against float32 torch; the met / not met lines of issue 7's
targets; everything in bench/results/kernels.json. bench/README.md says how, and what each figure counts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's trtglm, whose ptx.py compiles this checkout's plugins/

from trtglm.plugins import aot, ptx  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1e-2, "int8": 1e-2}  # max|ours - ref| / max|ref|, as tests/gpu (int8: 1 step)
COPY_TARGET = 0.80  # norms and rotary: at least this fraction of the measured copy bandwidth
L2_MULTIPLE = 3  # decode cycles through copies of its KV cache, >= 3x the L2 in all: DRAM figures, not L2's
DTYPES = ("float16", "bfloat16")
# meta: the row's own fields (family, name, dtype, path, bytes, ...); ours(i), peers[torch op](i): one call on data
# set i (decode cycles through copies); check(): ours on set 0 against float32 torch, max|ours - ref| / max|ref|
Case = namedtuple("Case", "meta ours peers check")


# ----------------------------------------------------------------------------------------------- counting (pure)
def norm_bytes(rows, hidden, esize, out_esize, beta=False) -> int:  # input, residual, gamma(, beta), out, res_out
    return rows * hidden * (3 * esize + out_esize) + hidden * esize * (2 if beta else 1)


def rotary_bytes(batch, q_heads, kv_heads, seq, head_dim, rotary_dim, esize) -> int:  # q, k, cos, sin, q/k_out
    return 2 * batch * (q_heads + kv_heads) * seq * head_dim * esize + 2 * batch * seq * (rotary_dim // 2) * 4


def attention_flops(batch, q_heads, q_len, kv_len, head_dim, causal) -> float:  # causal prefill: unmasked half
    return 4 * batch * q_heads * q_len * kv_len * head_dim / (2 if causal and q_len > 1 else 1)


def attention_bytes(batch, q_heads, kv_heads, q_len, kv_len, head_dim, esize) -> int:  # q, k, v, out
    return 2 * (batch * q_heads * q_len + batch * kv_heads * kv_len) * head_dim * esize


def decode_splits(batch, q_heads, kv_heads, kv_len) -> int:  # as launchAttention (attention.cu: decodeSplits)
    blocks = batch * kv_heads * aot.int_cdiv(q_heads // kv_heads, aot.DECODE_GROUP)
    return max(1, min(512 // blocks, aot.int_cdiv(kv_len, 128), 128))


# ----------------------------------------------------------------------------------------------- device
class Gpu:
    """cupy launches the kernels; torch makes the data, times (CUDA events) and is the peer; all on one stream."""

    def __init__(self):
        try:
            import cupy as cp
            import torch
            import torch.nn.functional as F
            if not cp.cuda.runtime.getDeviceCount() or not torch.cuda.is_available():
                raise RuntimeError("no CUDA GPU (or a CPU build of torch)")
            self.cc = int(cp.cuda.Device().compute_capability)
            if self.cc < 80:
                raise RuntimeError(f"the kernels need sm_80 or newer (this GPU: sm_{self.cc})")
            self.arch = "sm_90" if self.cc >= 90 else "sm_80"
            for op in ("residual_norm", "rotary", "attention"):  # the PTX first (cached): no nvcc fails here, once
                ptx.compile_ptx(op, self.arch)
        except ImportError as e:
            sys.exit(f"bench/kernels.py: {e.name} is not installed (the bench needs cupy and torch with CUDA)")
        except Exception as e:  # RuntimeError, cupy's CUDARuntimeError without a driver, TrtglmError without nvcc
            sys.exit(f"bench/kernels.py: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        self.cp, self.torch, self.F, self.dev, self.name = cp, torch, F, "cuda", torch.cuda.get_device_name()
        self.l2 = cp.cuda.runtime.getDeviceProperties(0).get("l2CacheSize") or 50 << 20
        self.gqa = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5
        cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream).use()  # cupy launches on torch's stream
        self.tmp, self.modules = tempfile.TemporaryDirectory(prefix="trtglm-bench-"), {}
        self.sleep, self.cycles_per_ms = getattr(torch.cuda, "_sleep", None), 0.0
        if self.sleep:  # GPU cycles per ms, to hold the stream while the host enqueues a timed round
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.sleep(10 ** 7), start.record(), self.sleep(10 ** 7), end.record(), end.synchronize()  # clocks up
            self.cycles_per_ms = 10 ** 7 / max(start.elapsed_time(end), 1e-3)

    def randn(self, seed):
        g = self.torch.Generator(device=self.dev).manual_seed(seed)
        return lambda *shape: self.torch.randn(*shape, generator=g, device=self.dev)

    def launcher(self, launch: aot.KernelLaunch, inputs, outputs):
        """A call of launch with TensorRT's AOT arguments: input pointers, int32 scalars, output pointers."""
        if launch.ptx not in self.modules:
            path = Path(self.tmp.name) / f"{len(self.modules)}.ptx"
            path.write_text(launch.ptx)
            self.modules[launch.ptx] = self.cp.RawModule(path=str(path))
        fn = self.modules[launch.ptx].get_function(launch.kernel)
        if launch.shared_mem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = launch.shared_mem
        ptrs = [np.uint64(0 if t is None else t.data_ptr()) for t in (*inputs, *outputs)]  # None: a null pointer
        args = (*ptrs[:len(inputs)], *(np.int32(s) for s in launch.scalars), *ptrs[len(inputs):])
        grid, block, smem = tuple(launch.grid), tuple(launch.block), launch.shared_mem
        return lambda _keep=(inputs, outputs): fn(grid, block, args, shared_mem=smem)  # _keep: the pointers' tensors

    def copy_gbps(self, repeats: int, nbytes: int = 1 << 30) -> float:
        """A 1 GiB device-to-device cudaMemcpy (cupy): bytes read + written per second."""
        src, dst = self.cp.ones(nbytes, self.cp.uint8), self.cp.empty(nbytes, self.cp.uint8)
        return 2 * nbytes / self.time_ms(lambda i: dst.data.copy_from_device_async(src.data, nbytes), repeats) / 1e6

    def time_ms(self, fn, repeats: int, target_ms: float = 10.0) -> float:
        """Median over rounds of the mean time of n back-to-back fn(i) (CUDA events; a round ~ target_ms). The
        stream is held busy (torch.cuda._sleep) while the host enqueues a round: host overhead is not timed."""
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        fn(0), fn(1), start.record(), fn(2), fn(3), fn(4), end.record(), end.synchronize()
        n, hold, times = int(min(max(target_ms * 3 / max(start.elapsed_time(end), 1e-4), 3), 1000)), 0, []
        for r in range(repeats + 1):  # round 0 only measures the host's enqueue time
            host = time.perf_counter()
            if hold:
                self.sleep(hold)
            start.record()
            for i in range(n):
                fn(i)
            end.record()
            hold = int(2 * (time.perf_counter() - host) * 1e3 * self.cycles_per_ms)
            end.synchronize()
            times += [start.elapsed_time(end) / n] if r else []
        return statistics.median(times)


# ----------------------------------------------------------------------------------------------- cases
def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def norm_case(gpu, dtype, rows, hidden, kind=0, int8=False, seed=0) -> list:
    """Residual add + RMSNorm (kind 0) or LayerNorm with beta (kind 1), output in dtype or int8."""
    torch, F, T, rnd, eps = gpu.torch, gpu.F, getattr(gpu.torch, dtype), gpu.randn(seed), 1e-5
    x, r = (rnd(rows, hidden) + 2).to(T), rnd(rows, hidden).to(T)  # a mean: LayerNorm's centering matters
    gamma, beta = (0.5 + rnd(hidden).abs()).to(T), (0.5 * rnd(hidden)).to(T) if kind else None
    s = (x + r).float()  # rounded to T once, as the kernel's residual_out
    y = (F.layer_norm(s, (hidden,), gamma.float(), beta.float(), eps) if kind else
         s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * gamma.float())  # the float32 reference
    scale = float(np.float32(y.abs().max().item() / 120)) if int8 else 0.0
    y = torch.round(y * (1 / scale)).clamp_(-128, 127) if int8 else y
    out, res_out = torch.empty(rows, hidden, dtype=torch.int8 if int8 else T, device=gpu.dev), torch.empty_like(x)
    launch = aot.residual_norm(dtype, (rows, hidden), kind=kind, eps=eps, has_residual=1, has_beta=kind,
                               out_scale=scale, arch=gpu.arch)
    run = gpu.launcher(launch, [x, r, gamma] + ([beta] if kind else []), [out, res_out])

    def peer(i):
        z = F.layer_norm(x + r, (hidden,), gamma, beta, eps) if kind else F.rms_norm(x + r, (hidden,), gamma, eps)
        return torch.round(z.float() * (1 / scale)).clamp_(-128, 127).to(torch.int8) if int8 else z
    op = ("add + layer_norm" if kind else "add + rms_norm") + (" + quantize" if int8 else "")
    meta = dict(family="norm", name=f"{'add_layer' if kind else 'add_rms'}{'_i8' if int8 else ''} {rows}x{hidden}",
                dtype=dtype, path="aot", kernel=launch.kernel, tol=TOL["int8" if int8 else dtype],
                bytes=norm_bytes(rows, hidden, T.itemsize, 1 if int8 else T.itemsize, beta=bool(kind)))
    return [Case(meta, lambda i: run(), {op: peer},
                 lambda: (run(), max(rel_err(out, y), rel_err(res_out, s)))[1])]  # residual_out: exact, 0


def rotary_case(gpu, dtype, label, shape, seed=0) -> list:
    """GLM: interleaved pairs (rotary_dim < head_dim: the tail is copied); otherwise halves (Llama)."""
    torch, T, rnd, interleaved = gpu.torch, getattr(gpu.torch, dtype), gpu.randn(seed), label == "glm"
    batch, q_heads, kv_heads, seq, head_dim, rot = shape
    q, k = rnd(batch, q_heads, seq, head_dim).to(T), rnd(batch, kv_heads, seq, head_dim).to(T)
    pos = torch.arange(seq, device=gpu.dev) + 37 * torch.arange(batch, device=gpu.dev)[:, None]  # [batch, seq]
    angle = pos.double()[..., None] * 1e4 ** (-torch.arange(0, rot, 2, device=gpu.dev).double() / rot)
    cos, sin = angle.cos().float(), angle.sin().float()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    launch = aot.rotary(dtype, tuple(q.shape), tuple(k.shape), rotary_dim=rot, interleaved=int(interleaved),
                        arch=gpu.arch)
    run = gpu.launcher(launch, [q, k, cos, sin], [q_out, k_out])

    def torch_rotary(x):  # elementwise, in float32, in the kernel's layout; returns x's dtype
        c, s = cos[:, None], sin[:, None]
        half, tail = x[..., :rot].float(), x[..., rot:]
        a, b = (half[..., 0::2], half[..., 1::2]) if interleaved else half.chunk(2, -1)
        pairs = (a * c - b * s, b * c + a * s)
        y = torch.stack(pairs, -1).flatten(-2) if interleaved else torch.cat(pairs, -1)
        return torch.cat((y.to(x.dtype), tail), -1)
    meta = dict(family="rotary", name=f"{label} b{batch} h{q_heads}/{kv_heads} s{seq} d{head_dim} r{rot} "
                f"{'interleaved' if interleaved else 'halves'}", dtype=dtype, path="aot", kernel=launch.kernel,
                tol=TOL[dtype], bytes=rotary_bytes(*shape, T.itemsize))
    return [Case(meta, lambda i: run(), {"elementwise rotary": lambda i: (torch_rotary(q), torch_rotary(k))},
                 lambda: (run(), max(rel_err(o, torch_rotary(t.float())) for o, t in ((q_out, q), (k_out, k))))[1])]


def attention_cases(gpu, dtype, shape, seed=0) -> list:
    """q_len > 1: causal prefill. q_len == 1: decode, twice on the same data: the AOT plugins' single kernel, and
    launchAttention's split-KV decode + combine (the C++ plugin), cycling through copies of the cache."""
    torch, T, sdpa, rnd = gpu.torch, getattr(gpu.torch, dtype), gpu.F.scaled_dot_product_attention, gpu.randn(seed)
    batch, q_heads, kv_heads, q_len, kv_len, d = shape
    causal, group, nbytes = q_len > 1, q_heads // kv_heads, attention_bytes(*shape, T.itemsize)
    q, k, v = (rnd(batch, h, n, d).to(T) for h, n in ((q_heads, q_len), (kv_heads, kv_len), (kv_heads, kv_len)))
    n_sets = 1 if causal else min(64, math.ceil(L2_MULTIPLE * gpu.l2 / nbytes))
    sets = [(q, k, v, torch.empty_like(q))] + [(q.clone(), k.clone(), v.clone(), torch.empty_like(q))
                                              for _ in range(n_sets - 1)]
    wide = [tuple(t.repeat_interleave(group, 1) for t in s[1:3]) for s in sets[:max(1, n_sets // group)]]
    peers = {"sdpa, K/V repeated": lambda i: sdpa(sets[i % n_sets][0], *wide[i % len(wide)], is_causal=causal)}
    if group > 1 and gpu.gqa:
        peers["sdpa enable_gqa"] = lambda i: sdpa(*sets[i % n_sets][:3], is_causal=causal, enable_gqa=True)
    base = aot.attention(dtype, tuple(q.shape), tuple(k.shape), causal=int(causal), arch=gpu.arch)
    paths = [("aot", 1, [gpu.launcher(base, [a, b, c], [o]) for a, b, c, o in sets])]
    if not causal:  # launchAttention: decode with num_splits, then combine when num_splits > 1
        splits, suffix = decode_splits(batch, q_heads, kv_heads, kv_len), base.kernel.rsplit("decode1_", 1)[1]
        dec = aot.KernelLaunch(f"trtglm_attention_decode_{suffix}", base.ptx, (base.grid[0], splits, 1), base.block,
                               base.shared_mem, (*base.scalars, splits))
        comb = aot.KernelLaunch(f"trtglm_attention_combine_{suffix}", base.ptx,
                                (aot.int_cdiv(batch * q_heads, 4), 1, 1), (128, 1, 1), 0, (batch, q_heads, splits))
        part = (torch.empty(splits * batch * q_heads * (d + 2), dtype=torch.float32, device=gpu.dev)
                if splits > 1 else None)  # the workspace: one for every data set, as the plugin has one
        steps = [[gpu.launcher(dec, [a, b, c], [part, o])] + ([gpu.launcher(comb, [part], [o])] if part is not None
                                                              else []) for a, b, c, o in sets]
        paths.append((f"split x{splits}", splits, [lambda s=s: [f() for f in s] for s in steps]))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # float32 reference, no TF32
        ref = sdpa(q.float(), *(t.repeat_interleave(group, 1).float() for t in (k, v)), is_causal=causal)
    name = f"{'prefill causal' if causal else 'decode'} b{batch} h{q_heads}/{kv_heads} q{q_len} kv{kv_len} d{d}"
    meta = dict(family="attention", name=name, dtype=dtype, kernel=base.kernel, bytes=None if causal else nbytes,
                tol=TOL[dtype], flops=attention_flops(batch, q_heads, q_len, kv_len, d, causal), data_sets=n_sets,
                target=causal and q_len == kv_len == 2048 and d == 128)
    return [Case(dict(meta, path=path, num_splits=n), lambda i, runs=runs: runs[i % n_sets](), peers,
                 lambda runs=runs: (runs[0](), rel_err(sets[0][3], ref))[1]) for path, n, runs in paths]


# ----------------------------------------------------------------------------------------------- run, report
def measure(gpu, case: Case, repeats: int, copy: float) -> dict:
    err, ours = case.check(), gpu.time_ms(case.ours, repeats)
    peers = {op: gpu.time_ms(fn, repeats) for op, fn in case.peers.items()}
    best, m = min(peers, key=peers.get), case.meta
    gbps = m["bytes"] / ours / 1e6 if m["bytes"] else None  # prefill: compute-bound, no bandwidth figure
    return dict(m, ours_ms=ours, torch_ms=peers[best], torch_op=best, torch_ms_by_op=peers,
                torch_over_ours=peers[best] / ours, max_rel_err=err if math.isfinite(err) else None,
                ok=math.isfinite(err) and err <= m["tol"], gbps=gbps, copy_pct=gbps and 100 * gbps / copy,
                tflops=m["flops"] / ours / 1e9 if "flops" in m else None)


def targets(rows: list, copy: float) -> list:
    out, ran = [], [r for r in rows if "ours_ms" in r]
    for fam in ("norm", "rotary"):
        if rs := [r for r in ran if r["family"] == fam]:
            low = min(rs, key=lambda r: r["copy_pct"])
            out.append(dict(target=f"{fam}: every case >= {COPY_TARGET:.0%} of copy bandwidth ({copy:.0f} GB/s)",
                            met=low["copy_pct"] >= 100 * COPY_TARGET,
                            detail=f"lowest {low['copy_pct']:.1f}% ({low['name']} {low['dtype']})"))
    if pre := [r for r in ran if r.get("target")]:
        detail = [f"{r['dtype']} {r['ours_ms']:.3f} vs {r['torch_ms']:.3f} ms ({r['torch_op']})" for r in pre]
        out.append(dict(target="attention prefill s2048 d128 causal no slower than torch SDPA (its fastest variant)",
                        met=all(r["ours_ms"] <= r["torch_ms"] for r in pre), detail=", ".join(detail)))
    bad = [f"{r['name']} {r.get('dtype', '')} {r.get('path', '')}".strip() for r in rows if not r["ok"]]
    return out + [dict(target="every case ran and matches torch's float32 result within tolerance", met=not bad,
                       detail="; ".join(bad) or f"{len(rows)} rows")]


COLUMNS = [("case", "name", "s"), ("dtype", "dtype", "s"), ("path", "path", "s"), ("ours ms", "ours_ms", ".4f"),
           ("TFLOP/s", "tflops", ".1f"), ("GB/s", "gbps", ".0f"), ("% copy", "copy_pct", ".1f"),
           ("torch ms", "torch_ms", ".4f"), ("torch op", "torch_op", "s"), ("torch/ours", "torch_over_ours", ".2f"),
           ("max rel err", "max_rel_err", ".1e")]


def report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    console = Console(width=max(Console().width, 170))
    console.print(f"{result['device']} (sm_{result['compute_capability']}), L2 {result['l2_bytes'] >> 20} MiB, copy "
                  f"bandwidth {result['copy_gbps']:.0f} GB/s (1 GiB device-to-device cudaMemcpy, read + write)")
    for fam in ("norm", "rotary", "attention"):
        if rows := [r for r in result["rows"] if r["family"] == fam]:
            cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)]
            table = Table(*(Column(h, justify="left" if f == "s" else "right") for h, _, f in cols),
                          title=f"{fam}: trtglm kernel (ours) vs torch, same data, same run")
            for r in rows:
                table.add_row(*("—" if r.get(k) is None else format(r[k], f) for _, k, f in cols),
                              style=None if r["ok"] else "red")
            console.print(table)
    console.print("TFLOP/s: 4 * batch * q_heads * q_len * kv_len * D, halved for causal prefill (the unmasked half); "
                  "GB/s: every tensor read or written once. Red: error above tolerance. Failed cases: see the JSON.")
    for t in result["targets"]:
        console.print(f"{'[green]met[/green]' if t['met'] else '[red]NOT met[/red]'}  {t['target']}: {t['detail']}")


PLAN = [  # (builder, arguments), built one at a time: one case's data on the device at a time
    *[(norm_case, dict(dtype=dt, rows=r, hidden=h)) for r in (4096, 16384) for h in (4096, 8192) for dt in DTYPES],
    *[(norm_case, dict(dtype=dt, rows=16384, hidden=4096, kind=1, seed=1)) for dt in DTYPES],  # LayerNorm, beta
    (norm_case, dict(dtype="float16", rows=16384, hidden=4096, int8=True, seed=2)),  # RMSNorm to int8
    # rotary (batch, q_heads, kv_heads, seq, head_dim, rotary_dim): GLM interleaved, Llama halves
    *[(rotary_case, dict(dtype=dt, label=label, shape=shape)) for dt in DTYPES
      for label, shape in (("glm", (8, 32, 2, 2048, 128, 64)), ("llama", (8, 32, 8, 2048, 128, 128)))],
    # attention (batch, q_heads, kv_heads, q_len, kv_len, head_dim): prefill, then decode
    *[(attention_cases, dict(dtype=dt, shape=(4, 32, 8, s, s, d))) for dt, s, d in
      (("float16", 2048, 128), ("bfloat16", 2048, 128), ("float16", 2048, 64), ("float16", 4096, 128))],
    *[(attention_cases, dict(dtype="float16", shape=(b, 32, 2, 1, 4096, 128), seed=b)) for b in (1, 8, 32)]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    families = ["norm", "rotary", "attention"]
    p.add_argument("--only", nargs="+", default=families, choices=families, help="kernel families to run")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement; the median is reported")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernels.json")
    args = p.parse_args(argv)
    gpu, started, rows = Gpu(), time.perf_counter(), []
    copy = gpu.copy_gbps(args.repeats)
    gpu.cp.get_default_memory_pool().free_all_blocks()
    print(f"{gpu.name}: copy bandwidth {copy:.0f} GB/s", flush=True)
    for build, kwargs in [(b, kw) for b, kw in PLAN if b.__name__.split("_")[0] in args.only]:
        try:
            for case in build(gpu, **kwargs):
                rows.append(r := measure(gpu, case, args.repeats, copy))
                print(f"  {r['name']} {r['dtype']} {r['path']}: {r['ours_ms']:.4f} ms, torch {r['torch_ms']:.4f} ms, "
                      f"max rel err {r['max_rel_err']}", flush=True)
        except Exception as e:  # a failed row (a broken CUDA context fails the next ones the same way)
            rows.append(dict(family="failed", name=f"{build.__name__}({kwargs})", ok=False,
                             error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
            print(f"  {rows[-1]['name']}: {rows[-1]['error']}", flush=True)
        case = None  # noqa: F841 (frees this case's data before the next is built)
        gpu.torch.cuda.empty_cache()
    result = dict(device=gpu.name, compute_capability=gpu.cc, arch=gpu.arch, l2_bytes=gpu.l2, copy_gbps=copy,
                  repeats=args.repeats, torch=gpu.torch.__version__, cupy=gpu.cp.__version__,
                  cuda_runtime=gpu.cp.cuda.runtime.runtimeGetVersion(), sdpa_enable_gqa=gpu.gqa,
                  host_overhead_hidden=bool(gpu.sleep), rows=rows, targets=targets(rows, copy),
                  wall_s=time.perf_counter() - started)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
