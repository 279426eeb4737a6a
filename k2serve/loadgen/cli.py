"""`k2serve bench serve` arguments -> BenchConfig -> run -> printed report. Parsing stops here."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence

from k2serve.loadgen.config import (
    BACKENDS,
    COMPLETIONS,
    DATASETS,
    DEFAULT_URLS,
    ENDPOINTS,
    HISTORY_MODES,
    BenchConfig,
    BenchConfigError,
)

PROG = "k2serve bench serve"
# vLLM's `bench serve` backend names: both are the http backend, openai-chat on /v1/chat/completions.
BACKEND_ALIASES = {"openai": ("http", COMPLETIONS), "openai-chat": ("http", "/v1/chat/completions")}


def _range(text: str) -> tuple[int, int]:
    """ "N" or "LO:HI" (inclusive) -> (LO, HI)."""
    lo, sep, hi = text.partition(":")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI (integers), got {text!r}") from e


def _rate(text: str) -> float:
    try:
        return float(text)  # accepts "inf"
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of requests/s or inf, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Load generator for the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "Anthropic /v1/messages, /v1/responses; streamed) or the gRPC K2Serve.Generate API: Poisson / "
        "fixed-concurrency load, random, Mooncake-trace or text prompts, or tool-loop agent conversations.",
    )
    a = p.add_argument
    a(
        "--backend",
        choices=(*BACKENDS, *BACKEND_ALIASES),
        default="http",
        help="openai / openai-chat (vLLM's names) are http on /v1/completions / /v1/chat/completions",
    )
    a(
        "--endpoint",
        choices=ENDPOINTS,
        default=None,
        help=f"http: the API driven (default {COMPLETIONS}; openai-chat: /v1/chat/completions); the chat "
        "endpoints send text: random words (--input-len of them) or a sharegpt/custom dataset",
    )
    a(
        "--agent-turns",
        type=int,
        default=None,
        help="tool-loop mode: each of --num-prompts conversations runs T turns, each forcing a call of a "
        "declared tool and answered with a tool result and a new user turn (chat endpoints, random dataset)",
    )
    a(
        "--agent-history",
        dest="history",
        choices=tuple(HISTORY_MODES),
        default="resend",
        help="tool-loop mode: resend the whole history each turn (default), or a k2serve session "
        "(/v1/chat/completions), or previous_response_id (/v1/responses)",
    )
    a("--tool-result-len", type=int, default=64, help="tool-loop mode: words in each synthetic tool result")
    a(
        "--url",
        default=None,
        help=f"the only address contacted (default {DEFAULT_URLS['http']}; grpc: {DEFAULT_URLS['grpc']})",
    )
    a("--model", default=None, help="model name to send (default: none, the server's model)")
    a("--api-key", default=None, help="bearer key (default: $K2SERVE_API_KEY, else none)")
    a(
        "--dataset",
        "--dataset-name",
        dest="dataset",
        choices=(*DATASETS, "mooncake-trace"),
        default=None,
        help="default: trace when --trace is given, else random (mooncake-trace is another name of trace)",
    )
    a("--dataset-path", default=None, help='sharegpt: ShareGPT JSON; custom: JSONL of {"prompt": ...}')
    a(
        "--tokenizer",
        default=None,
        help="sharegpt/custom: checkpoint directory whose tokenizer encodes the prompts",
    )
    a("--sharegpt-output-len", type=int, default=None, help="sharegpt: output tokens (default: the reply's)")
    a(
        "--custom-output-len",
        type=int,
        default=None,
        help="custom: output tokens (default: the line's output_tokens, else 256)",
    )
    a("--num-prompts", type=int, default=None, help="requests to send at most (trace: default all lines)")
    a("--duration", type=float, default=None, help="seconds after which no request is sent")
    a(
        "--request-rate",
        type=_rate,
        default=None,
        help="Poisson arrivals, requests/s, or inf (default: inf; trace: its timestamps)",
    )
    a("--max-concurrency", type=int, default=None, help="requests in flight at most")
    a("--warmup", type=float, default=0.0, help="seconds; requests ending before are not counted")
    a("--seed", type=int, default=0, help="seed of prompts and arrivals")
    a("--input-len", type=_range, default=(128, 128), help="random: prompt tokens, N or LO:HI")
    a("--output-len", type=_range, default=(32, 32), help="random: output tokens, N or LO:HI")
    a(
        "--vocab-size",
        type=int,
        default=1024,
        help="prompt token ids are drawn from [0, N): keep N within the ordinary (non-special) tokens",
    )
    a(
        "--trace",
        default=None,
        help="Mooncake trace (JSONL: timestamp ms, input_length, output_length, hash_ids)",
    )
    a("--time-scale", type=float, default=1.0, help="trace arrivals at timestamp * X (0.1 = 10x faster)")
    a(
        "--length-scale",
        "--trace-scale",
        dest="length_scale",
        type=float,
        default=1.0,
        help="trace input/output lengths and block size times X (1/32 turns Mooncake's 512-token hash "
        "blocks into 16-token blocks: give the server --block-size 16 so shared hash ids hit its cache)",
    )
    a("--block-size", type=int, default=512, help="tokens per trace hash block (Mooncake: 512)")
    a("--temperature", type=float, default=0.0)
    a("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    a("--slo-ttft", type=float, default=None, help="goodput SLO on time to first token, ms")
    a("--slo-tpot", type=float, default=None, help="goodput SLO on time per output token, ms")
    a("--result-json", default=None, help="write the result here")
    a("--plot-dir", default=None, help="write latency_cdf.png and timeline.png here")
    a(
        "--progress-interval",
        type=float,
        default=None,
        help="seconds between progress updates on stderr (default 0.5 on a terminal, else 10)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    dataset = args.dataset or ("trace" if args.trace is not None else "random")
    dataset = "trace" if dataset == "mooncake-trace" else dataset
    backend, endpoint = BACKEND_ALIASES.get(args.backend, (args.backend, COMPLETIONS))
    return BenchConfig(
        backend=backend,
        endpoint=args.endpoint or endpoint,
        agent_turns=args.agent_turns,
        history=args.history,
        tool_result_len=args.tool_result_len,
        url=args.url or DEFAULT_URLS[backend],
        model=args.model,
        api_key=args.api_key if args.api_key is not None else os.environ.get("K2SERVE_API_KEY") or None,
        dataset=dataset,
        num_prompts=args.num_prompts,
        duration_s=args.duration,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        warmup_s=args.warmup,
        seed=args.seed,
        input_len=args.input_len,
        output_len=args.output_len,
        vocab_size=args.vocab_size,
        trace=args.trace,
        dataset_path=args.dataset_path,
        tokenizer=args.tokenizer,
        sharegpt_output_len=args.sharegpt_output_len,
        custom_output_len=args.custom_output_len,
        time_scale=args.time_scale,
        length_scale=args.length_scale,
        block_size=args.block_size,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        slo_ttft_ms=args.slo_ttft,
        slo_tpot_ms=args.slo_tpot,
        result_json=args.result_json,
        plot_dir=args.plot_dir,
        progress_interval_s=args.progress_interval,
    )


def reproduce_command(config: BenchConfig) -> str:
    """A command line that runs `config` again; the API key appears as "$K2SERVE_API_KEY", never itself."""

    def num(x: float) -> str:
        return "inf" if math.isinf(x) else repr(x)

    parts = [
        "--backend",
        config.backend,
        "--url",
        config.url,
        "--dataset",
        config.dataset,
        "--seed",
        str(config.seed),
    ]
    optional = {
        "--model": config.model,
        "--trace": config.trace,
        "--dataset-path": config.dataset_path,
        "--tokenizer": config.tokenizer,
        "--sharegpt-output-len": config.sharegpt_output_len,
        "--custom-output-len": config.custom_output_len,
        "--num-prompts": config.num_prompts,
        "--duration": config.duration_s,
        "--request-rate": None if config.request_rate is None else num(config.request_rate),
        "--max-concurrency": config.max_concurrency,
        "--slo-ttft": config.slo_ttft_ms,
        "--slo-tpot": config.slo_tpot_ms,
        "--result-json": config.result_json,
        "--plot-dir": config.plot_dir,
    }
    for flag, value in optional.items():
        if value is not None:
            parts += [flag, str(value)]
    if config.endpoint != COMPLETIONS:
        parts += ["--endpoint", config.endpoint]
    if config.agent_turns is not None:
        parts += ["--agent-turns", str(config.agent_turns), "--agent-history", config.history]
        parts += ["--tool-result-len", str(config.tool_result_len)]
    if config.warmup_s:
        parts += ["--warmup", repr(config.warmup_s)]
    if config.dataset == "random":
        parts += [
            "--input-len",
            f"{config.input_len[0]}:{config.input_len[1]}",
            "--output-len",
            f"{config.output_len[0]}:{config.output_len[1]}",
        ]
    elif config.dataset == "trace":
        parts += [
            "--time-scale",
            repr(config.time_scale),
            "--length-scale",
            repr(config.length_scale),
            "--block-size",
            str(config.block_size),
        ]
    parts += [
        "--vocab-size",
        str(config.vocab_size),
        "--temperature",
        repr(config.temperature),
        "--request-timeout",
        repr(config.request_timeout_s),
    ]
    line = PROG + " " + shlex.join(parts)
    if config.api_key is not None:
        line += ' --api-key "$K2SERVE_API_KEY"'
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print progress on stderr and the report on stdout. Exit status: 0 when at least
    one request completed, 1 when none did, 2 for bad arguments or an invalid trace or dataset."""
    from k2serve.chat.tokenizer import TokenizerError
    from k2serve.loadgen.benchmark import EmptyTraceError, run_benchmark
    from k2serve.loadgen.report import format_report
    from k2serve.loadgen.text_datasets import DatasetFormatError
    from k2serve.loadgen.trace import TraceFormatError

    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        config = config_from_args(args)
    except BenchConfigError as e:
        parser.error(str(e))  # exits with status 2
    command = reproduce_command(config)
    print(f"{PROG}: {command}", file=sys.stderr)
    try:
        result = run_benchmark(config, command)
    except (TraceFormatError, DatasetFormatError, TokenizerError, EmptyTraceError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0 if result["counts"]["completed"] else 1
