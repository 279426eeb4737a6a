"""benchmarks/bench_llamacpp.py without llama.cpp: the tokenizer.json it writes for a preset's vocabulary,
the decode-throughput formula, the helpers of the comparison and the command line. The llama.cpp build,
conversion and timing are benchmark steps (BENCHMARKS.md), not tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.tokenizer import load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llamacpp.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_llamacpp", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_llamacpp"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory, bench: ModuleType) -> tuple[Path, Path]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    write_tokenizer(ckpt, 1024)  # the tiny preset's ranks; 256 special ids follow
    out = ckpt / "hf"
    bench.write_tokenizer_json(ckpt, out)
    return ckpt, out


TEXTS = [
    "Hello WORLD 我想在apple工作1314151天 it's  \n\n ok",
    "The quick brown fox jumps over the lazy dog. def f(x): return x**2\n\treturn None",
    "   leading spaces, numbers 1234567 and ünïcödé 🚀",
]


def test_tokenizer_json_loads_with_the_vocab_size_and_encodes_like_k2serve(
    tok_dirs: tuple[Path, Path],
) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    ckpt, out = tok_dirs
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert hf.get_vocab_size() == 1024 + 256
    ours = load_tokenizer(ckpt)
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == ours.encode(text, allow_special=False), text
        assert hf.decode(ids) == text
    # the special tokens keep their ids and names
    assert hf.token_to_id("[BOS]") == 1024 and hf.token_to_id("[PAD]") == 1024 + 255
    assert hf.encode("<|im_end|>", add_special_tokens=False).ids == [1024 + 2]


def test_tokenizer_config_names_the_fast_tokenizer(tok_dirs: tuple[Path, Path]) -> None:
    ckpt, out = tok_dirs
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (
        cfg["added_tokens_decoder"]
        == json.loads((ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    )


def test_merges_are_recovered_in_rank_order(bench: ModuleType) -> None:
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b"bc": 258, b"xyz": 259}
    doc = bench.tokenizer_json(ranks, {260: "[BOS]"}, r"\s+|\S+")
    # bc is a merge of its own; xyz is no merge of two tokens ranked below it (x, y, z alone)
    assert doc["model"]["merges"] == [["a", "b"], ["ab", "c"], ["b", "c"]]
    assert doc["model"]["vocab"]["Ġ"] == 32  # byte-level alphabet: the space byte
    assert bench.bpe_parts(ranks, b"abc", 257) == [b"ab", b"c"]
    assert bench.bpe_parts(ranks, b"abc", 256) == [b"a", b"b", b"c"]
    table = bench.bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A"


def test_read_tiktoken_rejects_a_bad_line(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== x\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2"):
        bench.read_tiktoken(tmp_path / "tiktoken.model")


def test_decode_throughput_formula(bench: ModuleType) -> None:
    # 8 sequences, 64 decode steps: t(1) = 2 s (prefill + first token), t(65) = 6 s -> 512 tokens in 4 s
    assert bench.decode_throughput(8, 64, 2.0, 6.0) == pytest.approx(128.0)
    with pytest.raises(ValueError, match="must exceed"):
        bench.decode_throughput(1, 4, 2.0, 2.0)
    with pytest.raises(ValueError, match="batch and n"):
        bench.decode_throughput(0, 4, 1.0, 2.0)


def test_batched_bench_jsonl_and_table(bench: ModuleType) -> None:
    out = 'main: n_kv_max = 6208\n{"pp": 128, "tg": 64, "pl": 8, "speed_tg": 512.5}\nllama_perf_context_print: ...\n'
    assert bench.parse_jsonl(out) == [{"pp": 128, "tg": 64, "pl": 8, "speed_tg": 512.5}]
    assert bench.common_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    s = bench.spread([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0}
    row = {"weights": "bf16", "what": "decode batch 8", "k2serve": s, "llama.cpp": s, "ratio": 1.0}
    assert (
        bench.table([row]).splitlines()[-1]
        == "| bf16 | decode batch 8 | 2.0 (1.0-3.0) | 2.0 (1.0-3.0) | 1.00 |"
    )


def test_argument_parsing(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = bench.parse_args(["--cache", str(tmp_path), "run", "--batch-sizes", "1,4", "--rounds", "5"])
    assert (args.cmd, args.batch_sizes, args.rounds, args.threads, args.cache) == (
        "run",
        [1, 4],
        5,
        2,
        tmp_path,
    )
    assert bench.parse_args(["convert", "--kinds", "bf16,q4_0-experts"]).kinds == ["bf16", "q4_0-experts"]
    assert args.compile == "none" and bench.parse_args(["run", "--compile", "decode"]).compile == "decode"
    for bad, message in [
        (["run", "--batch-sizes", "1,x"], "comma-separated integers"),
        (["run", "--batch-sizes", "0"], "must be >= 1"),
        (["convert", "--kinds", "q8"], "unknown ['q8']"),
        (["--threads", "0", "run"], "--threads must be >= 1"),
        (["run", "--rounds", "0"], "--rounds"),
        (["run", "--skip-bf16"], "nothing to run without --q4"),
        (["run", "--compile", "all"], "invalid choice: 'all'"),
    ]:
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert message in capsys.readouterr().err
    paths = bench.Paths(tmp_path)
    assert paths.gguf("q4_0") == tmp_path / "models" / "small-q4_0.gguf"
