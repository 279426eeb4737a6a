"""`k2serve plan`: the table for Kimi-K2-Thinking, the JSON form, refusals naming the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from k2serve.cli.parser import build_parser


def plan(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = build_parser().parse_args(["plan", *argv])
    rc = args.handler(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_table_for_k2_thinking_on_h200(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = plan("--model", "kimi-k2-thinking", "--device", "h200", "--ep", "16", capsys=capsys)
    assert rc == 0 and err == ""
    lines = dict(line.split("  ", 1) for line in out.splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["KV per token"] == "70,272 B"
    assert lines["KV per 262,144-token session"] == "17.16 GiB"
    assert lines["weights: routed experts"] == "33.22 GiB"  # 24 experts x 60 layers, INT4 + scales
    assert lines["sessions per rank"] == "3" and lines["sessions per group of 16"] == "48"


def test_json_and_refusal_on_h100(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = plan(
        "--model", "kimi-k2-thinking", "--device", "h100", "--ep", "16", "--json", capsys=capsys
    )
    assert rc == 2
    d = json.loads(out)
    assert (d["kv_bytes_per_token"], d["sessions_per_rank"], d["fits"]) == (70_272, 0, False)
    assert "does not fit on h100" in err and "262144-token sequence's KV 17.16 GiB" in err
    # an fp8 latent or a shorter max length fits the same layout
    rc, out, _ = plan(
        "--model", "kimi-k2-thinking", "--device", "h100", "--ep", "16", "--json", "--kv-cache-dtype", "fp8",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 0 and json.loads(out)["kv_bytes_per_token"] == 40_016  # 656-byte fp8 rows x 61 layers


def test_bad_layout_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = plan(
        "--model", "kimi-k2-thinking", "--device", "b200", "--ep", "16", "--attention-tp", "3", capsys=capsys
    )  # fmt: skip
    assert (rc, out) == (2, "") and "attention_tp=3 must divide ep=16" in err
    rc, _, err = plan("--model", "/nonexistent", "--device", "cpu", capsys=capsys)
    assert rc == 2 and "config.json" in err


def test_command_line_process() -> None:
    """The installed entry point runs it without loading torch."""
    code = (
        "import sys; from k2serve.cli import main; rc = main(['plan', '--model', 'kimi-k2-thinking', "
        "'--device', 'b200', '--ep', '8']); assert 'torch' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sessions per group of 8" in proc.stdout


def test_the_cli_offers_every_preset() -> None:
    """The parser spells the preset names out (so that `plan` loads no torch): they are the presets'."""
    from k2serve.cli.parser import PRESET_NAMES
    from k2serve.model.presets import PRESETS

    assert tuple(sorted(PRESETS)) == PRESET_NAMES
