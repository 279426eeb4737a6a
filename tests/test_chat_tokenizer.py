"""KimiTokenizer, the BPE trainer and streaming detokenization."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.chat._corpus import CORPUS
from k2serve.chat.bpe_train import BpeTrainError, train_bpe_ranks, write_tokenizer
from k2serve.chat.tokenizer import (
    IncrementalDecoder,
    KimiTokenizer,
    TokenizerError,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> KimiTokenizer:
    return load_tokenizer(tiny_dir)


def test_written_files_are_deterministic_and_complete(tiny_dir: Path, tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 1024)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    assert [int(line.split()[1]) for line in lines] == list(range(1024))
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    assert len(config["added_tokens_decoder"]) == 256


def test_small_preset_is_fast_and_exact() -> None:
    start = time.perf_counter()
    ranks = train_bpe_ranks(CORPUS, 32000)
    assert time.perf_counter() - start < 5.0
    assert sorted(ranks.values()) == list(range(32000))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_trainer_rejects_too_few_ranks() -> None:
    with pytest.raises(BpeTrainError) as info:
        train_bpe_ranks("abc", 100)
    assert info.value.value == 100


def test_special_ids_follow_the_ranks(tok: KimiTokenizer) -> None:
    assert tok.vocab_size == 1280
    assert tok.bos_id == 1024 and tok.pad_id == 1279 and tok.unk_id == 1278
    assert tok.eos_id == tok.token_to_id("<|im_end|>") == 1026
    assert tok.stop_ids == {1025, 1026}
    assert tok.special_ids["<think>"] == 1046
    assert tok.special_ids["<|tool_calls_section_begin|>"] == 1035
    assert tok.special_ids["<|reserved_token_1029|>"] == 1029
    assert tok.id_to_token_bytes(1037) == b"<|tool_call_begin|>"
    assert tok.id_to_token_bytes(ord("a")) == b"a"
    assert tok.token_to_id("a") == ord("a")


def test_real_model_special_ids() -> None:
    big = KimiTokenizer(train_bpe_ranks("", 163584))
    expected = {
        "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
        "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
        "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
        "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
        "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839,
        "<|reserved_token_163600|>": 163600,
    }  # fmt: skip
    assert {name: big.special_ids[name] for name in expected} == expected
    assert big.vocab_size == 163840 and big.eos_id == 163586


def test_special_tokens_in_text(tok: KimiTokenizer) -> None:
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.special_ids["<|im_user|>"] and ids[-1] == tok.eos_id
    plain = tok.encode(text, allow_special=False)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(ids) == tok.decode(plain) == text
    assert tok.decode(ids, skip_special_tokens=True) == "userhi"


@settings(max_examples=150, deadline=None)
@given(text=st.text(), allow=st.booleans())
def test_roundtrip(tok: KimiTokenizer, text: str, allow: bool) -> None:
    assert tok.decode(tok.encode(text, allow_special=allow)) == text


def test_han_runs_are_separate_pieces(tok: KimiTokenizer) -> None:
    for token_id in tok.encode("你好world，世界abc"):
        piece = tok.id_to_token_bytes(token_id).decode("utf-8", errors="ignore")
        assert not (any("\u4e00" <= c <= "\u9fff" for c in piece) and any(c.isascii() for c in piece))


def test_long_runs_are_chunked(tok: KimiTokenizer) -> None:
    for text in ("a" * 60_000, " " * 60_001 + "x", "ab " * 20_000):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 1279), max_size=40), skip=st.booleans())
def test_incremental_decoder_matches_decode(tok: KimiTokenizer, ids: list[int], skip: bool) -> None:
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    streamed = "".join(dec.add(i) for i in ids) + dec.finish()
    assert streamed == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_incremental_decoder_never_splits_a_character(tok: KimiTokenizer, text: str) -> None:
    dec = IncrementalDecoder(tok)
    deltas = [dec.add(i) for i in tok.encode(text, allow_special=False)]
    assert dec.finish() == ""
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_errors_carry_the_offending_value(tok: KimiTokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as info:
        tok.decode([0, 1280])
    assert info.value.value == 1280
    with pytest.raises(TokenizerError):
        tok.id_to_token_bytes(-1)
    with pytest.raises(TokenizerError) as info:
        tok.token_to_id("<|no_such_token|>")
    assert info.value.value == "<|no_such_token|>"
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


def test_config_chat_template_and_names(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tiktoken.model").write_bytes((tiny_dir / "tiktoken.model").read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    config["added_tokens_decoder"]["1030"] = {"content": "<|custom|>", "special": True}
    config["bos_token"] = {"content": "[BOS]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == "{{ messages }}"
    assert loaded.encode("<|custom|>") == [1030]
    config["added_tokens_decoder"]["5000"] = {"content": "<|far|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert info.value.value == 5000
