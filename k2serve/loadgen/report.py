"""The printed report of a run's result (the dict `run_benchmark` returns)."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """A fixed-width text report: counts, throughput, latency percentiles, goodput, prefix cache, errors."""
    c, t, lat, pc = result["counts"], result["throughput"], result["latency_ms"], result["prefix_cache"]
    cfg = result["config"]
    lines = [
        "=" * 21 + " k2serve bench serve " + "=" * 21,
        f"target             {cfg['backend']} {cfg['url']}{cfg.get('endpoint', '') if cfg['backend'] == 'http' else ''}   dataset {cfg['dataset']}"
        + (
            f"   tool loop: {cfg['agent_turns']} turns, history {cfg['history']}"
            if cfg.get("agent_turns")
            else ""
        ),
        f"requests           sent {c['sent']}  completed {c['completed']}  failed {c['failed']}  "
        f"rejected {c['rejected']}  excluded (warm-up) {c['excluded_warmup']}",
        f"stopped by         {result['stopped_by']}   wall {result['wall_s']:.2f} s   "
        f"measured window {result['window_s']:.2f} s",
        f"throughput         {_f(t['requests_per_s'], '.3f')} req/s   input {_f(t['input_tokens_per_s'], '.1f')} "
        f"tok/s   output {_f(t['output_tokens_per_s'], '.1f')} tok/s",
        f"{'latency (ms)':<18} {'n':>7} {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10} {'max':>10}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = lat[name]
        lines.append(
            f"  {name.upper():<16} {s['n']:>7} "
            + " ".join(f"{_f(s[k]):>10}" for k in ("mean", "p50", "p90", "p99", "max"))
        )
    if c["output_chunks"] and c["output_chunks"] < c["output_tokens"]:
        lines.append(
            f"  (ITL is per streamed chunk: {c['output_tokens']} tokens came in {c['output_chunks']} chunks)"
        )
    g = result["goodput"]
    if g is not None:
        limits = [
            f"{n} <= {g[k]:g} ms" for n, k in (("TTFT", "slo_ttft_ms"), ("TPOT", "slo_tpot_ms")) if g[k]
        ]
        lines.append(
            f"goodput            {_f(g['requests_per_s'], '.3f')} req/s  ({_pct(g['fraction'])} of requests "
            f"meet {' and '.join(limits)})"
        )
    lines.append(
        f"prefix cache       measured hit {_pct(pc['measured_hit_ratio'])} "
        f"({pc['cached_tokens']}/{pc['prompt_tokens']} prompt tokens)   best possible "
        f"{_pct(pc['best_hit_ratio'])}"
    )
    if (pc["best_hit_ratio"] or 0) < (pc["measured_hit_ratio"] or 0):
        lines.append(
            "  (measured above best: the server's cache held these prompts before the run, e.g. an "
            "earlier run with the same --seed)"
        )
    if result.get("trace"):
        tr = result["trace"]
        lines.append(
            f"trace              {tr['entries']} entries over {tr['span_s']:.1f} s, replayed over "
            f"{tr['replayed_span_s']:.1f} s; blocks of {tr['scaled_block_size']} tokens; best hit "
            f"(unscaled) {_pct(tr['best_hit_ratio_unscaled'])}"
        )
    if result.get("turns"):
        lines.append(
            f"{'per turn':<10} {'done':>9} {'TTFT p50':>10} {'mean':>10} {'prompt':>8} {'cached':>8} "
            f"{'hit':>7} {'body B':>9} {'tools':>6}"
        )
        for t in result["turns"]:
            lines.append(
                f"  turn {t['turn']:<3} {t['completed']:>4}/{t['sent']:<4} {_f(t['ttft']['p50']):>10} "
                f"{_f(t['ttft']['mean']):>10} {_f(t['prompt_tokens_mean'], '.1f'):>8} "
                f"{_f(t['cached_tokens_mean'], '.1f'):>8} {_pct(t['hit_ratio']):>7} "
                f"{_f(t['body_bytes_mean'], '.0f'):>9} {t['tool_calls']:>6}"
            )
    if c["output_len_mismatch"] and not result.get("turns"):
        lines.append(
            f"output length      {c['output_len_mismatch']} completed requests differ from the requested length"
        )
    if result["errors"] or result["rejections"]:
        lines.append(
            f"errors             {result['errors'] or '-'}   rejections {result['rejections'] or '-'}"
        )
    for p in result["plots"]:
        lines.append(f"plot               {p}")
    lines.append(f"reproduce          {result['command']}")
    return "\n".join(lines)
