"""`k2serve bench spec-decode`: decode tok/s without speculation and with "ngram" and "suffix".

Workloads (`--workload`, default all):
- "agent": agent loops. Each conversation is rendered with the model's chat template: a system
  prompt, declared tools (list_files, read_file, run_tests), a user task about a small generated
  Python repository, then turns of (the model's reply, decoded and parsed; the tool call it made, or
  the loop's next scripted call when it made none; the tool result: JSON with file paths, a file's
  code, a test report quoting that code). Each turn's prompt is the whole conversation so far, so
  it holds earlier replies and earlier tool results, which files are re-read and re-tested.
  The model's reply tokens are what is measured; what gets accepted depends on what the model
  writes (a random-weight preset writes noise: the figures say what that noise repeats).
- "tools": the demo model's own tool loops (`--model` a `--preset demo` checkpoint): held-out
  questions from `demo_data` (arithmetic, units, table look-ups, two-step, refusals, chats), the
  chat request path (`plan_chat`, no grammar), the tools run in Python and their results sent back,
  up to `demo_eval.MAX_ROUNDS` model turns, as `k2serve bench demo` runs them. `--conversations`
  per round, `--batch` of them in lockstep; the suffix tree drafts from the round's earlier replies
  (a tool call's JSON frame, "The tool returned ..."), the ngram proposer from the conversation.
- "repeat": prompts a random model continues repetitively (one token repeated, short phrases).
- "random": random token prompts (little to draft: the cost of speculating for nothing).

One engine per method (none / ngram / suffix); every round runs each workload through all three,
in a rotated order (paired rounds), with fresh conversations per round and the proposers' memory
cleared per round (a round never drafts from an earlier round's identical outputs). Greedy decoding;
the run fails unless the three engines give the same tokens. Figures: decode tok/s (tokens after
the first / time from the first to the last token, summed over the requests, so prefill is left
out), medians over rounds with min..max, the speedup over "none" per round, and the acceptance
rate and tokens per verifying step from the engine's spec-decode counters.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from k2serve.bench.demo_eval import MAX_ROUNDS, Outcome, advance
from k2serve.chat.request import ChatPlan, plan_chat
from k2serve.model.demo_data import Sample

METHODS = ("none", "ngram", "suffix")
WORKLOADS = ("agent", "tools", "repeat", "random")

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": list(props)},
        },
    }
    for name, description, props in (
        ("list_files", "List the files under a directory of the repository.", {"dir": {"type": "string"}}),
        ("read_file", "Read a file of the repository.", {"path": {"type": "string"}}),
        ("run_tests", "Run the test suite of a path; returns the report.", {"path": {"type": "string"}}),
    )
]
WORDS = [
    "parse",
    "config",
    "load",
    "record",
    "route",
    "batch",
    "token",
    "cache",
    "block",
    "session",
    "user",
    "order",
    "price",
    "total",
    "item",
    "queue",
    "worker",
    "retry",
    "limit",
    "window",
    "score",
    "merge",
    "split",
    "index",
    "value",
    "key",
    "result",
    "error",
    "event",
    "state",
]


class AgentRepo:
    """A small generated Python repository for one conversation: paths, code, test reports."""

    def __init__(self, rng: random.Random) -> None:
        pkg = rng.choice(WORDS) + "_" + rng.choice(WORDS)
        self.paths = [f"src/{pkg}/{w}.py" for w in rng.sample(WORDS, 4)] + [f"tests/test_{pkg}.py"]
        self.code = {p: self._module(rng) for p in self.paths}
        self.task = f"The tests in {self.paths[-1]} fail. Find the bug in src/{pkg} and explain the fix."

    @staticmethod
    def _module(rng: random.Random) -> str:
        lines = ["from __future__ import annotations", ""]
        for _ in range(3):
            fn, arg, other = rng.sample(WORDS, 3)
            lines += [
                f"def {fn}_{other}({arg}: dict[str, int], limit: int = {rng.randrange(2, 64)}) -> int:",
                f'    """Return the {other} of {arg} up to limit."""',
                "    total = 0",
                f"    for key, value in sorted({arg}.items()):",
                "        if value > limit:",
                f"            raise ValueError(f'{other} {{key}} over {{limit}}: {{value}}')",
                "        total += value",
                "    return total",
                "",
            ]
        return "\n".join(lines)

    def call(self, turn: int) -> tuple[str, dict[str, str]]:
        """The loop's scripted call of `turn`: list, then read / test the source files in turn."""
        if turn == 0:
            return "list_files", {"dir": "src"}
        path = self.paths[(turn - 1) // 2 % (len(self.paths) - 1)]
        return ("read_file" if turn % 2 else "run_tests"), {"path": path}

    def result(self, name: str, args: dict[str, Any]) -> str:
        """The tool's JSON result: a listing, a file's code, or a failing test report quoting it."""
        path = str(args.get("path", args.get("dir", "")))
        if name == "list_files":
            return json.dumps({"dir": path, "files": self.paths})
        if name == "read_file":
            return json.dumps({"path": path, "content": self.code.get(path, ""), "exists": path in self.code})
        code = self.code.get(path, "").splitlines()
        raising = next((i for i, line in enumerate(code) if "raise" in line), 0)
        report = {
            "path": path,
            "passed": 3,
            "failed": 1,
            "failures": [
                {
                    "test": f"{self.paths[-1]}::test_{Path(path).stem}_limit",
                    "traceback": [
                        f'File "{path}", line {raising + 1}',
                        code[raising].strip() if code else "",
                    ],
                    "error": "ValueError",
                }
            ],
        }
        return json.dumps(report)


def fixed_prompts(seed: int) -> dict[str, list[list[int]]]:
    """The "repeat" and "random" workloads' token prompts (ids below 1000: in every preset's vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(0, 1000, (4,), generator=g).tolist() for _ in range(5)]
    return {
        "repeat": [[777] * 16, phrases[0] * 6, phrases[4] * 6],
        "random": [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (30, 24, 40)],
    }


class Runner:
    """One engine (one method): greedy generation timed from the first token to the last."""

    def __init__(self, engine: Any, max_tokens: int) -> None:
        from k2serve.engine.sampling_params import SamplingParams

        self.engine = engine
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        self.decode_tokens = 0
        self.decode_s = 0.0
        self.decode_cpu_s = 0.0
        self.outputs: list[list[int]] = []
        self._n = 0

    def reset(self) -> None:
        """Clear the timing and the proposer's memory (a new round)."""
        from k2serve.engine.spec_decode import Proposer

        self.decode_tokens, self.decode_s, self.decode_cpu_s, self.outputs = 0, 0.0, 0.0, []
        if self.engine.proposer is not None:
            self.engine.proposer = Proposer(self.engine.proposer.config)

    def run(self, prompts: list[list[int]]) -> list[list[int]]:
        """Generate for `prompts` together (a batch); their replies, in order."""
        ids = []
        for p in prompts:
            self._n += 1
            ids.append(f"b{self._n}")
            self.engine.add_request(ids[-1], p, self.params)
        first: dict[str, tuple[float, float]] = {}
        done: dict[str, list[int]] = {}
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            now = time.perf_counter()
            # the process's CPU clock only at a request's first and last token: reading it costs ~2 ms
            # on some hosts (sandboxed kernels), which per step would dilute every speedup
            if any(o.finished or o.request_id not in first for o in outs):
                cpu = time.process_time()
            for o in outs:
                first.setdefault(o.request_id, (now, cpu))
                if o.finished:
                    done[o.request_id] = o.token_ids
                    self.decode_tokens += len(o.token_ids) - 1
                    self.decode_s += now - first[o.request_id][0]
                    self.decode_cpu_s += cpu - first[o.request_id][1]
        replies = [done[i] for i in ids]
        self.outputs += replies
        return replies

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def tok_cpu_s(self) -> float:
        """Decode tokens per CPU-second of this process (all its threads): on a shared, loaded host
        the wall-clock rate swings with the other load; this one counts only this process's work."""
        return self.decode_tokens / self.decode_cpu_s if self.decode_cpu_s else 0.0


def run_round(runner: Runner, workload: str, args: argparse.Namespace, encoder: Any, rnd: int) -> None:
    """One round of `workload` on one engine (`--batch` requests at a time)."""
    runner.reset()
    if workload == "tools":
        run_tools_round(runner, args, encoder, rnd)
        return
    if workload != "agent":
        prompts = fixed_prompts(args.seed)[workload]
        for i in range(0, len(prompts), args.batch):
            runner.run(prompts[i : i + args.batch])
        return
    # `--batch` conversations advance in lockstep: each turn's prompts are generated as one batch
    rngs = [random.Random(f"{args.seed}-{rnd}-{c}") for c in range(args.conversations)]  # noqa: S311
    for start in range(0, args.conversations, args.batch):
        convs = [Conversation(encoder, g) for g in rngs[start : start + args.batch]]
        for _ in range(args.turns):
            for c, reply in zip(convs, runner.run([c.prompt() for c in convs]), strict=True):
                c.answer(reply)


def run_tools_round(runner: Runner, args: argparse.Namespace, encoder: Any, rnd: int) -> None:
    """The "tools" workload: `--conversations` held-out demo conversations (fresh ones each round),
    `--batch` at a time, each advanced until it answers or runs out of turns."""
    from k2serve.model.demo_data import HELDOUT_SEED, heldout_samples

    samples = heldout_samples(args.conversations, seed=HELDOUT_SEED + 1000 + rnd)
    for start in range(0, len(samples), args.batch):
        convs = [ToolConversation(encoder, s) for s in samples[start : start + args.batch]]
        for _ in range(MAX_ROUNDS):
            live = [c for c in convs if not c.outcome.done]
            if not live:
                break
            for c, reply in zip(live, runner.run([c.prompt() for c in live]), strict=True):
                c.answer(reply)


class ToolConversation:
    """One demo conversation (`demo_eval.Outcome`) advanced a model turn at a time."""

    def __init__(self, encoder: Any, sample: Sample) -> None:
        self.encoder = encoder
        self.outcome = Outcome(
            sample, [dict(m) for m in sample.messages if m["role"] in ("system", "user")][:2]
        )
        self.plan: ChatPlan | None = None

    def prompt(self) -> list[int]:
        self.plan = plan_chat(self.outcome.messages, self.outcome.sample.tools or None)
        return list(self.plan.prompt(self.encoder))

    def answer(self, reply: list[int]) -> None:
        assert self.plan is not None
        tok = self.encoder.tokenizer
        text = tok.decode([t for t in reply if t not in tok.stop_ids])
        advance(self.outcome, self.plan, self.plan.parser().parse(text))


class Conversation:
    """An agent loop advanced one turn at a time (so several can share a batch)."""

    def __init__(self, encoder: Any, rng: random.Random) -> None:
        from k2serve.chat.parsers import OutputParser

        self.encoder = encoder
        self.repo = AgentRepo(rng)
        self.parser = OutputParser(tool_names=[t["function"]["name"] for t in TOOLS])
        self.turn = 0
        self.messages: list[dict[str, Any]] = [
            {
                "role": "system",
                "content": "You are a coding agent. Use the tools to inspect and test the repository.",
            },
            {"role": "user", "content": self.repo.task},
        ]

    def prompt(self) -> list[int]:
        return list(self.encoder.encode_chat(self.messages, TOOLS))

    def answer(self, reply: list[int]) -> None:
        """Append the model's reply (its tool call, or the loop's scripted one) and the tool results."""
        text = self.encoder.tokenizer.decode(reply, skip_special_tokens=False)
        parsed = self.parser.parse(text)
        made = [c for c in parsed.tool_calls if c.complete and c.valid_arguments and c.known]
        if made:
            calls = [(c.id, c.name, json.loads(c.arguments)) for c in made]
        else:
            name, args = self.repo.call(self.turn)
            calls = [(f"functions.{name}:{self.turn}", name, args)]
        self.messages.append(
            {
                "role": "assistant",
                "content": parsed.content,
                "reasoning_content": parsed.reasoning,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                    for i, n, a in calls
                ],
            }
        )
        self.messages += [
            {"role": "tool", "tool_call_id": i, "content": self.repo.result(n, a)} for i, n, a in calls
        ]
        self.turn += 1


