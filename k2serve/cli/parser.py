"""The `k2serve` flags: `build_parser()` and the flag groups the subcommands share.

Each subcommand's handler is a function of `k2serve.cli.commands` (set as `handler`), which imports
its component only when it runs: building the parser imports no component.
"""

from __future__ import annotations

import argparse

from k2serve.cli import commands, plan
from k2serve.planner.cli import add_arguments as add_planner_arguments
from k2serve.router.kv_index import DEFAULT_MAX_BLOCKS
from k2serve.router.policy import POLICIES

DTYPES = ("bfloat16", "float32", "float16")
# k2serve.model.presets.PRESETS' names (importing k2serve.model loads torch; `plan` must not)
PRESET_NAMES = ("demo", "long", "moe200m", "small", "tiny")
KV_CACHE_DTYPES = (
    "auto",
    "bf16",
    "fp32",
    "fp8",
)  # kvcache.fp8.CACHE_DTYPES, spelled out: the CLI loads no torch
ATTENTION_BACKENDS = ("torch", "triton")  # model.triton_attention.ATTENTION_BACKENDS, spelled out
MOE_BACKENDS = ("torch", "triton")  # model.triton_moe.MOE_BACKENDS, spelled out
COMPILE_MODES = ("none", "decode")  # engine.config.COMPILE_MODES, spelled out

KV_STORES = ("none", "mooncake")  # engine.config.KV_STORES, spelled out
KV_STORE_SEGMENT_MB = 512  # engine.config.DEFAULT_KV_STORE_SEGMENT_BYTES in MiB


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids must be comma-separated integers, got {text!r}"
        ) from e


def _parse_speculative_config(text: str) -> str:
    """Check --speculative-config's JSON now (a clear usage error naming the field); the JSON text is
    what EngineConfig takes (and what `up` hands its workers)."""
    from k2serve.engine.config import EngineConfigError, SpeculativeConfig  # only when the flag is given

    try:
        SpeculativeConfig.parse(text)
    except EngineConfigError as e:
        raise argparse.ArgumentTypeError(f"--speculative-config: {e}") from e
    return text


def add_speculative_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--speculative-config",
        type=_parse_speculative_config,
        default=None,
        metavar="JSON",
        help='speculative decoding, vLLM\'s speculative_config: e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}\' (prompt lookup: '
        "drafts verified in one forward pass; greedy output unchanged, sampled output distributed as without)",
    )


def add_model_args(s: argparse.ArgumentParser) -> None:
    """Where the model comes from: a checkpoint directory, or a preset initialised on the fly."""
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    g.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="write a random checkpoint of this preset and use it (demo: the trained model the package ships)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the --preset weights")
    s.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: the directory name)"
    )
    s.add_argument("--dtype", choices=DTYPES, default="float32")


