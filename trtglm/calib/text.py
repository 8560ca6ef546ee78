"""Text calibration data: sentences (one per line) tokenized with the model's own tokenizer, loaded from a local
directory. Token models get their inputs filled by name, so calibrating a BERT-like encoder needs a text file, not
hand-made .npy arrays. On a dynamic sequence axis each batch is padded only to its longest sample, so the
activation statistics see as few pad tokens as possible.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trtglm.calib.data import Dataset, InputSpec, _first_line
from trtglm.errors import ConfigError, DataError

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

Encode = Callable[[list[str]], list[list[int]]]


def open_text_dataset(path: Path, tokenizer_dir: Path, max_seq: int, specs: list[InputSpec],
                      what: str = "calibration") -> Dataset:
    """Tokenize every non-empty line of `path` (a .txt file, or a directory of them in name order), truncated at
    `max_seq`; batches hold the model's token inputs, padded to the static sequence axis or to the longest line."""
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    static = _check_specs(specs, max_seq)
    lines, origins = _read_lines(path, what)
    encode, pad_id = _load_tokenizer(tokenizer_dir, max_seq)
    try:
        ids = [np.asarray(x, dtype=np.int64) for x in encode(lines)]
    except Exception as e:
        raise DataError(f"{what} text {path}: tokenizer {tokenizer_dir} failed: {_first_line(e)}") from e
    for i, x in enumerate(ids):
        if not len(x):
            raise DataError(f"{what} text {origins[i]}: the line tokenizes to no tokens")

    def read(group: list[int]) -> list[np.ndarray]:
        length = static or max(len(ids[i]) for i in group)
        input_ids = np.full((len(group), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), length), dtype=np.int64)
        for row, i in enumerate(group):
            input_ids[row, :len(ids[i])], mask[row, :len(ids[i])] = ids[i], 1
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask),
                  "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), mask.shape)}
        return [arrays[s.name] for s in specs]

    padding = f"padded to {static}" if static else "padded to the longest line of each batch"
    return Dataset(f"{len(ids)} lines from {path} (tokenizer {tokenizer_dir}, max_seq {max_seq}, {padding})",
                   specs, len(ids), read, per_sample=True)


def _check_specs(specs: list[InputSpec], max_seq: int) -> int | None:
    """The model's static sequence length, or None when the axis is dynamic."""
    if max_seq < 2:
        raise ConfigError(f"--max-seq {max_seq}: must be at least 2 (room for the tokenizer's special tokens)")
    for s in specs:
        if s.name not in TOKEN_INPUTS:
            raise DataError(f"model input '{s.name}' cannot be filled from text; text calibration fills "
                            f"{', '.join(TOKEN_INPUTS)}")
        if len(s.shape) != 2 or s.dtype.kind not in "iu":
            raise DataError(f"model input '{s.name}' is {s.dtype} with {len(s.shape)} axes; text calibration "
                            "fills integer inputs of shape (batch, sequence)")
    if "input_ids" not in [s.name for s in specs]:
        raise DataError(f"model has no 'input_ids' input (inputs: {', '.join(s.name for s in specs)}); "
                        "text calibration feeds token ids")
    static = {s.shape[1] for s in specs if isinstance(s.shape[1], int)}
    if len(static) > 1:
        raise DataError(f"model inputs have different static sequence lengths {sorted(static)}")
    length = static.pop() if static else None
    if length is not None and max_seq > length:
        raise ConfigError(f"--max-seq {max_seq}: larger than the model's static sequence axis ({length}); "
                          f"use --max-seq {length} or less")
    return length


def _read_lines(path: Path, what: str) -> tuple[list[str], list[str]]:
    """Non-empty lines (stripped) and, for each, 'file:line' for error messages."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise DataError(f"{what} directory {path}/: no .txt files found")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{what} text {path}: not found")
    lines, origins = [], []
    for f in files:
        count = len(lines)
        for number, raw in enumerate(f.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{what} text {f}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if line:
                lines.append(line)
                origins.append(f"{f}:{number}")
        if len(lines) == count:
            raise DataError(f"{what} text {f}: empty file (expected one sample per non-empty line)")
    return lines, origins


def _load_tokenizer(directory: Path, max_seq: int) -> tuple[Encode, int]:
    """Local files only: tokenizer.json through `tokenizers`, else transformers' AutoTokenizer."""
    where = f"--tokenizer {directory}"
    if not directory.is_dir():
        raise ConfigError(f"{where}: directory not found" if not directory.exists() else f"{where}: not a directory")
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory / "tokenizer.json", max_seq)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"{where}: no tokenizer.json; loading other tokenizer formats needs transformers "
                          "(pip install transformers)") from None
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"{where}: transformers could not load a tokenizer ({_first_line(e)})") from e
    if tok.pad_token_id is None:
        raise ConfigError(f"{where}: the tokenizer has no pad token")
    return (lambda lines: tok(lines, truncation=True, max_length=max_seq)["input_ids"]), int(tok.pad_token_id)


def _from_tokenizer_json(file: Path, max_seq: int) -> tuple[Encode, int]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"--tokenizer {file.parent}: reading tokenizer.json needs tokenizers "
                          "(pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ConfigError(f"--tokenizer {file}: unreadable ({_first_line(e)})") from e
    pad_id = tok.padding["pad_id"] if tok.padding else _pad_id_from_config(tok, file.parent)
    if pad_id is None:
        raise ConfigError(f"--tokenizer {file.parent}: no pad token (tokenizer.json has no padding and no "
                          "pad_token in tokenizer_config.json or special_tokens_map.json)")
    tok.no_padding()
    tok.enable_truncation(max_seq)
    return (lambda lines: [e.ids for e in tok.encode_batch(lines)]), int(pad_id)


def _pad_id_from_config(tok, directory: Path) -> int | None:
    """The id of `pad_token` named in tokenizer_config.json or special_tokens_map.json (a string or {content})."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            pad = json.loads((directory / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and tok.token_to_id(pad) is not None:
            return tok.token_to_id(pad)
    return None


def text_codec(directory: Path) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) of the local tokenizer in `directory`, for prompts and generated text (trtglm generate)."""
    where = f"--tokenizer {directory}"
    if not directory.is_dir():
        raise ConfigError(f"{where}: directory not found" if not directory.exists() else f"{where}: not a directory")
    if (directory / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except ImportError:
            raise ConfigError(f"{where}: reading tokenizer.json needs tokenizers (pip install tokenizers)") from None
        except Exception as e:
            raise ConfigError(f"{where}: tokenizer.json unreadable ({_first_line(e)})") from e
        tok.no_padding()
        tok.no_truncation()
        return (lambda text: tok.encode(text).ids), (lambda ids: tok.decode(ids))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except ImportError:
        raise ConfigError(f"{where}: no tokenizer.json; other formats need transformers") from None
    except Exception as e:
        raise ConfigError(f"{where}: transformers could not load a tokenizer ({_first_line(e)})") from e
    return (lambda text: tok(text)["input_ids"]), (lambda ids: tok.decode(ids))
