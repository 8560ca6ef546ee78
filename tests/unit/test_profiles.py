"""Shape profiles on toy KV-cache decoders built in code: derived profiles, --shapes specs good and bad, the checks
against the model (each error one line naming the input), the manifest round trip, and ONNX Runtime runs of the
toy decoder at each profile's min, opt and max shapes."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from trtglm.config import ShapeProfile
from trtglm.errors import ConfigError
from trtglm.profiles import (FORMAT, Manifest, check_profiles, manifest_path, parse_shapes, profiles_for,
                             read_manifest, write_manifest)

KV, HD, VOCAB, POSITIONS = 2, 4, 16, 64
HIDDEN = KV * HD
TOTAL = "past + seq"


def _decoder(layers: int = 2, past: bool = True, seq="seq", batch="batch", extra: dict | None = None,
             max_positions: int | None = None) -> onnx.ModelProto:
    """input_ids/position_ids [batch, seq], attention_mask [batch, past + seq], past_key_values.{i}.key/value
    [batch, KV, past, HD] -> logits [batch, seq, VOCAB] (masked attention of layer 0) and present.{i}.key/value,
    the past concatenated with the new keys/values. `seq` is the dim of the new tokens (1: a static decode graph)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((POSITIONS, HIDDEN)).astype(np.float32), "pos_emb"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "lm_head"),
             numpy_helper.from_array(np.array([0, 0, KV, HD], np.int64), "heads"),
             numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "hidden"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes"),
             numpy_helper.from_array(np.array(1e9, np.float32), "big"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    n = helper.make_node
    nodes = [n("Gather", ["emb", "input_ids"], ["tok"]), n("Gather", ["pos_emb", "position_ids"], ["pos"]),
             n("Add", ["tok", "pos"], ["x"]), n("Reshape", ["x", "heads"], ["xh"]),
             n("Transpose", ["xh"], ["new"], perm=[0, 2, 1, 3])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            [batch, TOTAL if past else seq]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, VOCAB])]
    for i in range(layers):
        for kind in ("key", "value"):
            present = f"present.{i}.{kind}"
            if past:
                name = f"past_key_values.{i}.{kind}"
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, KV, "past", HD]))
                nodes.append(n("Concat", [name, "new"], [present], axis=2))
            else:
                nodes.append(n("Identity", ["new"], [present]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT,
                                                         [batch, KV, TOTAL if past else seq, HD]))
    nodes += [n("Transpose", ["present.0.key"], ["kt"], perm=[0, 1, 3, 2]), n("MatMul", ["new", "kt"], ["scores"]),
              n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT), n("Sub", ["maskf", "one"], ["off"]),
              n("Mul", ["off", "big"], ["bias2"]), n("Unsqueeze", ["bias2", "mask_axes"], ["bias"]),
              n("Add", ["scores", "bias"], ["masked"]), n("Softmax", ["masked"], ["probs"], axis=-1),
              n("MatMul", ["probs", "present.0.value"], ["ctx"]), n("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              n("Reshape", ["ctxt", "hidden"], ["h"]), n("MatMul", ["h", "lm_head"], ["logits"])]
    for name, dims in (extra or {}).items():  # extra inputs, passed through to outputs so that they are used
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, dims))
        nodes.append(n("Identity", [name], [f"{name}.out"]))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", TensorProto.INT64, dims))
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    model = helper.make_model(helper.make_graph(nodes, "toy_decoder", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    if max_positions is not None:
        helper.set_model_props(model, {"max_position_embeddings": str(max_positions)})
    onnx.checker.check_model(model)
    return model


def _feeds(profile: dict[str, ShapeProfile], which: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shapes = {name: getattr(p, which) for name, p in profile.items()}
    for vi in model.graph.input:  # static inputs are not in a profile
        shapes.setdefault(vi.name, tuple(d.dim_value for d in vi.type.tensor_type.shape.dim))
    batch, seq = shapes["input_ids"]
    past = shapes["attention_mask"][1] - seq
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq)), "attention_mask": np.ones((batch, past + seq)),
             "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq))}
    feeds = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in feeds.items()}
    for name, shape in shapes.items():
        if name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_prefill_and_decode_profiles():
    profiles = profiles_for(_decoder(), max_batch=8, max_seq=16, max_cache=24)
    assert len(profiles) == 2
    prefill, decode = profiles
    assert prefill["input_ids"] == ShapeProfile((1, 1), (4, 8), (8, 16))
    assert prefill["attention_mask"] == prefill["position_ids"] == prefill["input_ids"]
    assert prefill["past_key_values.1.value"] == ShapeProfile((1, KV, 0, HD), (4, KV, 0, HD), (8, KV, 0, HD))
    assert decode["input_ids"] == ShapeProfile((1, 1), (4, 1), (8, 1))
    assert decode["past_key_values.0.key"] == ShapeProfile((1, KV, 1, HD), (4, KV, 12, HD), (8, KV, 24, HD))
    assert decode["attention_mask"] == ShapeProfile((1, 2), (4, 13), (8, 25))
    custom = profiles_for(_decoder(), 8, 16, 24, opt_batch=1, opt_seq=16, opt_cache=3)
    assert custom[0]["input_ids"].opt == (1, 16) and custom[1]["attention_mask"].opt == (1, 4)


