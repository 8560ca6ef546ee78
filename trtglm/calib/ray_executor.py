"""Calibration on a Ray cluster (`--executor ray`): the same statistics, bit for bit, as one process.

The calibration batches (their groups of sample indices, numbered in stream order) are dealt into shards, one
per worker. Ray's ActorPool hands the shards to Ray actors (one CPU each, or a GPU): each actor opens the
calibration data itself (the directory must be readable where the actors run: a shared file system, or one
machine), holds one ONNX Runtime session of the model, and returns the partial statistics of its shard
(TensorStats and RowSamples, pickled: a few MB whatever the shard's size). The driver merges the partials.
Histogram merging is exact (power-of-two ranges, integer counts) and row samples are bottom-k by a hash of (batch,
row), so the result does not depend on which actor ran which shard or in what order shards finish. An actor whose
process dies is restarted by Ray and the shard it held runs again (max_restarts and max_task_retries -1); shards
are numbered, so a shard that still reached the driver twice is merged once.

Why Ray core actors and not a Ray Dataset's `map_batches` (what this module used first): the shards are a handful
of descriptors, so Ray Data's streaming executor adds nothing but its own work, a scheduling loop in the driver and
its stats and autoscaling actors, which on a 2-core machine takes the CPU the actors need. Measured with
bench/scaleout.py (MiniLM, 512 samples): 2 actors calibrated 1.64-1.73x as fast as 1 through map_batches, 1.8-1.9x
as plain actors; two bare processes reach 1.86-1.95x.

Ray is optional (`pip install 'trtglm[ray]'`) and imported only here.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from trtglm.calib.collect import Collector, progress_bar
from trtglm.calib.rows import RowSample
from trtglm.calib.stats import TensorStats
from trtglm.errors import ConfigError, TrtglmError

LAST_PARTIALS: list = []  # (shard, worker pid, started, finished) of the last run, for bench/scaleout.py
SHARDS_PER_WORKER = 1  # one shard per actor: each shard sends its share of the row samples whatever its size


@dataclass(frozen=True)
class Partial:
    shard: int
    stats: dict[str, TensorStats]
    samples: dict[str, RowSample]
    worker: int = 0  # the process that computed it, and when (wall clock): where the time goes
    started: float = 0.0
    finished: float = 0.0
    bounds: dict[str, int] | None = None  # tensor -> key below which this shard's sample is complete (truncated)


def keep_rows(capacity: int, shards: int) -> int:
    """Rows of its sample a shard sends: its expected share of the final sample plus a wide margin (6 standard
    deviations), so that the merge almost never needs a row a shard left out (and when it does, it is detected and
    those shards are calibrated again in full)."""
    share = capacity / max(shards, 1)
    return min(capacity, int(np.ceil(share + 6 * np.sqrt(share) + 16)))


def shard_groups(groups: list[list[int]], shards: int) -> list[list[tuple[int, list[int]]]]:
    """(batch index, group) pairs dealt round-robin into at most `shards` non-empty shards, each in stream order.
    Dealt, not cut: calibration files often come sorted (by length, by source), and a contiguous cut would hand
    one actor the long sequences while the other idles at the end (2 actors: 1.69x -> see bench/scaleout.py)."""
    indexed = list(enumerate(groups))
    shards = max(1, min(shards, len(indexed)))
    return [indexed[k::shards] for k in range(shards) if indexed[k::shards]]


def merge_partials(partials: list[Partial], tensors: list[str],
                   sample_names: list[str]) -> tuple[dict[str, TensorStats], dict[str, RowSample]]:
    """One partial per shard id (a retried shard counts once), merged in shard order."""
    by_shard = {}
    for p in partials:
        by_shard.setdefault(p.shard, p)
    stats = {n: TensorStats(n) for n in sorted(set(tensors))}
    samples = {n: RowSample(n) for n in sample_names}
    for shard in sorted(by_shard):
        p = by_shard[shard]
        stats = {n: stats[n].merge(p.stats[n]) for n in stats}
        samples = {n: samples[n].merge(p.samples[n]) for n in samples}
    return stats, samples


def inexact_shards(partials: list[Partial], samples: dict[str, RowSample]) -> list[int]:
    """Shards whose truncated samples may have left out a row of the merged sample: the merged sample is exact
    iff it is full and its largest key is below every truncated shard's bound."""
    bad = set()
    for p in partials:
        for name, bound in (p.bounds or {}).items():
            merged = samples[name]
            if bound is not None and (len(merged.keys) < merged.capacity or int(merged.keys[-1]) >= bound):
                bad.add(p.shard)
    return sorted(bad)