def add_engine_args(s: argparse.ArgumentParser) -> None:
    """Sizes of the engine a serving process runs (see k2serve.engine.config.EngineConfig)."""
    s.add_argument("--block-size", type=int, default=16)
    kv = s.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-cache-mb", type=int, default=None, help="memory for the latent KV pool, MiB (default 1024)"
    )
    kv.add_argument(
        "--memory-budget-mb",
        type=int,
        default=None,
        help="memory of this rank for weights + activations + KV, MiB: the KV pool gets what is left "
        "after the loaded weights and the activation peak of a profiled max-batch forward; startup "
        "refuses when one --max-model-len sequence does not fit (see `k2serve plan`)",
    )
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 429")
    s.add_argument("--no-prefix-caching", action="store_true")
    add_speculative_arg(s)
    s.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="what the latent KV pool stores: auto = the model's --dtype; fp8 = e4m3 latent with a "
        "per-token fp32 scale and bf16 RoPE keys (656 bytes/token/layer for K2, vLLM's fp8_ds_mla "
        "row); prefill and decode workers must use the same",
    )
    s.add_argument(
        "--kv-offload-host-mb",
        type=int,
        default=0,
        help="host-memory tier below the KV pool, MiB: prefix-cache blocks evicted from the pool are kept "
        "here (LRU) and reloaded on a prefix hit instead of recomputed (0 = off)",
    )
    s.add_argument(
        "--kv-offload-dir",
        default=None,
        help="disk tier directory (e.g. on NVMe): blocks pushed out of the host tier go here, one "
        "checksummed file per block; needs --kv-offload-disk-mb",
    )
    s.add_argument(
        "--kv-offload-disk-mb", type=int, default=0, help="size cap of the disk tier, MiB (0 = off)"
    )
    s.add_argument(
        "--kv-offload-async",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="disk writes and tier reloads on background threads, overlapped with the engine's steps "
        "(a request waits for its reload, the others run); --no-kv-offload-async: inside the step",
    )
    s.add_argument(
        "--kv-reload-timeout-s",
        type=float,
        default=10.0,
        help="an asynchronous reload not done after this long is given up: its tokens are recomputed",
    )
    s.add_argument(
        "--kv-session-lease-s",
        type=float,
        default=0.0,
        help="after a turn of a session finishes, keep its KV blocks from eviction this many seconds or "
        "until its next turn arrives (an agent's tool call); 0 = off",
    )
    add_kv_store_args(s)
    add_attention_backend_arg(s)
    add_device_arg(s)
    add_compile_arg(s)


def add_compile_arg(s: argparse.ArgumentParser) -> None:
    """--compile / --enforce-eager (EngineConfig.compile): the captured decode step."""
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="decode = steps of only 1-token decode rows run a static-shape forward per batch bucket "
        "(1, 2, 4, ... max-num-seqs): torch.compile on CPU (compiled on a bucket's first use, cached "
        "under ~/.cache/k2serve/inductor), CUDA graphs on CUDA; none = every step eager (default)",
    )
    g.add_argument("--enforce-eager", action="store_true", help="vLLM's spelling of --compile none")


def add_kv_store_args(s: argparse.ArgumentParser) -> None:
    """The shared KV tier (EngineConfig.kv_store_*): prefix-cache blocks in a Mooncake Store."""
    s.add_argument(
        "--kv-store",
        choices=KV_STORES,
        default="none",
        help="shared KV tier below the local ones: mooncake = prefix-cache blocks in a Mooncake Store "
        "every worker reaches, so a block computed on one worker is fetched, not recomputed, by another "
        "(needs pip install 'k2serve[mooncake]'; `up` starts a local mooncake_master unless "
        "--kv-store-master is given)",
    )
    s.add_argument(
        "--kv-store-master", default=None, metavar="HOST:PORT", help="mooncake_master's RPC address"
    )
    s.add_argument(
        "--kv-store-metadata",
        default=None,
        metavar="URL",
        help="the transfer engine's metadata server (default http://MASTER_HOST:8080/metadata, which "
        "mooncake_master -enable_http_metadata_server=true serves)",
    )
    s.add_argument(
        "--kv-store-segment-mb",
        type=int,
        default=KV_STORE_SEGMENT_MB,
        help="memory this worker contributes to the store, MiB",
    )
    s.add_argument(
        "--kv-store-put-on-compute",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put a block into the store as soon as it is computed (default), so other workers hit it "
        "before this one evicts it; --no-kv-store-put-on-compute: only on eviction",
    )
    s.add_argument(
        "--kv-store-local-hostname",
        default=None,
        help="the address other store clients reach this worker at (default: this host's address)",
    )


def add_device_arg(s: argparse.ArgumentParser) -> None:
    """--device (EngineConfig.device): where the weights, KV pool, step inputs and sampler live."""
    s.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N: where the weights are loaded and the KV pool, step inputs and sampler "
        "live (default: cuda when torch sees a GPU, else cpu); a worker passes it to its KV transfer",
    )


