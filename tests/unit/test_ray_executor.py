"""--executor ray: calibration shards on a local Ray cluster of 2 workers give the same bytes as one process, for a
CNN and a transformer, also when an actor dies mid-run; shard bookkeeping and merging in any order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests import models
from trtglm.calib import data as calib_data
from trtglm.calib.collect import Collector
from trtglm.calib.ray_executor import Partial, collect_on_ray, merge_partials, shard_groups
from trtglm.calib.rows import RowSample
from trtglm.cli import main

ray = pytest.importorskip("ray", reason="Ray is a dev dependency: pip install -e '.[dev]'")
ARTEFACTS = ("model.int8.qdq.onnx", "calib.cache", "quant_config.json")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_shard_groups_deal_every_batch_once_in_order():
    groups = [[i, i + 1] for i in range(0, 20, 2)]
    shards = shard_groups(groups, 4)
    assert len(shards) == 4 and all(shards) and [len(s) for s in shards] == [3, 3, 2, 2]
    assert sorted(pair for shard in shards for pair in shard) == list(enumerate(groups))
    assert all([i for i, _ in shard] == sorted(i for i, _ in shard) for shard in shards)
    assert [i for i, _ in shards[1]] == [1, 5, 9]  # dealt round-robin: sorted data spreads over the actors
    assert len(shard_groups(groups[:2], 8)) == 2 and shard_groups([], 3) == []


def _partials(model, tensors, batches, cuts):
    partials = []
    for shard, part in enumerate(np.split(np.arange(len(batches)), cuts)):
        collector = Collector(model, tensors, {tensors[0]: RowSample(tensors[0])})
        for i in part:
            collector.add(int(i), batches[i])
        partials.append(Partial(shard, *collector.take()))
    return partials


def test_merge_is_the_same_for_any_order_and_counts_a_retried_shard_once():
    model = models.build_cnn_classifier()
    tensors = ["input"] + [n.output[0] for n in model.graph.node if n.op_type == "Relu"][:2]
    batches = [models.random_inputs(model, batch=3, seed=s) for s in range(9)]
    partials = _partials(model, tensors, batches, [2, 5, 7])
    whole, whole_rows = merge_partials(_partials(model, tensors, batches, []), tensors, [tensors[0]])
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = [partials[i] for i in rng.permutation(len(partials))] + [partials[1]]  # shard 1 arrives twice
        stats, rows = merge_partials(shuffled, tensors, [tensors[0]])
        for name in tensors:
            np.testing.assert_array_equal(stats[name].hist, whole[name].hist)
            assert (stats[name].absmax, stats[name].count, stats[name].zeros) == (
                whole[name].absmax, whole[name].count, whole[name].zeros)
        np.testing.assert_array_equal(rows[tensors[0]].rows, whole_rows[tensors[0]].rows)


def _build(model: Path, calib: Path, out: Path, *extra) -> None:
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", ["cnn", "transformer", "transformer-budget"])
def test_ray_build_writes_the_same_bytes_as_local(tmp_path, kind):
    """Calibration on 2 Ray actors; with an accuracy budget also the per-layer sensitivity as Ray tasks."""
    model = models.build_cnn_classifier() if kind == "cnn" else models.build_attention(seq=8, hidden=16)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for s in range(12):  # 12 .npz batches of 4 samples: 12 batches cut into shards
        np.savez(tmp_path / "calib" / f"b{s:02d}.npz", **models.random_inputs(model, batch=4, seed=s))
    budget = ["--accuracy-budget", "0.00001"] if kind.endswith("budget") else []
    _build(tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "local", *budget)
    _build(tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "ray", "--executor", "ray", "--workers", "2", *budget)
    if budget:  # the budget kept some layers float: the sensitivity analysis decided something
        import json

        layers = json.loads((tmp_path / "ray" / "quant_config.json").read_text())["layers"]
        assert any(layer["precision"] == "float" for layer in layers)
        assert all(layer.get("sensitivity") is not None for layer in layers)
    for name in ARTEFACTS:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_an_actor_killed_mid_run_is_restarted_and_the_bytes_are_the_same(tmp_path):
    model = models.build_cnn_classifier()
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    np.save(calib / "input.npy", rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    specs = calib_data.input_specs(model)
    tensors = ["input"] + [n.output[0] for n in model.graph.node if n.op_type in ("Relu", "Conv")]
    groups = calib_data.open_dataset(calib, specs).groups(list(range(64)), 4)
    marker = tmp_path / "killed"

    def open_data():  # runs in each actor; its dataset kills its process once, at batch group 9
        data = calib_data.open_dataset(calib, specs)
        batch = data.batch

        def dying(group):
            if group == groups[9] and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return batch(group)

        data.batch = dying
        return data

    calm = collect_on_ray(model, tensors, groups, lambda: calib_data.open_dataset(calib, specs), ["input"], 2)
    faulty = collect_on_ray(model, tensors, groups, open_data, ["input"], 2)
    assert marker.exists(), "the fault was never injected"
    for name in tensors:
        np.testing.assert_array_equal(faulty[0][name].hist, calm[0][name].hist)
        assert faulty[0][name].count == calm[0][name].count
    np.testing.assert_array_equal(faulty[1]["input"].rows, calm[1]["input"].rows)


def test_parse_gpus():
    from trtglm.engine.matrix import parse_gpus
    from trtglm.errors import ConfigError

    assert parse_gpus("A100, H100,L4,A100") == ["A100", "H100", "L4"]
    for bad in ("", ",", "A100;H100", "A 100"):
        with pytest.raises(ConfigError, match="--gpus"):
            parse_gpus(bad)


def test_build_matrix_without_gpus_names_the_kinds_within_its_timeout_and_keeps_the_qdq(tmp_path):
    import time

    from tests.unit.test_cli import _assert_one_line_error

    model = models.build_cnn_classifier()
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "input.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["build-matrix", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"),
                                       "--gpus", "A100,H100,L4", "--out", str(tmp_path / "o"), "--timeout", "3"])
    assert time.perf_counter() - start < 120
    _assert_one_line_error(result, "no node with GPU kind(s) A100, H100, L4 built an engine within 3 s",
                           "0 GPU(s)", "model.int8.qdq.onnx")
    assert (tmp_path / "o" / "model.int8.qdq.onnx").is_file()
    assert not any((tmp_path / "o" / kind).exists() for kind in ("A100", "H100", "L4"))


def test_truncated_shard_samples_merge_exactly_or_say_which_shards_to_redo():
    """Each shard sends only its share of the row sample (plus a margin); the driver checks that nothing it needed
    was left out, and names the shards to send again in full when something was."""
    from trtglm.calib.ray_executor import inexact_shards, keep_rows

    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((50, 8)).astype(np.float32) for _ in range(40)]
    whole = RowSample("t", 128)
    for i, b in enumerate(batches):
        whole.update(b, i)
    parts = np.array_split(np.arange(40), 4)
    for keep, exact in ((keep_rows(128, 4), True), (5, False)):
        partials = []
        for shard, part in enumerate(parts):
            sample = RowSample("t", 128)
            for i in part:
                sample.update(batches[i], int(i))
            cut, bound = sample.truncated(keep)
            partials.append(Partial(shard, {}, {"t": cut}, bounds={"t": bound}))
        merged = partials[0].samples["t"]
        for p in partials[1:]:
            merged = merged.merge(p.samples["t"])
        redo = inexact_shards(partials, {"t": merged})
        assert (redo == []) == exact
        if exact:
            np.testing.assert_array_equal(merged.rows, whole.rows)
        else:  # the named shards, sent in full, make the merge exact
            for shard in redo:
                sample = RowSample("t", 128)
                for i in parts[shard]:
                    sample.update(batches[i], int(i))
                partials[shard] = Partial(shard, {}, {"t": sample})
            merged = partials[0].samples["t"]
            for p in partials[1:]:
                merged = merged.merge(p.samples["t"])
            np.testing.assert_array_equal(merged.rows, whole.rows)


def test_collect_on_ray_redoes_shards_whose_truncated_samples_were_too_short(tmp_path, monkeypatch):
    from trtglm.calib import ray_executor

    model = models.build_cnn_classifier()
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "input.npy", np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32))
    specs = calib_data.input_specs(model)
    tensors = ["input"] + [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    groups = calib_data.open_dataset(calib, specs).groups(list(range(48)), 4)
    opener = lambda: calib_data.open_dataset(calib, specs)  # noqa: E731
    calm = collect_on_ray(model, tensors, groups, opener, tensors, 2)
    monkeypatch.setattr(ray_executor, "keep_rows", lambda capacity, shards: 3)  # far too few: the merge must notice
    short = collect_on_ray(model, tensors, groups, opener, tensors, 2)
    for name in tensors:
        np.testing.assert_array_equal(short[1][name].rows, calm[1][name].rows)
        np.testing.assert_array_equal(short[0][name].hist, calm[0][name].hist)
