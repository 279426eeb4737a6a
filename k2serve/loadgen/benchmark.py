"""One benchmark run end to end: requests from the dataset, the client, the run loop, statistics, files."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from k2serve.loadgen.client import Client
from k2serve.loadgen.config import CHAT_ENDPOINTS, BenchConfig
from k2serve.loadgen.dataset import BenchRequest, random_requests, random_text_requests
from k2serve.loadgen.progress import Progress
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.runner import RunResult, run_load
from k2serve.loadgen.stats import SLO, summarize, turn_summary
from k2serve.loadgen.trace import TraceScaling, best_hit_ratio, read_trace, trace_requests

SCHEMA_VERSION = 1


class EmptyTraceError(ValueError):
    """The trace or dataset file holds no (usable) entries; `path` is it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} holds no usable entries")
        self.path = path


def build_requests(config: BenchConfig) -> tuple[Iterable[BenchRequest], int | None, dict[str, Any] | None]:
    """(requests, count bound, trace facts). Trace runs are bounded by the trace's length."""
    if config.dataset == "random" and config.endpoint in CHAT_ENDPOINTS:
        return (
            random_text_requests(config.seed, config.input_len, config.output_len),
            config.num_prompts,
            None,
        )
    if config.dataset == "random":
        reqs = random_requests(config.seed, config.input_len, config.output_len, config.vocab_size)
        return reqs, config.num_prompts, None
    if config.dataset in ("sharegpt", "custom"):
        return _text_requests(config)
    assert config.trace is not None
    entries = read_trace(config.trace, config.block_size, config.num_prompts)
    if not entries:
        raise EmptyTraceError(config.trace)
    scaling = TraceScaling(config.time_scale, config.length_scale, config.block_size, config.vocab_size)
    info = {
        "path": str(config.trace),
        "entries": len(entries),
        "span_s": (entries[-1].timestamp_ms - entries[0].timestamp_ms) / 1000.0,
        "replayed_span_s": (entries[-1].timestamp_ms - entries[0].timestamp_ms) / 1000.0 * config.time_scale,
        "best_hit_ratio_unscaled": round(best_hit_ratio(entries, config.block_size), 4),
        "scaled_block_size": scaling.scaled_block_size,
    }
    return trace_requests(entries, scaling, config.seed), len(entries), info


def _text_requests(config: BenchConfig) -> tuple[list[BenchRequest], int, None]:
    """ShareGPT / custom requests, tokenized with the checkpoint's tokenizer."""
    from k2serve.chat.tokenizer import load_tokenizer
    from k2serve.loadgen.text_datasets import custom_requests, sharegpt_requests

    assert config.dataset_path is not None and config.tokenizer is not None
    tok = load_tokenizer(config.tokenizer)

    def encode(text: str) -> list[int]:
        return tok.encode(text, allow_special=False)

    if config.dataset == "sharegpt":
        reqs = sharegpt_requests(
            config.dataset_path, encode, config.seed, config.num_prompts, config.sharegpt_output_len
        )
    else:
        reqs = custom_requests(
            config.dataset_path, encode, config.seed, config.num_prompts, config.custom_output_len
        )
    if not reqs:
        raise EmptyTraceError(config.dataset_path)
    return reqs, len(reqs), None


def make_client(config: BenchConfig) -> Client:
    if config.backend == "grpc":
        from k2serve.loadgen.grpc_client import GRPCClient

        return GRPCClient(
            config.url, config.model, config.api_key, config.request_timeout_s, config.temperature
        )
    if config.endpoint in CHAT_ENDPOINTS:
        from k2serve.loadgen.chat_client import ChatClient

        return ChatClient(
            config.url,
            config.endpoint,
            config.model,
            config.api_key,
            config.request_timeout_s,
            config.temperature,
            max_connections=config.max_concurrency,
            agent_turns=config.agent_turns,
            history=config.history,
            tool_result_len=config.tool_result_len,
            input_len=config.input_len,
            seed=config.seed,
        )
    from k2serve.loadgen.http_client import HTTPClient

    return HTTPClient(
        config.url,
        config.model,
        config.api_key,
        config.request_timeout_s,
        config.temperature,
        max_connections=config.max_concurrency,
    )


async def _run(
    config: BenchConfig, progress_stream: TextIO | None
) -> tuple[RunResult, dict[str, Any] | None]:
    requests, bound, trace_info = build_requests(config)
    client = make_client(config)
    progress = Progress(bound, config.duration_s, progress_stream, config.progress_interval_s)
    try:
        result = await run_load(
            requests,
            client,
            rate=config.arrival_rate,
            num_prompts=bound,
            duration_s=config.duration_s,
            max_concurrency=config.max_concurrency,
            seed=config.seed,
            progress=progress,
        )
    finally:
        await client.aclose()
    return result, trace_info


def _plot_writer() -> Callable[[Sequence[RequestRecord], float, str | Path], list[Path]]:
    """The plot writer; raises MissingExtraError naming the `plot` extra when matplotlib is absent."""
    from k2serve.loadgen.plots import write_plots  # matplotlib is optional: imported only when asked

    return write_plots


def run_benchmark(config: BenchConfig, command: str, progress_stream: TextIO | None = None) -> dict[str, Any]:
    """Run, summarise, and write the result JSON and plots the config asks for; returns the result
    (the JSON's content). `command` is the command line that reproduces the run."""
    write_plots = _plot_writer() if config.plot_dir is not None else None  # fails before the run
    started = time.time()
    result, trace_info = asyncio.run(_run(config, progress_stream))
    records = sorted(result.records, key=lambda r: (r.index, r.turn or 0))
    summary = summarize(
        records, config.warmup_s, SLO(config.slo_ttft_ms, config.slo_tpot_ms), trace_info is not None
    )
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "config": config.to_json(),
        "started_unix_s": round(started, 3),
        "wall_s": round(result.wall_s, 4),
        "stopped_by": result.stopped_by,
        "trace": trace_info,
        **summary,
        "turns": turn_summary(records) if config.agent_turns is not None else None,
        "plots": [],
    }
    if write_plots is not None and config.plot_dir is not None:
        out["plots"] = [str(p) for p in write_plots(records, config.warmup_s, config.plot_dir)]
    out["requests"] = [r.to_json() for r in records]
    if config.result_json is not None:
        path = Path(config.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
    return out