def add_attention_backend_arg(s: argparse.ArgumentParser) -> None:
    """--attention-backend and --moe-backend (EngineConfig's): the engine flags have them, so has `generate`."""
    s.add_argument(
        "--moe-backend",
        choices=MOE_BACKENDS,
        default="torch",
        help="routed experts: torch (per-expert GEMMs) or triton (fused Triton MoE kernels, the routing's "
        "gather and weighted sum inside them: INT4 group-32 experts dequantised in registers, or bf16/fp32 "
        "dense experts; needs CUDA, or TRITON_INTERPRET=1 on CPU)",
    )
    s.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="torch",
        help="paged MLA attention: torch (tiled reference) or triton (the Triton kernels: absorbed decode "
        "splits and prefill chunks, absorbed or expanded; needs CUDA, or TRITON_INTERPRET=1 on CPU; an fp8 "
        "cache stays torch)",
    )


def add_transfer_backend_arg(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument(
        "--transfer-backend",
        "--kv-transfer-backend",
        dest="transfer_backend",
        choices=("auto", "grpc", "torch"),
        default="auto",
        help=f"{what}: torch = torch.distributed point to point (gloo on CPU, NCCL between GPUs with "
        "--device cuda: no host staging), received straight into the decode pool, each pair connection "
        "authenticated with the cluster token; grpc = gRPC streams (TLS-capable); auto = torch, or grpc "
        "with --tls-*",
    )


def add_worker_args(s: argparse.ArgumentParser, default_port: int) -> None:
    """A prefill or decode worker: its own gRPC endpoint and where the router is."""
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=default_port, help="gRPC port (0 = pick a free one)")
    s.add_argument("--advertise-host", default=None, help="address others use to reach this worker")
    s.add_argument(
        "--router",
        default=None,
        help="router's internal gRPC address host:port (--internal-port) to register with",
    )
    s.add_argument("--worker-id", default=None)
    add_transfer_backend_arg(
        s, "how this worker receives KV (a prefill worker sends with what each decode worker names)"
    )
    s.add_argument("--transfer-port", type=int, default=0, help="torch.distributed transfer port (0 = free)")
    s.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus /metrics port, vLLM names (0 = a free one; the router lists its URL)",
    )
    s.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel group size: this process is one of --ep ranks that split the routed "
        "experts and step in lockstep; each rank serves and registers as its own worker",
    )
    s.add_argument("--ep-rank", type=int, default=0, help="this process's rank in the --ep group")
    s.add_argument(
        "--ep-init",
        default=None,
        metavar="tcp://HOST:PORT",
        help="rendezvous of the --ep group, hosted by rank 0 (required when --ep > 1)",
    )
    s.add_argument(
        "--ep-timeout",
        type=float,
        default=60.0,
        help="seconds: bound on joining the --ep group and on every collective step; a rank that "
        "loses its group exits non-zero",
    )
    add_eplb_args(s)
    s.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds")
    add_tls_args(s)
    add_cluster_auth_args(s)
    s.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # launchers: the bound address


def add_eplb_args(s: argparse.ArgumentParser) -> None:
    """EPLB while serving, with vLLM's flag names (`k2serve.experts.EPLBConfig`)."""
    s.add_argument(
        "--enable-eplb",
        action="store_true",
        help="with --ep > 1: re-place the routed experts while serving from the load measured per expert "
        "(EPLB), as vLLM's --enable-eplb; requests in flight keep going with the same tokens",
    )
    s.add_argument(
        "--eplb-config",
        default=None,
        metavar="JSON",
        help='EPLB settings, vLLM\'s keys: {"window_size": 1000, "step_interval": 3000, '
        '"num_redundant_experts": 0}: re-place every step_interval group steps from the load of the '
        "last window_size steps; num_redundant_experts extra replica slots over the group (a multiple "
        "of --ep; each rank gets its share). Needs --enable-eplb",
    )