class ShardCalibrator:
    """A Ray actor: the model's session and the calibration data, opened once; one shard per call."""

    def __init__(self, model: bytes, tensors: list[str], sample_names: list[str], open_data: Callable,
                 keep: int | None = None, threads: int = 1):
        self.data, self.keep = open_data(), keep
        self.collector = Collector(onnx.load_from_string(model), tensors, {n: RowSample(n) for n in sample_names},
                                   threads=threads)

    def calibrate(self, shard: int, batches: list) -> bytes:
        """The pickled Partial of one shard: its (batch index, group) pairs in stream order."""
        started = time.time()
        for index, group in batches:
            self.collector.add(index, self.data.batch(group))
        stats, samples = self.collector.take()
        bounds = None
        if self.keep is not None:
            cut = {n: sample.truncated(self.keep) for n, sample in samples.items()}
            samples, bounds = {n: c[0] for n, c in cut.items()}, {n: c[1] for n, c in cut.items()}
        return pickle.dumps(Partial(shard, stats, samples, os.getpid(), started, time.time(), bounds))


def collect_on_ray(model: onnx.ModelProto, tensors: list[str], groups: list[list[int]], open_data: Callable,
                   sample_names: list[str], workers: int, address: str | None = None,
                   description: str = "calibrating on Ray") -> tuple[dict[str, TensorStats], dict[str, RowSample]]:
    """Statistics and row samples of `tensors` over the batches `groups`, computed by `workers` Ray actors."""
    ray = import_ray()
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    init_ray(ray, address, workers)
    shards = shard_groups(groups, workers * SHARDS_PER_WORKER)
    capacity = RowSample("").capacity
    partials = _run_shards(ray, model, tensors, sample_names, open_data, dict(enumerate(shards)), workers,
                           keep_rows(capacity, len(shards)), description)
    global LAST_PARTIALS
    LAST_PARTIALS = [(p.shard, p.worker, p.started, p.finished) for p in partials]
    missing = sorted(set(range(len(shards))) - {p.shard for p in partials})
    if missing:
        raise TrtglmError(f"Ray calibration lost shard(s) {missing}: their statistics never arrived")
    stats, samples = merge_partials(partials, tensors, sample_names)
    redo = inexact_shards(partials, samples)
    if redo:  # a truncated sample left out a row the merge needs: those shards again, sending every sampled row
        again = _run_shards(ray, model, tensors, sample_names, open_data, {k: shards[k] for k in redo},
                            min(workers, len(redo)), None, f"{description} (again, {len(redo)} shard(s) in full)")
        partials = [p for p in partials if p.shard not in redo] + again
        stats, samples = merge_partials(partials, tensors, sample_names)
    return stats, samples


def _run_shards(ray, model: onnx.ModelProto, tensors: list[str], sample_names: list[str], open_data: Callable,
                shards: dict[int, list], workers: int, keep: int | None, description: str) -> list[Partial]:
    from ray.util import ActorPool

    calibrator = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(ShardCalibrator)
    blob = ray.put(model.SerializeToString())  # once in the object store, whatever the number of actors
    actors = [calibrator.remote(blob, tensors, sample_names, open_data, keep) for _ in range(min(workers, len(shards)))]
    partials = []
    try:
        with progress_bar(description, len(shards)) as advance:
            for out in ActorPool(actors).map_unordered(lambda actor, item: actor.calibrate.remote(*item),
                                                       list(shards.items())):
                partials.append(pickle.loads(out))
                advance()
    finally:
        for actor in actors:
            ray.kill(actor)
    return partials


def ray_map(workers: int, address: str | None = None) -> Callable:
    """A mapper for independent evaluations (sensitivity's one per layer): `fn` shipped once to the object store,
    one Ray task per item (one CPU each), results in item order."""

    def mapper(fn: Callable, items: list, description: str) -> list:
        ray = import_ray()
        init_ray(ray, address, workers)
        task = ray.remote(num_cpus=1)(_apply)
        shared = ray.put(fn)
        refs = [task.remote(shared, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        out, pending = [None] * len(refs), list(refs)
        with progress_bar(f"{description} on Ray", len(refs)) as advance:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                out[index[ready[0]]] = ray.get(ready[0])
                advance()
        return out

    return mapper


def _apply(fn: Callable, item):
    return fn(item)


def init_ray(ray, address: str | None, workers: int) -> None:
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:  # a local cluster on this machine, one CPU per worker
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise TrtglmError(f"--executor ray: cannot start or reach {where} ({str(e).splitlines()[0]})") from e


def import_ray():
    try:
        import ray
        import ray.util  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray: pip install 'trtglm[ray]' ({e})") from e
    return ray
