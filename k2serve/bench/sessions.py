"""`k2serve bench sessions`: one agent session of N tool-call turns, session routing on vs off.

ON: `AgentLoop` on a session (each turn sends only its new messages; the router rebuilds the context
from Redis and sends the turn to the decode worker holding the session's KV, which computes only the
new tokens itself: no prefill worker, no KV transfer). OFF: the same turns, replayed from ON's
transcript as independent chat requests carrying the whole history and no session_id (prefill worker
-> KV transfer -> decode worker, every turn). Each mode has its own cluster (router, 1 prefill, 1
decode, Redis), so neither warms the other's caches; their turns alternate, so other load on the
machine falls on both alike.

Per turn and in total: prompt tokens computed (prompt_tokens - cached_tokens, as the server reports
them) and TTFT (streamed, with logprobs on so the server sends a chunk per token: the time to the first
token, even when the reply opens with a tool call), and the KV bytes each mode moved between workers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import httpx

from k2serve.agent import AgentLoop, HTTPTransport, StepRecord, ToolRegistry, Turn
from k2serve.agent.transport import SamplingOptions
from k2serve.bench import bench_model
from k2serve.model.presets import PRESETS

USER = "Add 2 and 3, then keep adding the results to new digits."
Digit = Annotated[int, {"minimum": 0, "maximum": 9}]


def _tools() -> ToolRegistry:
    tools = ToolRegistry()

    @tools.register
    def add(a: Digit, b: Digit) -> int:
        """Add two digits."""
        return a + b

    return tools


def _system_prompt(words: int) -> str:
    rules = [f"Rule {i}: call a tool, keep it short." for i in range(max(1, words // 8))]
    return "You are an agent that adds numbers. " + " ".join(rules)


def _counters(url: str) -> tuple[int, int]:
    view = httpx.get(f"{url}/cluster/workers", timeout=10).json()
    return int(view["kv_bytes_transferred"]), int(view["local_prefills"])


def _spec(model: Path, args: argparse.Namespace) -> Any:
    from k2serve.cluster.local import ClusterSpec

    return ClusterSpec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        num_prefill=1,
        num_decode=1,
        use_redis=True,
        dtype=args.dtype,
        engine_args=("--kv-cache-mb", str(args.kv_cache_mb), "--block-size", str(args.block_size)),
        workdir=tempfile.mkdtemp(prefix="k2serve-bench-sessions-"),
    )


def run(model: Path, args: argparse.Namespace) -> tuple[list[StepRecord], list[Turn], int, int, int]:
    """Both modes, turn by turn: ON's steps, OFF's turns, the KV bytes each moved between workers, and
    how many ON turns the holder computed itself. OFF turn t runs right after ON turn t (so other load
    on the machine falls on both alike) and sends ON's history up to reply t, whole."""
    from k2serve.cluster.local import LocalCluster

    tools = _tools()
    sampling = SamplingOptions(max_tokens=args.max_tokens, temperature=0, logprobs=True)
    with contextlib.ExitStack() as stack:
        on_cluster = stack.enter_context(LocalCluster(_spec(model, args)))
        off_cluster = stack.enter_context(LocalCluster(_spec(model, args)))
        on, off = HTTPTransport.connect(on_cluster.http_url), HTTPTransport.connect(off_cluster.http_url)
        off_turns: list[Turn] = []

        def replay(step: StepRecord) -> None:
            history = on.session_messages(str(loop.session_id))[:-1]  # up to ON's reply of this step
            off_turns.append(off.chat(None, history, tools.openai_tools(), "required", sampling, None))

        loop = AgentLoop(
            on,
            tools,
            max_steps=args.turns,
            tool_choice="required",
            system_prompt=_system_prompt(args.system_words),
            on_step=replay,
            max_tokens=args.max_tokens,
            temperature=0,
            logprobs=True,
        )
        result = loop.run(USER)
        moved_on, local = _counters(on_cluster.http_url)
        moved_off, _ = _counters(off_cluster.http_url)
    return list(result.steps), off_turns, moved_on, moved_off, local


def _ratio(off: float, on: float) -> str:
    return f"{off / on:6.2f}x" if on else "     -"


def report(on: list[StepRecord], off: list[Turn], moved_on: int, moved_off: int, local: int) -> list[str]:
    """The per-turn table and the totals, as printed (and pasted into BENCHMARKS.md)."""
    lines = [
        "turn  prompt | computed ON   OFF  OFF/ON | TTFT ms ON     OFF  OFF/ON",
    ]
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        mark = "" if a.prompt_tokens == b.prompt_tokens else f"  (prompt differs: OFF {b.prompt_tokens})"
        lines.append(
            f"{i + 1:4d} {a.prompt_tokens:7d} | {a.computed_tokens:11d} {b.prompt_tokens - b.cached_tokens:5d} "
            f"{_ratio(b.prompt_tokens - b.cached_tokens, a.computed_tokens)} | {a.ttft_s * 1e3:10.1f} "
            f"{b.ttft_s * 1e3:7.1f} {_ratio(b.ttft_s, a.ttft_s)}{mark}"
        )
    c_on = sum(a.computed_tokens for a in on)
    c_off = sum(b.prompt_tokens - b.cached_tokens for b in off)
    later_on = [a.ttft_s for a in on[1:]] or [on[0].ttft_s]
    later_off = [b.ttft_s for b in off[1:]] or [off[0].ttft_s]
    m_on, m_off = statistics.median(later_on), statistics.median(later_off)
    s_on, s_off = sum(a.ttft_s for a in on), sum(b.ttft_s for b in off)
    lines += [
        f"total prompt tokens computed: ON {c_on}, OFF {c_off} -> OFF/ON {c_off / max(1, c_on):.2f}x "
        f"(of {sum(a.prompt_tokens for a in on)} prompt tokens sent)",
        f"TTFT median over turns 2..{len(on)}: ON {m_on * 1e3:.1f} ms, OFF {m_off * 1e3:.1f} ms -> "
        f"OFF/ON {m_off / m_on:.2f}x; sum over all turns: ON {s_on:.2f} s, OFF {s_off:.2f} s",
        f"KV moved prefill -> decode: ON {moved_on / 1e6:.2f} MB, OFF {moved_off / 1e6:.2f} MB; "
        f"ON turns computed on the holder itself: {local} of {len(on)}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench sessions", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the preset)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-words", type=int, default=400, help="length of the system prompt")
    ap.add_argument("--kv-cache-mb", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args(argv)
    if args.turns < 2:
        ap.error(f"--turns must be >= 2, got {args.turns}")
    model = bench_model(args.model, args.preset, args.dtype)
    print(f"{model.name}: {args.turns} tool-call turns, session routing ON and OFF alternating", flush=True)
    on, off, moved_on, moved_off, local = run(model, args)
    print("\n".join(report(on, off, moved_on, moved_off, local)))
    print("reproduce: k2serve bench sessions " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
