"""Tool-loop agents on `k2serve serve --preset tiny`: how the history travels (resend / session /
previous_response_id), measured with `k2serve bench serve --agent-turns`, paired alternating rounds.

Usage: python benchmarks/agent_history_modes.py URL OUT_DIR [ROUNDS]   (a `k2serve serve` at URL)
Prints one table: per mode, medians over rounds (min-max) of the last turn's TTFT p50, the turns-2+ TTFT
p50, the last turn's prompt / cached tokens and request body bytes.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from k2serve.loadgen.benchmark import run_benchmark
from k2serve.loadgen.cli import reproduce_command
from k2serve.loadgen.config import BenchConfig

MODES = [
    ("/v1/chat/completions", "resend"),
    ("/v1/chat/completions", "session"),
    ("/v1/responses", "resend"),
    ("/v1/responses", "previous_response_id"),
]


def run(url: str, out: Path, endpoint: str, history: str, seed: int) -> dict:
    path = out / f"{endpoint.strip('/').replace('/', '_')}-{history}-{seed}.json"
    config = BenchConfig(
        url=url, endpoint=endpoint, agent_turns=8, history=history, num_prompts=4, max_concurrency=4,
        input_len=(16, 16), output_len=(32, 32), tool_result_len=32, seed=seed, result_json=str(path),
        progress_interval_s=600,
    )  # fmt: skip
    return run_benchmark(config, reproduce_command(config))


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def main() -> None:
    url, out = sys.argv[1], Path(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {m: [] for m in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]  # alternate the order round by round
        for endpoint, history in order:
            # a seed per round and mode: no run finds another's prompts in the server's prefix cache
            seed = 100 + 10 * r + MODES.index((endpoint, history))
            results[(endpoint, history)].append(run(url, out, endpoint, history, seed))
    print(
        "| endpoint | history | TTFT p50 last turn (ms) | TTFT p50 turns 2-8 (ms) | prompt tokens last turn "
        "| cached last turn | body bytes last turn | turns ok |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (endpoint, history), runs in results.items():
        last = [res["turns"][-1] for res in runs]
        later = [
            statistics.median([r["ttft_ms"] for r in res["requests"] if r["turn"] > 0 and r["ttft_ms"]])
            for res in runs
        ]
        ok = sum(res["counts"]["completed"] for res in runs)
        sent = sum(res["counts"]["sent"] for res in runs)
        print(
            f"| {endpoint} | {history} | {spread([t['ttft']['p50'] for t in last])} | {spread(later)} "
            f"| {spread([t['prompt_tokens_mean'] for t in last])} | {spread([t['cached_tokens_mean'] for t in last])} "
            f"| {spread([t['body_bytes_mean'] for t in last])} | {ok}/{sent} |"
        )


if __name__ == "__main__":
    main()
