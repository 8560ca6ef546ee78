"""Calibration throughput, local and on Ray with 1 and 2 workers, and the size of what travels to the driver.

    python bench/scaleout.py [--samples 512]      # needs calibration/minilm (examples/minilm/export.py) and Ray

Calibrates the FP32 MiniLM (all-MiniLM-L6-v2, the activations trtglm's Q/DQ plan observes, with row samples for
the searches) on the same samples in one run: in this process with one ONNX Runtime thread and with all threads,
then on a local Ray cluster with 1 and with 2 actors of one ONNX Runtime thread each. Ray's end-to-end times start
when the cluster is up (`ray.init` is paid once, before) and include each run's fixed start-up (actor processes,
model, data and session); its calibrating rate counts from the first shard's start to the last shard's end, the
part that grows with the number of samples and that workers divide: samples / the slowest actor's calibrating
time (one shard per actor; actors that start at different moments do not count their start-up skew). Every run's statistics are
checked to be bit-identical to the local ones. Then the pickled partial statistics of one shard, for shards of
different sizes: a few MB however many samples a shard holds. Results: bench/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trtglm.calib import data as calib_data  # noqa: E402
from trtglm.calib.collect import Collector  # noqa: E402
from trtglm.calib import ray_executor  # noqa: E402
from trtglm.calib.ray_executor import Partial, collect_on_ray, keep_rows  # noqa: E402
from trtglm.calib.rows import RowSample  # noqa: E402
from trtglm.calib.search import wants_rows  # noqa: E402
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes  # noqa: E402
from trtglm.passes.insert_qdq import plan_qdq  # noqa: E402

MINILM = REPO / "calibration" / "minilm"
BATCH = 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scaleout.json")
    args = p.parse_args()
    if not (MINILM / "minilm.onnx").is_file():
        print(f"bench/scaleout.py: {MINILM}/minilm.onnx missing: python examples/minilm/export.py --out {MINILM}")
        return 1
    import ray

    model, tensors, rows = _fp32_and_plan(MINILM / "minilm.onnx")
    specs = calib_data.input_specs(model)
    open_data = partial(calib_data.open_dataset, MINILM / "calib", specs)
    data = open_data()
    n = min(args.samples, len(data))
    groups = data.groups(list(range(n)), BATCH)
    print(f"MiniLM FP32, {len(tensors)} observed activations ({len(rows)} with row samples), {n} samples in "
          f"{len(groups)} batches of {BATCH}")

    results, reference = [], None
    for label, threads in (("local, 1 ORT thread", 1), ("local, all ORT threads", 0)):
        start = time.perf_counter()
        collector = Collector(model, tensors, {r: RowSample(r) for r in rows}, threads=threads)
        for index, group in enumerate(groups):
            collector.add(index, data.batch(group))
        seconds = time.perf_counter() - start
        stats, samples = collector.take()
        reference = reference or (stats, samples)
        results.append(_row(label, n, seconds, _same(reference, (stats, samples))))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    for workers in (1, 2):
        _wait_for_free_cpus(ray, 2)  # the previous run's actors must be gone, or they hold a CPU
        start = time.time()
        got = collect_on_ray(model, tensors, groups, open_data, rows, workers)
        end = time.time()
        spans = ray_executor.LAST_PARTIALS
        row = _row(f"Ray, {workers} worker{'s' * (workers > 1)} x 1 ORT thread", n, end - start, _same(reference, got))
        first, last = min(s[2] for s in spans), max(s[3] for s in spans)
        slowest = max(s[3] - s[2] for s in spans)  # one shard per actor: the longest an actor calibrated
        row.update(startup_s=first - start, compute_s=last - first, gather_s=end - last, slowest_shard_s=slowest,
                   shard_s=[round(s[3] - s[2], 3) for s in spans], compute_samples_per_s=n / slowest,
                   actors=len({s[1] for s in spans}))
        results.append(row)
    ray.shutdown()
    one, two = results[2]["compute_samples_per_s"], results[3]["compute_samples_per_s"]
    sizes = _partial_sizes(model, tensors, rows, data, groups)

    print(f"{'run':34} {'samples/s':>10} {'seconds':>8} {'start-up':>9} {'first-last':>12} {'gather':>7} "
          f"{'samples/s calibrating':>22}  same bytes as local")
    for r in results:
        ray_cols = (f"{r['startup_s']:9.2f} {r['compute_s']:12.2f} {r['gather_s']:7.2f} "
                    f"{r['compute_samples_per_s']:22.1f}") if "compute_s" in r else " " * 53
        if "shard_s" in r:
            ray_cols += f"  (actors calibrated {', '.join(f'{x:.2f}' for x in r['shard_s'])} s)"
        print(f"{r['run']:34} {r['samples_per_s']:10.1f} {r['seconds']:8.2f} {ray_cols}  "
              f"{'yes' if r['identical'] else 'NO'}")
    print(f"Ray 2 workers / 1 worker, while calibrating: {two / one:.2f}x (target >= 1.8x on 2 cores); end to end, "
          f"with the fixed start-up: {results[3]['samples_per_s'] / results[2]['samples_per_s']:.2f}x")
    for s in sizes:
        print(f"one shard's statistics for the driver: {s['batches']:3d} batches ({s['samples']:4d} samples) -> "
              f"{s['bytes'] / 2**20:.2f} MiB for {len(tensors)} tensors (per tensor: median "
              f"{s['median_tensor_bytes'] / 2**20:.2f} MiB, max {s['max_tensor_bytes'] / 2**20:.2f} MiB: histogram "
              f"16 KiB + up to 1024 sampled rows); sent with 2 / 8 / 64 shards: "
              f"{' / '.join(f'{v / 2**20:.1f}' for v in s['sent_bytes_by_shards'].values())} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples": n, "batch": BATCH, "tensors": len(tensors), "runs": results,
                                    "ray_2_over_1": two / one, "partial_sizes": sizes}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in results) else 1


def _fp32_and_plan(path: Path):
    """The optimized FP32 graph trtglm calibrates, the activations its Q/DQ plan observes, and those the
    per-tensor searches sample rows of."""
    original = onnx.load(str(path))
    graph = gs.import_onnx(original)
    run_passes(graph, DEFAULT_PIPELINE, PassContext(opset=original.opset_import[0].version))
    model = gs.export_onnx(graph)
    plan = plan_qdq(gs.import_onnx(model))
    return model, plan.activations, wants_rows(gs.import_onnx(model), plan.activations, frozenset())


def _wait_for_free_cpus(ray, cpus: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.5)


def _row(label: str, n: int, seconds: float, identical: bool) -> dict:
    return {"run": label, "seconds": seconds, "samples_per_s": n / seconds, "identical": identical}


def _same(a, b) -> bool:
    (sa, ra), (sb, rb) = a, b
    return all(np.array_equal(sa[k].hist, sb[k].hist) and sa[k].absmax == sb[k].absmax for k in sa) and all(
        np.array_equal(ra[k].rows, rb[k].rows) for k in ra)


def _partial_sizes(model, tensors, rows, data, groups) -> list[dict]:
    """Bytes of one shard's partial for shards of 1, 4 and 16 batches, with its full row samples and truncated
    to what a shard sends when there are 2, 8 or 64 shards (keep_rows)."""
    collector = Collector(model, tensors, {r: RowSample(r) for r in rows}, threads=0)
    sizes = []
    for count in (1, 4, 16):
        for index, group in enumerate(groups[:count]):
            collector.add(index, data.batch(group))
        stats, samples = collector.take()
        per_tensor = [len(pickle.dumps((stats[t], samples.get(t)))) for t in stats]
        sent = {}
        for shards in (2, 8, 64):
            cut = {n: s.truncated(keep_rows(s.capacity, shards))[0] for n, s in samples.items()}
            sent[shards] = len(pickle.dumps(Partial(0, stats, cut)))
        sizes.append({"batches": count, "samples": count * BATCH, "bytes": len(pickle.dumps(Partial(0, stats, samples))),
                      "max_tensor_bytes": max(per_tensor), "median_tensor_bytes": float(np.median(per_tensor)),
                      "sent_bytes_by_shards": sent})
    return sizes


if __name__ == "__main__":
    sys.exit(main())