@pytest.mark.parametrize("kind", ["unified", "prefill", "decode_static_seq"])
def test_decoder_runs_at_every_profile_bound(kind):
    model = {"unified": _decoder(), "prefill": _decoder(past=False), "decode_static_seq": _decoder(seq=1)}[kind]
    profiles = profiles_for(model, max_batch=4, max_seq=8, max_cache=40)
    assert len(profiles) == {"unified": 2, "prefill": 1, "decode_static_seq": 1}[kind]
    seen = set()
    for profile in profiles:
        for which in ("min", "opt", "max"):
            feeds = _feeds(profile, which, model)
            logits, present = models.run_ort(model, feeds)[:2]
            batch, seq = feeds["input_ids"].shape
            total = feeds["attention_mask"].shape[1]
            assert logits.shape == (batch, seq, VOCAB) and np.isfinite(logits).all()
            assert present.shape == (batch, KV, total, HD)
            seen.add((batch, seq, total - seq))
    past_lengths = {past for _, _, past in seen}
    if kind != "prefill":  # the decode step ran with the shortest and the longest cache
        assert {1, 40} <= past_lengths
    if kind != "decode_static_seq":
        assert (4, 8, 0) in seen and (1, 1, 0) in seen


def test_split_export_gets_one_profile_per_graph():
    prefill = profiles_for(_decoder(past=False), 2, 8, 16)
    assert len(prefill) == 1 and set(prefill[0]) == {"input_ids", "attention_mask", "position_ids"}
    decode = profiles_for(_decoder(), 2, 8, 16, phases=("decode",))
    assert len(decode) == 1 and decode[0]["input_ids"].max == (2, 1)
    assert "no past_key_values" in _error(profiles_for, _decoder(past=False), 2, 8, 16, phases=("decode",))
    asked = profiles_for(_decoder(seq=1), 2, 8, 16, phases=("prefill",))  # asked for, a pinned axis is kept
    assert asked[0]["past_key_values.0.key"].max == (2, KV, 0, HD)
    message = _error(profiles_for, _decoder(batch=16), 2, 8, 16)
    assert message.startswith("prefill profile: the model's static dims (batch 16) leave no shape in batch 1/1/2")


def test_other_inputs_follow_their_dim_params():
    model = _decoder(extra={"cache_position": ["seq"], "rows": ["batch", 3]})
    prefill, decode = profiles_for(model, 4, 8, 16)
    assert prefill["cache_position"] == ShapeProfile((1,), (4,), (8,))
    assert decode["rows"] == ShapeProfile((1, 3), (2, 3), (4, 3))
    message = _error(profiles_for, _decoder(extra={"pixel_values": ["batch", "height"]}), 4, 8, 16)
    assert "'pixel_values' axis 1 (height)" in message and "--shapes" in message


@pytest.mark.parametrize("kwargs, expected", [
    ({"max_batch": 0}, "--max-batch 0"),
    ({"max_seq": 32}, "--max-seq 32 is more than --max-cache 16"),
    ({"opt_batch": 5}, "--opt-batch 5: must be in 1..4"),
    ({"opt_cache": 0}, "--opt-cache 0"),
    ({"phases": ("chat",)}, "phase 'chat'"),
    ({"max_positions": 16}, "'past_key_values.0.key' reaches past 16 + seq 1 = 17"),
])
def test_profiles_for_rejects(kwargs, expected):
    args = {"max_batch": 4, "max_seq": 8, "max_cache": 16} | kwargs
    assert expected in _error(profiles_for, _decoder(), **args)


def test_max_position_embeddings_from_the_model():
    model = _decoder(max_positions=32)
    assert len(profiles_for(model, 2, 8, 31)) == 2
    assert "max_position_embeddings 32" in _error(profiles_for, model, 2, 8, 32)


def test_parse_shapes():
    spec = "input_ids:1x1/4x64/8x512, 'attention_mask':1x1/4x64/8x512,past_key_values.0.key:1x2x0x4"
    profile = parse_shapes(spec)
    assert list(profile) == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert profile["attention_mask"] == ShapeProfile((1, 1), (4, 64), (8, 512))
    assert profile["past_key_values.0.key"] == ShapeProfile((1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 0, 4))


@pytest.mark.parametrize("spec, expected", [
    ("input_ids", "'input_ids': write NAME:MIN/OPT/MAX"),
    ("input_ids:1x1/8x512", "input 'input_ids' has 2 shapes"),
    ("input_ids:1x1/4x/8x512", "input 'input_ids': '4x' is not a shape"),
    ("input_ids:1x-1/4x4/8x8", "input 'input_ids': '1x-1' is not a shape"),
    ("input_ids:1x1/4x64/8x512,input_ids:1x1", "input 'input_ids' is given twice"),
    ("input_ids:1x1/4x64/8", "input 'input_ids' has min, opt, max of ranks 2, 2, 1"),
    ("input_ids:1x128/4x64/8x512", "input 'input_ids' axis 1 is 128/64/512"),
    ("input_ids:1x1/4x600/8x512", "input 'input_ids' axis 1 is 1/600/512"),
])
def test_parse_shapes_rejects(spec, expected):
    assert expected in _error(parse_shapes, spec)