def add_tls_args(s: argparse.ArgumentParser, peers: bool = True) -> None:
    """This process's certificate; with `peers` (processes that dial other k2serve processes), the CA
    of the peers (mutual TLS) and the server-name override. See k2serve.rpc.tls."""
    g = s.add_argument_group("TLS (default: plaintext)")
    g.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="this process's certificate: serve HTTPS and gRPC over TLS only"
        + (", dial the other processes over TLS and present it to them" if peers else ""),
    )
    g.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    if not peers:
        return
    g.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA that signs the peers' certificates: gRPC servers require client certificates it "
        "signed (mutual TLS) and clients verify servers with it (default: the system roots); "
        "needs --tls-cert/--tls-key. The torch KV transfer backend is plaintext and refused with TLS",
    )
    g.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="name to check in every server certificate instead of the host dialled "
        "(certificates carry DNS and IP SANs, e.g. localhost and 127.0.0.1)",
    )


def add_redis_args(s: argparse.ArgumentParser, help_url: str) -> None:
    """The session store's Redis (see k2serve.sessions.connection)."""
    g = s.add_argument_group("Redis (session store)")
    g.add_argument("--redis-url", default=None, metavar="URL", help=help_url)
    g.add_argument(
        "--redis-password-file",
        default=None,
        metavar="FILE",
        help="file holding the Redis password (default: $REDIS_PASSWORD_FILE); keeps it out of the "
        "URL and the process list",
    )
    g.add_argument(
        "--redis-ca",
        default=None,
        metavar="PEM",
        help="CA that signs the Redis server's certificate (rediss:// URLs; default: the system roots)",
    )
    g.add_argument(
        "--redis-cert", default=None, metavar="PEM", help="client certificate for Redis (rediss://)"
    )
    g.add_argument("--redis-key", default=None, metavar="PEM", help="private key of --redis-cert")


def add_routing_args(p: argparse.ArgumentParser, index: bool = False) -> None:
    """--routing-policy (router, up): how the router picks workers (k2serve.router.policy); with
    `index` (router) also the KV index's bound and the routing log."""
    p.add_argument(
        "--routing-policy",
        choices=POLICIES,
        default="kv",
        help="kv: the prefill worker with the least predicted TTFT, counting the prompt's prefix its cache "
        "holds (KV events), a new conversation where it evicts the coldest cached blocks; kv-ttft: kv "
        "without that cache balance (by predicted TTFT alone); kv-settled: kv counting only cached blocks, "
        "not those a prefill in flight is computing; least-loaded: fewest outstanding requests; "
        "round-robin: in turn",
    )
    if index:
        p.add_argument(
            "--kv-index-max-blocks",
            type=int,
            default=DEFAULT_MAX_BLOCKS,
            help="block hashes the KV index keeps (about 460 bytes each); past it the least recently "
            "stored is forgotten",
        )
        p.add_argument(
            "--routing-log",
            default=None,
            metavar="PATH",
            help="append one JSON line per answered prefill to PATH: the prefill worker chosen and why, "
            "each candidate's predicted TTFT, queue and cached / in-flight prefix tokens, the cached "
            "tokens predicted and found (diagnosis; bench kv-trace --trace-misses reads it)",
        )


def add_cluster_auth_args(s: argparse.ArgumentParser) -> None:
    """The cluster credential of a router or worker (see k2serve.rpc.auth)."""
    g = s.add_argument_group("cluster credential (internal calls; one of these is required)")
    g.add_argument(
        "--cluster-token-file",
        default=None,
        metavar="FILE",
        help="file (0600) holding the cluster token every internal call carries and every internal "
        "server requires (default: $K2SERVE_CLUSTER_TOKEN_FILE); `k2serve up` generates one per cluster",
    )
    g.add_argument(
        "--insecure-internal",
        action="store_true",
        help="serve and dial internal services without a token or mutual TLS (tests and development only)",
    )


def add_api_args(s: argparse.ArgumentParser, port: int = 8000, tls_peers: bool = False) -> None:
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=port, help="HTTP port of the OpenAI-compatible API")
    s.add_argument(
        "--api-key", default=None, help="required bearer key (default: $K2SERVE_API_KEY, else none)"
    )
    add_tls_args(s, peers=tls_peers)