def summarize(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Per method: the rate per round, its median and min..max; for ngram / suffix also the speedup
    over "none" per round (paired), its median and min..max."""
    out: dict[str, Any] = {}
    for m in METHODS:
        w: dict[str, Any] = {"tok_s": rates[m], "median_tok_s": statistics.median(rates[m])}
        if m != "none":
            speedups = [a / b for a, b in zip(rates[m], rates["none"], strict=True)]
            w |= {
                "median_speedup": statistics.median(speedups),
                "speedup_range": [min(speedups), max(speedups)],
            }
        out[m] = w
    return out


def acceptance(drafts: int, draft_tokens: int, accepted: int) -> dict[str, Any]:
    """The spec-decode counters' deltas over a workload's rounds, as rates."""
    return {
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "tokens_per_verify_step": 1 + accepted / drafts if drafts else 0.0,
        "verify_steps": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
    }


def spec_counters(engine: Any) -> tuple[int, int, int]:
    s = engine.spec_stats
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


def bench(model: Path, args: argparse.Namespace, spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every selected workload through the three engines, `args.rounds` paired rounds."""
    from k2serve.chat.prompt import PromptEncoder
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine

    dtype = getattr(torch, args.dtype)
    runners = {}
    for m in METHODS:
        cfg = EngineConfig(
            num_kv_blocks=args.kv_blocks,
            block_size=16,
            enable_prefix_caching=True,
            speculative_config=spec.get(m),  # type: ignore[arg-type]
            compile=args.compile,
            max_num_seqs=max(args.batch, 1),
        )
        engine = LLMEngine.from_pretrained(model, dtype, cfg)
        if args.no_draft_budget:
            engine.draft_budget = None  # verify every proposed draft
        runners[m] = Runner(engine, args.output_len)
    tokenizer = runners["none"].engine.tokenizer
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    if {"agent", "tools"} & set(workloads) and tokenizer is None:
        raise SystemExit(f"{model}: the agent and tools workloads need the model's tokenizer; it has none")
    encoder = PromptEncoder(tokenizer) if tokenizer is not None else None
    for r in runners.values():  # warm-up (with --compile decode: the buckets a few drafts' rows need)
        for prompt in ([1, 2, 3, 1, 2, 3], [5, 6, 7, 8] * 6, [9] * 12):
            r.run([prompt])
    results: dict[str, Any] = {}
    for name in workloads:
        rates: dict[str, dict[str, list[float]]] = {
            kind: {m: [] for m in METHODS} for kind in ("cpu", "wall")
        }
        before = {m: spec_counters(r.engine) for m, r in runners.items()}
        for rnd in range(args.rounds):
            order = METHODS[rnd % 3 :] + METHODS[: rnd % 3]
            for m in order:
                run_round(runners[m], name, args, encoder, rnd)
                rates["wall"][m].append(runners[m].tok_s)
                rates["cpu"][m].append(runners[m].tok_cpu_s)
            ref = runners["none"].outputs
            for m in METHODS[1:]:
                if runners[m].outputs != ref:
                    raise SystemExit(f"{name}, round {rnd}: {m}'s greedy tokens differ from those without")
        after = {m: spec_counters(r.engine) for m, r in runners.items()}
        results[name] = {
            "cpu": summarize(rates["cpu"]),
            "wall": summarize(rates["wall"]),
            "spec": {
                m: acceptance(*(a - b for a, b in zip(after[m], before[m], strict=True))) for m in METHODS[1:]
            },
            "requests_per_round": len(runners["none"].outputs),
            "tokens_per_round": sum(len(o) for o in runners["none"].outputs),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench spec-decode", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write --preset's random weights)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0, help="seed of the preset weights and the workloads")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--compile",
        default="none",
        choices=["none", "decode"],
        help="decode: the captured decode step, verifying steps included (one row per verified position)",
    )
    ap.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=64, help="max tokens per reply (EOS ends one earlier)")
    ap.add_argument("--batch", type=int, default=1, help="requests (conversations) generated together")
    ap.add_argument("--conversations", type=int, default=2, help="agent conversations per round")
    ap.add_argument("--turns", type=int, default=4, help="model replies per agent conversation")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=1)
    ap.add_argument(
        "--suffix-max-tree-depth",
        type=int,
        default=None,
        help="suffix_decoding_max_tree_depth (default vLLM's 24; each token costs O(depth) Python trie steps)",
    )
    ap.add_argument(
        "--suffix-min-token-prob",
        type=float,
        default=None,
        help="suffix_decoding_min_token_prob (default vLLM's 0.1): a draft stops at a less likely token",
    )
    ap.add_argument(
        "--suffix-max-spec-factor",
        type=float,
        default=None,
        help="suffix_decoding_max_spec_factor (default vLLM's 1.0): a draft is at most this x the match length",
    )
    ap.add_argument("--kv-blocks", type=int, default=1024, help="KV pool blocks (16 tokens each) per engine")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--no-draft-budget",
        action="store_true",
        help="verify every proposed draft (the engine's DraftBudget, which trims drafts whose verifying "
        "rows cost more time than they are expected to save, off)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("rounds", "output_len", "batch", "conversations", "turns"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.num_speculative_tokens
    spec = {
        "ngram": {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": args.prompt_lookup_max,
            "prompt_lookup_min": args.prompt_lookup_min,
        },
        "suffix": {"method": "suffix", "num_speculative_tokens": k}
        | {
            key: value
            for key, value in (
                ("suffix_decoding_max_tree_depth", args.suffix_max_tree_depth),
                ("suffix_decoding_min_token_prob", args.suffix_min_token_prob),
                ("suffix_decoding_max_spec_factor", args.suffix_max_spec_factor),
            )
            if value is not None
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        else:
            from k2serve.model.checkpoint import write_checkpoint

            model = write_checkpoint(Path(tmp), args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
        results = bench(model, args, spec)
    report = {"config": vars(args), "speculative_config": spec, "workloads": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.model or 'preset ' + args.preset}, batch {args.batch}, up to {args.output_len} tokens a reply, "
        f"{args.rounds} paired rounds; decode tok/s median (min..max)"
    )
    for m, s in spec.items():
        print(f"{m}: {json.dumps(s)}")
    for kind, title in (
        ("cpu", "decode tokens per CPU-second of the process"),
        ("wall", "decode tokens per wall-clock second"),
    ):
        print(f"{title}: median (min..max) over rounds; speedup over none, paired by round")
        print(
            "workload  tokens  none                   method  rate                   speedup              accept  tok/verify"
        )
        for name, w in results.items():
            none = w[kind]["none"]
            for m in METHODS[1:]:
                x, a = w[kind][m], w["spec"][m]
                print(
                    f"{name:8s}  {w['tokens_per_round']:6d}  {_spread(none['median_tok_s'], none['tok_s'])}"
                    f"  {m:6s}  {_spread(x['median_tok_s'], x['tok_s'])}"
                    f"  {x['median_speedup']:.2f}x ({x['speedup_range'][0]:.2f}..{x['speedup_range'][1]:.2f})"
                    f"  {a['acceptance_rate']:.2f}    {a['tokens_per_verify_step']:.2f}"
                )
    return 0


def _spread(median: float, values: list[float]) -> str:
    return f"{median:7.1f} ({min(values):.1f}..{max(values):.1f})".ljust(21)


if __name__ == "__main__":
    sys.exit(main())
