"""`k2serve bench engine` at toy size: paired rounds of k2serve and transformers on the same weights,
both warmed up, medians and per-round ratios in the JSON, and (fp32) the same greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2serve.bench import engine as bench_engine


def test_rounds_alternate_and_the_report_has_medians_and_ratios(tiny_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "engine.json"
    argv = ["--model", str(tiny_ckpt), "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "4"]
    assert bench_engine.main([*argv, "--dtype", "float32", "--rounds", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["bandwidth_bytes_s"] > 0
    rows = {r["batch"]: r for r in report["results"]}
    assert set(rows) == {1, 3}
    for batch, row in rows.items():
        assert (row["rounds"], row["compile"]) == (3, "none")
        tok, hf = row["k2serve_tok_s"], row["transformers_tok_s"]
        assert 0 < tok["min"] <= tok["median"] <= tok["max"]
        assert 0 < hf["min"] <= hf["median"] <= hf["max"]
        low, high = row["speedup_range"]
        assert low <= row["speedup"] <= high
        assert row["identical_greedy"] == batch  # fp32: token for token
    assert "roofline_fraction" in rows[1] and "roofline_fraction" not in rows[3]


def test_paired_rounds_alternate_who_goes_first() -> None:
    calls: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self) -> dict[str, str]:
            calls.append(self.name)
            return {"who": self.name}

    ours, theirs = bench_engine.paired_rounds(Fake("k2serve"), Fake("hf"), 4)
    assert calls == ["k2serve", "hf", "hf", "k2serve", "k2serve", "hf", "hf", "k2serve"]
    assert [r["who"] for r in ours] == ["k2serve"] * 4 and [r["who"] for r in theirs] == ["hf"] * 4
    calls.clear()
    ours, theirs = bench_engine.paired_rounds(Fake("k2serve"), None, 2)  # INT4: no baseline
    assert calls == ["k2serve", "k2serve"] and theirs == []


def test_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_engine.main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