def add_tracing_arg(s: argparse.ArgumentParser) -> None:
    """OpenTelemetry tracing (off unless this or the OTEL_EXPORTER_OTLP_* variables name an endpoint)."""
    s.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        metavar="URL",
        help="send spans here over OTLP (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or "
        "$OTEL_EXPORTER_OTLP_ENDPOINT; protocol $OTEL_EXPORTER_OTLP_PROTOCOL, http/protobuf or grpc); "
        "none: no tracing",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="k2serve", description="Serve Kimi-K2 / DeepSeek-V3-architecture models."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "init-model",
        help="write a random-weight checkpoint of a preset architecture (demo: copy the shipped trained model)",
    )
    s.add_argument("dir")
    s.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--quant",
        choices=("none", "int4", "int4-all", "fp8"),
        default="none",
        help="int4: routed experts INT4 (as K2's checkpoints); int4-all: every linear but the router",
    )
    s.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the unquantised weights")
    s.set_defaults(handler=commands.init_model)

    s = sub.add_parser(
        "train-demo",
        help="train the demo preset on CPU: corpus generation, tokenizer, AdamW loop (writes a checkpoint)",
    )
    s.add_argument("out", help="directory the checkpoint goes to (the shipped one is k2serve/model/demo)")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate (at 3e-3 the demo model never learned to copy numbers)",
    )
    s.add_argument("--samples", type=int, default=40000, help="generated training conversations")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core host)"
    )
    s.add_argument("--max-minutes", type=float, default=None, help="stop early (checkpoint still written)")
    s.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine to 10%%")
    s.add_argument(
        "--init-from",
        default=None,
        help="continue from an earlier run's DIR (its fp32 weights and tokenizer)",
    )
    s.add_argument(
        "--copy-heavy", action="store_true", help="the second stage's corpus mix (more number-copying kinds)"
    )
    s.add_argument(
        "--copy-drill",
        action="store_true",
        help="the copy curriculum: half short copy drills (repeat numbers, JSON arguments), half --copy-heavy",
    )
    s.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the matrices")
    s.add_argument(
        "--kind-weights",
        type=lambda text: tuple(float(w) for w in text.split(",")),
        default=None,
        help="the corpus mix as comma-separated weights per kind (arith,convert,table,two_step,refuse,chat,"
        "copy); overrides --copy-heavy/--copy-drill",
    )
    s.add_argument(
        "--phrasings",
        choices=("templates", "varied"),
        default="templates",
        help="training questions from the fixed templates, or composed from parts (operand expressions, "
        "wrappers, words before and after: numbers and units move about)",
    )
    s.set_defaults(handler=commands.train_demo)

    s = sub.add_parser("generate", help="offline generation with the single-node engine")
    s.add_argument("--model", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", type=_parse_ids)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_speculative_arg(s)
    add_attention_backend_arg(s)
    add_device_arg(s)
    add_compile_arg(s)
    s.set_defaults(handler=commands.generate)

    s = sub.add_parser("serve", help="one process: the engine behind the OpenAI-compatible HTTP API")
    add_model_args(s)
    add_engine_args(s)
    add_api_args(s)
    s.set_defaults(handler=commands.serve)

    s = sub.add_parser(
        "router", help="public gRPC + OpenAI HTTP API; dispatches to prefill and decode workers"
    )
    add_api_args(s, tls_peers=True)
    s.add_argument("--grpc-port", type=int, default=50051, help="public gRPC API (clients)")
    s.add_argument(
        "--internal-port",
        type=int,
        default=50052,
        help="internal gRPC listener: the worker registry, for holders of the cluster credential only",
    )
    add_cluster_auth_args(s)
    s.add_argument("--model", required=True, help="checkpoint directory (tokenizer, chat template, config)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="ROLE=HOST:PORT",
        help="static worker (prefill=..., decode=...); repeatable; workers may also register",
    )
    s.add_argument(
        "--heartbeat-timeout", type=float, default=5.0, help="seconds without heartbeat before removal"
    )
    add_redis_args(
        s, "session store: redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS (default: $REDIS_URL)"
    )
    s.add_argument("--max-queue", type=int, default=1024, help="requests in flight before 429")
    s.add_argument(
        "--max-ttft-ms",
        type=float,
        default=None,
        help="answer 429 (Retry-After) at once when the predicted time to first token exceeds this",
    )
    add_routing_args(s, index=True)
    s.add_argument(  # launchers: "HTTP_PORT GRPC_PORT INTERNAL_PORT"
        "--ready-file", default=None, help=argparse.SUPPRESS
    )
    add_tracing_arg(s)
    s.set_defaults(handler=commands.router)

    for role, port in (("prefill", 50060), ("decode", 50070)):
        s = sub.add_parser(role, help=f"a {role} worker")
        add_model_args(s)
        add_engine_args(s)
        add_worker_args(s, port)
        add_tracing_arg(s)
        s.set_defaults(handler=commands.prefill if role == "prefill" else commands.decode)

    s = sub.add_parser("up", help="start a whole local cluster: Redis, router, prefill and decode workers")
    add_model_args(s)
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="HTTP port of the router")
    s.add_argument("--grpc-port", type=int, default=50051)
    s.add_argument(
        "--internal-port", type=int, default=0, help="router's internal listener for the workers (0 = free)"
    )
    s.add_argument(
        "--cluster-token-file",
        default=None,
        metavar="FILE",
        help="the cluster token (0600 file) every process gets (default: a fresh one per cluster)",
    )
    s.add_argument("--prefill", type=int, default=1, help="prefill workers")
    s.add_argument("--decode", type=int, default=1, help="decode workers")
    s.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel ranks per worker: each prefill and decode worker is a group of --ep "
        "processes (each its own endpoint)",
    )
    add_eplb_args(s)
    add_transfer_backend_arg(s, "KV transfer between the workers")
    add_tls_args(s)
    add_redis_args(
        s,
        "use this Redis instead of the embedded one ($REDIS_URL); the embedded one listens on "
        "127.0.0.1 with a password generated per cluster",
    )
    s.add_argument("--api-key", default=None)
    s.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster ('auto' or host:port); --tls-* files must then exist at the same "
        "paths on every node, and the certificate must name every node's IP (or set --tls-server-name)",
    )
    s.add_argument("--workdir", default=None, help="where logs and the --preset checkpoint go")
    s.add_argument(
        "--max-ttft-ms",
        type=float,
        default=None,
        help="router: 429 at once when the predicted TTFT exceeds this",
    )
    s.add_argument(
        "--ray-cpus-per-rank", type=float, default=None, help="--ray: CPUs each rank's actor reserves (1)"
    )
    s.add_argument(
        "--ray-gpus-per-rank",
        type=float,
        default=None,
        help="--ray: GPUs each rank's actor reserves (default: 1 with --device cuda, else 0)",
    )
    s.add_argument(
        "--ray-group-strategy",
        choices=("STRICT_PACK", "PACK"),
        default=None,
        help="--ray: placement of one EP group's ranks (STRICT_PACK)",
    )
    s.add_argument("--ray-max-restarts", type=int, default=None, help="--ray: restarts of a failed actor (3)")
    add_routing_args(s)
    add_tracing_arg(s)
    s.set_defaults(handler=commands.up)

    s = sub.add_parser(
        "planner", help="scale prefill/decode replicas from the router's metrics; --dry-run replays a trace"
    )
    add_planner_arguments(s)
    s.set_defaults(handler=commands.planner)

    s = sub.add_parser(
        "plan", help="memory per rank of a model on a device and layout; refuses layouts that do not fit"
    )
    plan.add_arguments(s)
    s.set_defaults(handler=commands.plan)

    s = sub.add_parser(
        "bench", help="benchmarks (each prints its figures beside a baseline from the same run)"
    )
    s.add_argument("what", choices=tuple(commands.BENCHMARKS))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(handler=commands.bench)
    return p
