"""trtglm export --hf-config, generate and bench-decode through the CLI on a tiny random GLM."""

import json

import pytest
from click.testing import CliRunner

from trtglm.cli import main
from trtglm.profiles import read_manifest

pytest.importorskip("transformers", reason="transformers is needed to build a GLM (pip install -e '.[export,dev]')")

CONFIG = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": 100, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 128, "partial_rotary_factor": 0.5,
          "tie_word_embeddings": False, "use_cache": True, "pad_token_id": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glm")
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    result = CliRunner().invoke(main, ["export", "--hf-config", str(tmp / "config.json"), "--max-batch", "4",
                                       "-o", str(tmp / "out")])
    assert result.exit_code == 0, result.output
    return tmp / "out", result.output


def test_export_writes_the_graph_and_its_shape_profiles(exported):
    out, text = exported
    assert "2 shape profiles" in text
    manifest = read_manifest(out / "model.profiles.json")
    prefill, decode = manifest.profiles
    assert prefill["input_ids"].max == (4, 64) and prefill["past_key_values.0.key"].max[2] == 0
    assert decode["input_ids"].max == (4, 1) and decode["past_key_values.0.key"].max[2] == 127
    assert decode["attention_mask"].max == (4, 128)


def test_generate_and_bench_decode(exported):
    out, _ = exported
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line]
    assert len(rows) == 2 and all(len(r.split(",")) == 5 for r in rows)
    bench = CliRunner().invoke(main, ["bench-decode", str(out), "--batch", "1,2", "--new-tokens", "8"])
    assert bench.exit_code == 0, bench.output
    assert "median ms/token" in bench.stdout and "same tokens: yes" in bench.stdout


def test_export_needs_exactly_one_source_and_a_buildable_config(tmp_path):
    result = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "x")])
    assert result.exit_code not in (0, None) and "either FACTORY" in result.stderr
    (tmp_path / "bad.json").write_text(json.dumps({**CONFIG, "pad_token_id": 1000}))
    result = CliRunner().invoke(main, ["export", "--hf-config", str(tmp_path / "bad.json"), "-o", str(tmp_path / "y")])
    assert result.exit_code not in (0, None) and "bad.json" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "y").exists()


def test_a_decode_step_runs_at_each_profiles_min_and_max(exported):
    import numpy as np
    import onnxruntime as ort

    out, _ = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for profile in read_manifest(out / "model.profiles.json").profiles:
        for pick in ("min", "max"):
            shapes = {name: getattr(p, pick) for name, p in profile.items()}
            feeds = {name: (np.zeros(shape, np.float32) if name.startswith("past") else np.ones(shape, np.int64))
                     for name, shape in shapes.items()}
            batch, seq = shapes["input_ids"]
            feeds["position_ids"] = np.broadcast_to(np.arange(seq), (batch, seq)).astype(np.int64)
            logits = session.run(["logits"], feeds)[0]
            assert logits.shape == (batch, seq, CONFIG["vocab_size"]) and np.isfinite(logits).all()


def test_generate_from_text_with_a_tokenizer(exported, tmp_path):
    from tests.unit.test_calib_text import make_tokenizer

    out, _ = exported
    make_tokenizer(tmp_path / "tok")  # word-level, 16 ids: within the tiny GLM's vocabulary of 100
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "the cat sat", "--prompt", "a dog",
                                       "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert len([line for line in result.stdout.splitlines()]) == 2
    missing = CliRunner().invoke(main, ["generate", str(out), "--prompt", "the cat"])
    assert missing.exit_code not in (0, None) and "--tokenizer" in missing.stderr


def test_int8_kv_cache_build_decodes_like_fp32(exported, tmp_path):
    import numpy as np
    import onnx

    from trtglm.generate import greedy

    out, _ = exported
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    n, s = 16, 12
    np.save(calib / "input_ids.npy", rng.integers(0, CONFIG["vocab_size"], (n, s)).astype(np.int64))
    np.save(calib / "attention_mask.npy", np.ones((n, s), np.int64))
    np.save(calib / "position_ids.npy", np.tile(np.arange(s), (n, 1)).astype(np.int64))
    for i in range(CONFIG["num_hidden_layers"]):
        for kind in ("key", "value"):
            np.save(calib / f"past_key_values.{i}.{kind}.npy", np.zeros((n, 2, 0, 16), np.float32))
    result = CliRunner().invoke(main, ["build", str(out / "model.onnx"), "--calib", str(calib), "--kv-cache", "int8",
                                       "--out", str(tmp_path / "kv")])
    assert result.exit_code == 0, result.output
    int8 = onnx.load(tmp_path / "kv" / "model.int8.qdq.onnx")
    cache_types = {v.name: v.type.tensor_type.elem_type for v in [*int8.graph.input, *int8.graph.output]
                   if v.name.startswith(("past", "present"))}
    assert len(cache_types) == 8 and set(cache_types.values()) == {onnx.TensorProto.INT8}
    prompts = rng.integers(0, CONFIG["vocab_size"], (2, 6)).tolist()
    tokens, ref, _ = greedy(out, prompts, 12)
    _, got, _ = greedy(tmp_path / "kv" / "model.int8.qdq.onnx", prompts, 12, forced=tokens)
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8  # random weights, flat logits: the hard case


def test_kv_cache_int8_needs_a_cache(tmp_path):
    import numpy as np
    import onnx

    from tests import models

    model = models.build_mlp()
    onnx.save(model, tmp_path / "mlp.onnx")
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "input.npy", np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "mlp.onnx"), "--calib", str(tmp_path / "c"),
                                       "--kv-cache", "int8", "--out", str(tmp_path / "o")])
    assert result.exit_code not in (0, None) and "past_key_values" in result.stderr
    assert not (tmp_path / "o").exists()
