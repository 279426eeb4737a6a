"""The dry-run: the queueing model's invariants on synthetic loads, and the CLI replaying a slice of
the real Mooncake conversation trace (skipped when /work/shared is absent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from k2serve.loadgen.trace import TraceEntry
from k2serve.planner import cli
from k2serve.planner.config import PlannerConfig, RoleLimits
from k2serve.planner.policy import Planner
from k2serve.planner.simulate import SimParams, Simulation

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONVERSATION = SHARED / "traces" / "conversation_trace.jsonl"

PARAMS = SimParams(
    prefill_tokens_per_s=10_000, decode_itl_base_s=0.01, decode_itl_per_seq_s=0.001, startup_s=5.0
)
CFG = PlannerConfig(
    ttft_slo_s=1.0, itl_slo_s=0.05, up_cooldown_s=10, down_cooldown_s=30, prefill=RoleLimits(1, 10, 4)
)


def steady(rate: float, seconds: float, input_len: int = 2000, output_len: int = 50) -> list[TraceEntry]:
    n = int(rate * seconds)
    return [TraceEntry(i * 1000 / rate, input_len, output_len, ()) for i in range(n)]


def test_light_load_keeps_the_minimum_and_serves_everything() -> None:
    entries = steady(rate=1.0, seconds=60)  # 2,000 tokens/s of prefill on a 10,000 tokens/s replica
    r = Simulation(entries, Planner(CFG), PARAMS).run()
    assert r.unfinished == 0 and r.rejected == 0 and len(r.ttft_s) == len(entries)
    assert [(row.prefill, row.decode) for row in r.timeline] == [(1, 1)]
    assert max(r.ttft_s) == pytest.approx(0.2, abs=0.11)  # 2,000 tokens at 10,000/s, one step of slack


def test_overload_scales_prefill_up_then_back_down_when_it_ends() -> None:
    burst = steady(rate=20.0, seconds=60)  # 40,000 tokens/s: four replicas' worth
    quiet = [
        TraceEntry(60_000 + e.timestamp_ms, e.input_length, e.output_length, ()) for e in steady(0.2, 300)
    ]
    r = Simulation(burst + quiet, Planner(CFG), PARAMS).run()
    assert r.unfinished == 0
    prefill = [row.prefill for row in r.timeline]
    assert max(prefill) >= 4
    assert prefill[-1] < max(prefill)  # scaled down in the quiet part
    lim = CFG.prefill
    assert all(lim.min_replicas <= n <= lim.max_replicas for n in prefill)
    # Changes of one role respect its cooldowns.
    times = [row.time_s for row in r.timeline[1:] if row.reason.startswith("prefill")]
    assert all(b - a >= CFG.up_cooldown_s for a, b in zip(times, times[1:], strict=False))


def test_request_larger_than_a_decode_replica_is_rejected_not_stuck() -> None:
    entries = [TraceEntry(0.0, 100, 10, ()), TraceEntry(10.0, 5000, 10, ())]
    params = SimParams(decode_kv_tokens=1000, prefill_tokens_per_s=10_000)
    r = Simulation(entries, Planner(CFG), params).run()
    assert (r.requests, r.rejected, r.unfinished) == (2, 1, 0)


def test_time_scale_stretches_arrivals() -> None:
    entries = steady(rate=1.0, seconds=10)
    fast = Simulation(entries, Planner(CFG), PARAMS, time_scale=0.5).run()
    slow = Simulation(entries, Planner(CFG), PARAMS, time_scale=2.0).run()
    assert slow.end_s > fast.end_s + 10


def _parse_timeline(out: str) -> list[tuple[float, int, int, str]]:
    rows = []
    for line in out.splitlines():
        m = re.fullmatch(r"\s*([\d.]+) s  prefill\s+(\d+)  decode\s+(\d+)  (.*)", line)
        if m:
            rows.append((float(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)))
    return rows


@pytest.mark.skipif(not CONVERSATION.exists(), reason=f"the Mooncake traces are not at {CONVERSATION.parent}")
def test_cli_dry_run_on_a_slice_of_the_conversation_trace(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--dry-run",
        "--trace",
        str(CONVERSATION),
        "--limit",
        "600",
        "--max-prefill",
        "64",
        "--ttft-slo",
        "60",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = _parse_timeline(out)
    assert rows[0] == (0.0, 1, 1, "start") and rows[-1][3] == "end"
    assert len(rows) >= 4  # it scaled
    assert max(r[1] for r in rows) > 8  # ~41k prompt tokens/s needs tens of 900 tokens/s replicas
    assert all(1 <= r[1] <= 64 and 1 <= r[2] <= 8 for r in rows)
    assert all(re.match(r"(prefill|decode): (up|down) \d+->\d+: ", r[3]) for r in rows[1:-1])
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("# 600 requests") and "0 unfinished" in summary


def test_cli_errors_exit_2_with_the_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["--dry-run"]) == 2
    assert "--dry-run and --trace FILE go together" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--trace", "x", "--kv-low", "0.9"]) == 2
    assert "kv_low" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--trace", "x", "--step", "0"]) == 2
    assert "step_s" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10}\n')
    assert cli.main(["--dry-run", "--trace", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors
        cli.main(["--dry-run", "--trace", "x", "--limit", "many"])
    assert e.value.code == 2


def test_subcommand_integration_through_add_arguments_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """How `k2serve planner` is wired: a subparser gets `add_arguments`, its namespace goes to `run`."""
    import argparse

    top = argparse.ArgumentParser(prog="k2serve")
    sub = top.add_subparsers(dest="command", required=True)
    cli.add_arguments(sub.add_parser("planner"))
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            f'{{"timestamp": {i * 100}, "input_length": 600, "output_length": 5, "hash_ids": [{i}, {i + 1000}]}}\n'
            for i in range(20)
        )
    )
    args = top.parse_args(["planner", "--dry-run", "--trace", str(trace), "--time-scale", "2"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "20 requests, time scale 2" in out and "# 20 requests over" in out


@pytest.mark.slow
def test_measure_fits_the_model_on_the_tiny_checkpoint(tiny_ckpt: Path) -> None:
    from k2serve.planner.measure import fit_line, measure

    assert fit_line([1, 2, 3], [3.0, 5.0, 7.0]) == pytest.approx((1.0, 2.0))
    assert fit_line([1, 2], [5.0, 4.0]) == pytest.approx((4.5, 0.0))  # slope clamped at 0
    m = measure(tiny_ckpt, prompt_len=64, batches=(1, 4), decode_len=4, kv_cache_mb=64, repeats=1)
    assert m.prefill_tokens_per_s > 0 and m.decode_itl_base_s > 0 and m.decode_itl_per_seq_s >= 0
    assert m.decode_kv_tokens == (64 << 20) // (3 * 80 * 4)  # tiny: 3 layers x (64 + 16) fp32 values
    assert "--prefill-tokens-per-s" in m.flags()
