"""Wall time of one decode step with every sequence decoding: an engine as the benchmarks build it
(`bench.engine.make_llm`, `--compile decode` by default), B random prompts of P tokens, stepped until all B
decode, then `--steps` steps timed (the captured step's buckets are compiled beforehand by a short
generation over the same prompts).

    python benchmarks/decode_step_timing.py --model ~/.cache/k2serve-bench/models/small-bf16 --batch 64 --prompt 256
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from k2serve.bench.engine import make_llm
from k2serve.engine.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="decode", choices=["none", "decode"])
    ap.add_argument("--profile", type=int, default=0, help="then profile this many steps: a table of ops")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = make_llm(args.model, args.batch, args.prompt, torch.bfloat16, args.compile)
    rng = random.Random(0)  # noqa: S311 - benchmark prompts, not secrets
    vocab = llm.engine.model.config.vocab_size - 256  # ordinary ids, no special tokens
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt)] for _ in range(args.batch)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))  # compile buckets
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + args.profile + 8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while not (
        len(engine.scheduler.running) == args.batch
        and all(len(s.output_token_ids) >= 2 for s in engine.scheduler.running)
    ):
        engine.step()
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    print(
        f"batch {args.batch}, prompt {args.prompt}: {(time.perf_counter() - t) / args.steps * 1e3:.1f} ms a decode step"
    )
    if args.profile:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        ) as prof:
            for _ in range(args.profile):
                engine.step()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
    while engine.has_unfinished_requests():
        engine.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
