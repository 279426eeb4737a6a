"""BenchConfig: everything one `k2serve bench serve` run needs, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

BACKENDS = ("http", "grpc")
DATASETS = ("random", "trace", "sharegpt", "custom")
TEXT_DATASETS = ("sharegpt", "custom")
DEFAULT_URLS = {"http": "http://127.0.0.1:8000", "grpc": "grpc://127.0.0.1:50051"}
COMPLETIONS = "/v1/completions"
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/messages", "/v1/responses")
ENDPOINTS = (COMPLETIONS, *CHAT_ENDPOINTS)
# How a tool-loop conversation's history reaches the server, and the one endpoint each needs (None: any).
HISTORY_MODES: dict[str, str | None] = {
    "resend": None,
    "session": "/v1/chat/completions",
    "previous_response_id": "/v1/responses",
}


class BenchConfigError(ValueError):
    """An invalid setting; `name` is the field and `value` the offending value."""

    def __init__(self, name: str, value: Any, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}")
        self.name = name
        self.value = value


class GRPCTargetError(ValueError):
    """A --url that is not `grpc://host:port`, `grpcs://host:port` or `host:port`; `url` is it."""

    def __init__(self, url: str) -> None:
        super().__init__(f"gRPC target must be grpc://host:port, grpcs://host:port or host:port, got {url!r}")
        self.url = url


def grpc_target(url: str) -> tuple[str, bool]:
    """(host:port, TLS) of a gRPC URL."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    try:
        port = parts.port
    except ValueError as e:  # not a number, or out of range
        raise GRPCTargetError(url) from e
    if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or port is None:
        raise GRPCTargetError(url)
    if parts.path not in ("", "/") or parts.query:
        raise GRPCTargetError(url)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", parts.scheme == "grpcs"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Load: arrivals are Poisson at `request_rate` requests/s (inf: all at once), or the trace's
    timestamps when `request_rate` is None on a trace; `max_concurrency` caps requests in flight
    (with rate inf it is a closed loop of that many clients). Requests stop being sent after
    `num_prompts` or `duration_s` seconds, whichever comes first; those in flight then finish (each
    within `request_timeout_s`). Requests that end before `warmup_s` are left out of the statistics.
    Random dataset: lengths (tokens) uniform in the inclusive ranges `input_len`, `output_len`.
    Trace dataset: see k2serve.loadgen.trace.TraceScaling for the scales and `block_size`.
    ShareGPT / custom datasets (vLLM's formats): `dataset_path`, prompts tokenized with the checkpoint's
    tokenizer in `tokenizer`; see k2serve.loadgen.text_datasets for the output lengths.
    Token ids are drawn from [0, vocab_size). SLOs in ms. `api_key` is never written out.
    Endpoint (http backend): `/v1/completions` sends token ids; the chat endpoints (CHAT_ENDPOINTS)
    send text, so they take the random dataset (as random words, `input_len` of them) or a text dataset.
    Tool-loop mode: `agent_turns` turns per conversation, `num_prompts` conversations, the history
    carried as `history` says (HISTORY_MODES), tool results of `tool_result_len` words; see
    k2serve.loadgen.chat_client.
    """

    backend: str = "http"
    url: str = DEFAULT_URLS["http"]
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    dataset: str = "random"
    num_prompts: int | None = None
    duration_s: float | None = None
    request_rate: float | None = None
    max_concurrency: int | None = None
    warmup_s: float = 0.0
    seed: int = 0
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (32, 32)
    vocab_size: int = 1024
    trace: str | None = None
    dataset_path: str | None = None
    tokenizer: str | None = None
    sharegpt_output_len: int | None = None
    custom_output_len: int | None = None
    time_scale: float = 1.0
    length_scale: float = 1.0
    block_size: int = 512
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    result_json: str | None = None
    plot_dir: str | None = None
    progress_interval_s: float | None = None
    endpoint: str = COMPLETIONS
    agent_turns: int | None = None
    history: str = "resend"
    tool_result_len: int = 64

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> BenchConfigError:
            return BenchConfigError(name, getattr(self, name), reason)

        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {', '.join(BACKENDS)}")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"must be one of {', '.join(DATASETS)}")
        if self.backend == "http" and (
            urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).hostname
        ):
            raise bad("url", "must be an http:// or https:// URL for the http backend")
        if self.backend == "grpc":
            try:
                grpc_target(self.url)
            except GRPCTargetError as e:
                raise bad("url", str(e)) from e
        if (self.dataset == "trace") != (self.trace is not None):
            raise bad("trace", "a trace file is needed for, and only for, the trace dataset")
        if (self.dataset in TEXT_DATASETS) != (self.dataset_path is not None):
            raise bad(
                "dataset_path", "a dataset file is needed for, and only for, the sharegpt and custom datasets"
            )
        if self.dataset in TEXT_DATASETS and self.tokenizer is None:
            raise bad(
                "tokenizer", f"the {self.dataset} dataset needs the served model's checkpoint directory"
            )
        for name in ("num_prompts", "max_concurrency", "sharegpt_output_len", "custom_output_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in (
            "duration_s",
            "request_rate",
            "request_timeout_s",
            "slo_ttft_ms",
            "slo_tpot_ms",
            "progress_interval_s",
            "time_scale",
            "length_scale",
        ):
            v = getattr(self, name)
            if v is not None and not v > 0:  # also refuses NaN
                raise bad(name, "must be > 0")
        for name in ("duration_s", "request_timeout_s", "time_scale", "length_scale", "warmup_s"):
            if getattr(self, name) is not None and math.isinf(getattr(self, name)):
                raise bad(name, "must be finite")
        if not self.warmup_s >= 0:
            raise bad("warmup_s", "must be >= 0")
        if self.duration_s is not None and self.warmup_s >= self.duration_s:
            raise bad("warmup_s", f"must be shorter than the duration ({self.duration_s} s)")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise bad(name, "must be a range 1 <= low <= high")
        for name in ("vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        self._check_endpoint(bad)
        if self.dataset == "random" and self.num_prompts is None and self.duration_s is None:
            raise bad("num_prompts", "the random dataset is endless: give num_prompts and/or duration_s")
        if (
            self.dataset == "random"
            and self.arrival_rate == math.inf
            and self.max_concurrency is None
            and self.num_prompts is None
        ):
            raise bad("num_prompts", "an infinite rate without max_concurrency needs num_prompts")

    def _check_endpoint(self, bad: Callable[[str, str], BenchConfigError]) -> None:
        """The endpoint and tool-loop settings, and how they combine with the backend and dataset."""
        if self.endpoint not in ENDPOINTS:
            raise bad("endpoint", f"must be one of {', '.join(ENDPOINTS)}")
        if self.backend == "grpc" and self.endpoint != COMPLETIONS:
            raise bad("endpoint", "is for the http backend (the grpc backend calls K2Serve.Generate)")
        if self.endpoint in CHAT_ENDPOINTS and self.dataset == "trace":
            raise bad("endpoint", "the chat endpoints send text: use the random, sharegpt or custom dataset")
        if self.history not in HISTORY_MODES:
            raise bad("history", f"must be one of {', '.join(HISTORY_MODES)}")
        if self.agent_turns is None:
            if self.history != "resend":
                raise bad("history", "carries a tool-loop conversation: give agent_turns too")
            return
        if self.agent_turns < 1:
            raise bad("agent_turns", "must be >= 1")
        if self.tool_result_len < 1:
            raise bad("tool_result_len", "must be >= 1")
        if self.endpoint not in CHAT_ENDPOINTS:
            raise bad(
                "agent_turns", f"tool-loop conversations need a chat endpoint ({', '.join(CHAT_ENDPOINTS)})"
            )
        if self.dataset != "random":
            raise bad("agent_turns", "tool-loop conversations write their own turns: use the random dataset")
        needed = HISTORY_MODES[self.history]
        if needed is not None and self.endpoint != needed:
            raise bad("history", f"{self.history} needs endpoint {needed}, not {self.endpoint}")

    @property
    def arrival_rate(self) -> float | None:
        """Poisson rate (requests/s, may be inf), or None when arrivals follow the trace's timestamps."""
        if self.request_rate is not None:
            return self.request_rate
        return None if self.dataset == "trace" else math.inf

    def to_json(self) -> dict[str, Any]:
        """The settings for a result file: no API key (only whether one was set); inf as "inf"."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "api_key":
                out["api_key_set"] = self.api_key is not None
                continue
            v = getattr(self, f.name)
            out[f.name] = (
                "inf" if isinstance(v, float) and math.isinf(v) else list(v) if isinstance(v, tuple) else v
            )
        return out