def _good_decode_spec(past_len: str = "1/12/24", mask: str = "1x2/4x13/8x25") -> str:
    p = past_len.split("/")
    pasts = ",".join(f"past_key_values.{i}.{kind}:1x2x{p[0]}x4/4x2x{p[1]}x4/8x2x{p[2]}x4"
                     for i in range(2) for kind in ("key", "value"))
    return f"input_ids:1x1/4x1/8x1,position_ids:1x1/4x1/8x1,attention_mask:{mask},{pasts}"


@pytest.mark.parametrize("change, expected", [
    (lambda s: s + ",labels:1x1", "input 'labels' is not a model input (it has input_ids, attention_mask"),
    (lambda s: s.replace("input_ids:1x1/4x1/8x1", "input_ids:1x1x1/4x1x1/8x1x1"),
     "input 'input_ids' has rank 3, the model's is 2 [batch, seq]"),
    (lambda s: s.replace("past_key_values.1.key:1x2x1x4", "past_key_values.1.key:1x1x1x4"),
     "input 'past_key_values.1.key' axis 1 is 1/2/2, the model fixes it at 2"),
    (lambda s: s.replace(",position_ids:1x1/4x1/8x1", ""), "input 'position_ids' has dynamic axes [batch, seq]"),
    (lambda s: s.replace("1x2/4x13/8x25", "1x2/4x13/8x24"), "input 'attention_mask' length is 2/13/24 but past + "
                                                             "seq is 2/13/25"),
    (lambda s: s.replace("past_key_values.1.value:1x2x1x4/4x2x12x4/8x2x24x4",
                         "past_key_values.1.value:1x2x1x4/4x2x12x4/8x2x23x4"), "input 'past_key_values.1.value'"
                                                                               " axis 2 ('past') is 1/12/23"),
    (lambda s: s.replace("position_ids:1x1/4x1/8x1", "position_ids:1x1/2x1/8x1"),
     "input 'position_ids' axis 0 ('batch') is 1/2/8 but input 'input_ids' has 1/4/8"),
])
def test_check_profiles_rejects(change, expected):
    model = _decoder()
    check_profiles(model, [parse_shapes(_good_decode_spec())])  # the unchanged spec is good
    good = _good_decode_spec()
    message = _error(check_profiles, model, [parse_shapes(good), parse_shapes(change(good))])
    assert message.startswith("profile 1: ") and expected in message


def test_check_profiles_limits_positions():
    model = _decoder()
    profiles = [parse_shapes(_good_decode_spec())]
    check_profiles(model, profiles, max_positions=25)
    assert "'past_key_values.0.key' reaches past 24 + seq 1 = 25 positions, more than the model's " \
           "max_position_embeddings 24" in _error(check_profiles, model, profiles, max_positions=24)


def test_rejected_mask_length_also_fails_in_onnx_runtime():
    """What check_profiles rejects is what the graph cannot run: a mask shorter than past + seq."""
    model = _decoder()
    feeds = _feeds(parse_shapes(_good_decode_spec()), "max", model)
    feeds["attention_mask"] = feeds["attention_mask"][:, :-3]
    with pytest.raises(Exception, match="(?i)broadcast|dimension|shape"):
        models.run_ort(model, feeds)


def test_manifest_round_trip(tmp_path):
    model_file = tmp_path / "model.onnx"
    profiles = profiles_for(_decoder(), 8, 16, 24)
    extra = {"phases": ["prefill", "decode"], "max_batch": 8, "note": "[1,2]\n"}
    path = write_manifest(manifest_path(model_file), profiles, model_file, extra)
    assert path == tmp_path / "model.profiles.json"
    assert read_manifest(path) == Manifest(profiles, model_file, extra)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["model"] == "model.onnx"
    assert '"min": [1, 1]' in path.read_text()  # one shape per line
    first = path.read_bytes()
    write_manifest(path, profiles, model_file, extra)
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["model.profiles.json"]
    elsewhere = write_manifest(tmp_path / "sub" / "m.json", profiles, model_file)
    assert read_manifest(elsewhere).model == model_file.resolve() and read_manifest(elsewhere).extra == {}


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d | {"format": "trtglm.profiles/9"}, "format 'trtglm.profiles/9' is not 'trtglm.profiles/1'"),
    (lambda d: d | {"profiles": [{"input_ids": {"min": [1, 9], "opt": [1, 4], "max": [1, 8]}}]},
     "profile 0: input 'input_ids' axis 1 is 9/4/8"),
    (lambda d: {k: v for k, v in d.items() if k != "model"}, "malformed (KeyError"),
])
def test_read_manifest_rejects(tmp_path, edit, expected):
    path = write_manifest(tmp_path / "m.json", profiles_for(_decoder(), 2, 4, 8), tmp_path / "m.onnx")
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert expected in _error(read_manifest, path)
    path.write_text("{")
    assert "cannot read it as JSON" in _error(read_manifest, path)
