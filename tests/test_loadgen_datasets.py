"""vLLM `bench serve` datasets in `k2serve bench serve`: ShareGPT JSON and custom JSONL parsing (vLLM's
filtering rules, output lengths, errors naming the entry/line), and one end-to-end run of each against a
real in-process server on the tiny checkpoint, prompts tokenized with its tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import tiny_api_server

from k2serve.chat.tokenizer import load_tokenizer
from k2serve.engine.config import EngineConfig
from k2serve.loadgen.cli import build_parser, config_from_args, main, reproduce_command
from k2serve.loadgen.config import BenchConfig, BenchConfigError
from k2serve.loadgen.text_datasets import DatasetFormatError, custom_requests, sharegpt_requests

pytestmark = pytest.mark.timeout(120)


def words(text: str) -> Sequence[int]:
    """A stand-in tokenizer for the parsing tests: one token per word (its length)."""
    return [len(w) for w in text.split()]


def conv(prompt: str, reply: str, *more: str) -> dict:
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
    return {"conversations": turns + [{"from": "human", "value": m} for m in more]}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_filtering_and_output_lengths(tmp_path: Path) -> None:
    w = "w "
    data = [
        conv(w * 5, w * 6, "ignored third turn"),  # kept: 5 in, 6 out
        {"conversations": [{"from": "human", "value": w * 9}]},  # one turn: dropped
        conv(w * 3, w * 10),  # prompt under 4 tokens: skipped
        conv(w * 10, w * 3),  # output under 4: skipped unless the output length is fixed
        conv(w * 1025, w * 4),  # prompt over 1024: skipped
        conv(w * 1000, w * 1049),  # 2049 in all: skipped
        conv(w * 1000, w * 1048),  # 2048: kept
    ]
    path = write_json(tmp_path / "sg.json", data)
    reqs = sharegpt_requests(path, words, seed=0, num_prompts=None, output_len=None)
    assert sorted((len(r.prompt), r.output_len) for r in reqs) == [(5, 6), (1000, 1048)]
    assert [r.index for r in reqs] == [0, 1]
    fixed = sharegpt_requests(path, words, seed=0, num_prompts=None, output_len=7)
    assert sorted((len(r.prompt), r.output_len) for r in fixed) == [(5, 7), (10, 7), (1000, 7), (1000, 7)]
    # the seed shuffles; num_prompts counts kept requests, not file entries
    many = write_json(tmp_path / "many.json", [conv(w * (4 + i), w * 4) for i in range(20)])
    a = [len(r.prompt) for r in sharegpt_requests(many, words, 1, 5, None)]
    b = [len(r.prompt) for r in sharegpt_requests(many, words, 2, 5, None)]
    assert len(a) == 5 and a != b and a == [len(r.prompt) for r in sharegpt_requests(many, words, 1, 5, None)]
    assert a != sorted(a) or b != sorted(b)


@pytest.mark.parametrize(
    ("data", "where", "reason"),
    [
        ({"conversations": []}, None, "JSON list"),
        ([conv("a b c d", "e f g h"), {"turns": []}], "entry 1", '"conversations" list'),
        (
            [conv("a b c d", "e f g h"), {"conversations": [{"from": "human"}, {"value": "x"}]}],
            "entry 1",
            "[0]",
        ),
        (
            [{"conversations": [{"value": 3}, {"value": "x"}]}],
            "entry 0",
            "conversations[0].value must be a string",
        ),
    ],
)
def test_sharegpt_errors_name_the_entry(tmp_path: Path, data: object, where: str | None, reason: str) -> None:
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DatasetFormatError) as e:
        sharegpt_requests(path, words, 0, None, None)
    assert e.value.where == where and reason in str(e.value) and str(path) in str(e.value)


def test_sharegpt_not_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n{"conversations": []},\n{oops}\n]')
    with pytest.raises(DatasetFormatError, match=r"bad.json: line 3: not JSON"):
        sharegpt_requests(path, words, 0, None, None)


def test_custom_output_lengths_and_order(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "one two"}\n\n{"prompt": "a b c", "output_tokens": 9}\n{"prompt": "x"}\n')
    reqs = custom_requests(path, words, seed=0, num_prompts=None, output_len=None)
    assert sorted((len(r.prompt), r.output_len) for r in reqs) == [(1, 256), (2, 256), (3, 9)]
    fixed = custom_requests(path, words, seed=0, num_prompts=2, output_len=5)
    assert len(fixed) == 2 and {r.output_len for r in fixed} == {5}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"prompt": "ok"}\n{"prompt": "a", \n', "line 2: not JSON"),
        ('{"prompt": "ok"}\n\n["a"]\n', 'line 3: must be a JSON object with a "prompt"'),
        ('{"text": "a"}\n', 'line 1: must be a JSON object with a "prompt"'),
        ('{"prompt": 5}\n', "line 1: prompt must be a string"),
        ('{"prompt": "a", "output_tokens": 0}\n', "line 1: output_tokens must be an integer >= 1"),
        ('{"prompt": "a", "output_tokens": "7"}\n', "line 1: output_tokens must be an integer >= 1"),
        ('{"prompt": "   "}\n', "encodes to no tokens"),
    ],
)
def test_custom_errors_name_the_line(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match=reason.replace("[", r"\[")):
        custom_requests(path, words, 0, None, None)


def test_config_and_flags() -> None:
    args = build_parser().parse_args(
        ["--dataset-name", "sharegpt", "--dataset-path", "d.json", "--tokenizer", "ck", "--num-prompts", "3",
         "--sharegpt-output-len", "12"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.dataset, config.dataset_path, config.tokenizer, config.sharegpt_output_len) == (
        "sharegpt", "d.json", "ck", 12
    )  # fmt: skip
    assert config.arrival_rate == float("inf")
    again = config_from_args(build_parser().parse_args(reproduce_command(config).split()[3:]))
    assert again == config
    with pytest.raises(BenchConfigError, match="tokenizer"):
        BenchConfig(dataset="custom", dataset_path="c.jsonl")
    with pytest.raises(BenchConfigError, match="dataset_path"):
        BenchConfig(dataset="custom", tokenizer="ck")
    with pytest.raises(BenchConfigError, match="custom_output_len"):
        BenchConfig(dataset="custom", dataset_path="c.jsonl", tokenizer="ck", custom_output_len=0)


@pytest.fixture(scope="module")
def url(tiny_ckpt: Path) -> Iterator[str]:
    with tiny_api_server(tiny_ckpt, config=EngineConfig(num_kv_blocks=256, block_size=8)) as (base, _):
        yield base


def test_sharegpt_end_to_end(url: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_ckpt)
    data = [
        conv("Tell me about the sea and its tides.", "The sea rises and falls twice a day."),
        conv("Hi", "Hello there, how can I help you today?"),  # prompt too short: skipped
        conv("What is two plus two, exactly?", "Four, as any calculator will tell you."),
        conv("Name three colours of the rainbow please.", "Red, green and blue are three of them."),
    ]
    path = write_json(tmp_path / "sg.json", data)
    out = tmp_path / "r.json"
    argv = ["--url", url, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--tokenizer",
            str(tiny_ckpt), "--max-concurrency", "2", "--progress-interval", "60", "--result-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["completed"] == 3 and result["stopped_by"] == "dataset_end"

    def n(text: str) -> int:
        return len(tok.encode(text, allow_special=False))

    turns = [c["conversations"] for c in data if c["conversations"][0]["value"] != "Hi"]
    expected = sorted((n(t[0]["value"]), n(t[1]["value"])) for t in turns)
    assert sorted((r["prompt_len"], r["output_tokens"]) for r in result["requests"]) == expected
    assert all(r["output_tokens"] == r["requested_output_len"] for r in result["requests"])


def test_custom_end_to_end(
    url: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"prompt": "The quick brown fox", "output_tokens": 5}\n{"prompt": "jumps over the dog"}\n'
    )
    out = tmp_path / "r.json"
    argv = ["--url", url, "--dataset-name", "custom", "--dataset-path", str(path), "--tokenizer",
            str(tiny_ckpt), "--custom-output-len", "6", "--progress-interval", "60", "--result-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["completed"] == 2
    assert [r["output_tokens"] for r in result["requests"]] == [6, 6]
    assert "--dataset custom --seed 0" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 1}\n')
    assert (
        main(
            [
                "--url",
                url,
                "--dataset-name",
                "custom",
                "--dataset-path",
                str(bad),
                "--tokenizer",
                str(tiny_ckpt),
            ]
        )
        == 2
    )
    assert "bad.jsonl: line 2: prompt must be a string" in capsys.readouterr().err
