"""The `k2serve` command line. Parsing stops here: each subcommand builds a typed config and calls a component."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DTYPES = ("bfloat16", "float32", "float16")


def _dtype(name: str):  # noqa: ANN202 - torch is imported lazily
    import torch

    return getattr(torch, name)


def _cmd_init_model(args: argparse.Namespace) -> int:
    from k2serve.model.checkpoint import write_checkpoint

    out = write_checkpoint(args.dir, args.preset, seed=args.seed, quant=args.quant, dtype=_dtype(args.dtype))
    print(f"wrote {args.preset} checkpoint (quant={args.quant}, seed={args.seed}) to {out}")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from e


def _cmd_generate(args: argparse.Namespace) -> int:
    from k2serve.engine.llm import LLM
    from k2serve.engine.sampling_params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts: list[str | list[int]] = [args.prompt] if args.prompt is not None else [args.prompt_ids]
    for out in llm.generate(prompts, params):
        if args.json:
            print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
        else:
            print(out.text)
            print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
                  f"ttft={out.metrics.ttft * 1e3:.1f} ms, tpot={out.metrics.tpot * 1e3:.1f} ms]", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from k2serve.bench.engine import main as bench_main
    elif args.what == "transfer":
        from k2serve.bench.transfer import main as bench_main
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown benchmark {args.what!r}")
    return int(bench_main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2serve", description="Serve Kimi-K2 / DeepSeek-V3-architecture models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-model", help="write a random-weight checkpoint of a preset architecture")
    s.add_argument("dir")
    s.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quant", choices=("none", "int4", "fp8"), default="none")
    s.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the unquantised weights")
    s.set_defaults(func=_cmd_init_model)

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
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("bench", help="benchmarks (each prints its figures beside a baseline from the same run)")
    s.add_argument("what", choices=("engine", "transfer"))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"k2serve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
