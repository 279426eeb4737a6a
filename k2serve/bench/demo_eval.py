"""`k2serve bench demo`: how often the demo model answers held-out questions right through its tools.

The questions come from `demo_data.heldout_samples`: phrasings that never occur in training, drawn
with their own seed. Each conversation runs the way a user's does: the chat request path
(`plan_chat`: prompt rendering, the "auto" tool-choice grammar the server applies when tools are
offered), the real engine (`LLMEngine`, greedy), the server's output parser; the tools run in Python
(`demo_data.execute_tool`) and their results go back as tool messages, up to `MAX_ROUNDS` model turns.
All conversations of a round decode in one continuous batch.

A conversation counts as right when:
- a tool question (arith, convert, table, two_step): the model made exactly the expected calls (names
  and arguments, numbers compared by value) and its final answer contains the expected number;
- a refusal: no tool call was made (the needed tool was not offered) and the answer is not empty;
- a chat: no tool call and a non-empty answer.
A tool call is valid when it names an offered tool, its arguments parse as a JSON object with the
schema's required keys, and its section was closed. Run with and without the grammar (`--grammar`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2serve.chat.parsers import ParsedOutput
from k2serve.chat.prompt import PromptEncoder
from k2serve.chat.request import ChatPlan, plan_chat, reply_message
from k2serve.chat.structured import GrammarCompiler
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.validation import compile_structured
from k2serve.model.demo_data import Sample, execute_tool, heldout_samples

MAX_ROUNDS = 4
MAX_TOKENS = 96


@dataclass
class Outcome:
    """What happened in one evaluated conversation."""

    sample: Sample
    messages: list[dict[str, Any]]
    calls: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    valid_calls: int = 0
    final: str = ""
    done: bool = False

    @property
    def right(self) -> bool:
        s = self.sample
        if s.kind in ("refuse", "chat"):
            return not self.calls and bool(self.final.strip())
        if len(self.calls) != len(s.calls):
            return False
        for (name, args), (want_name, want_args) in zip(self.calls, s.calls, strict=True):
            if name != want_name or args is None or not _same_args(args, want_args):
                return False
        return _contains_number(self.final, s.expected)


def _same_args(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if set(got) != set(want):
        return False
    for k, v in want.items():
        g = got[k]
        if isinstance(v, int | float) and not isinstance(v, bool):
            if not isinstance(g, int | float) or isinstance(g, bool) or not math.isclose(g, v, rel_tol=1e-9):
                return False
        elif g != v:
            return False
    return True


def _contains_number(text: str, number: str) -> bool:
    """`number` occurs in `text` as a whole number (not inside a longer one)."""
    start = text.find(number)
    while start >= 0:
        before = text[start - 1] if start > 0 else " "
        after = text[start + len(number)] if start + len(number) < len(text) else " "
        if not before.isdigit() and not (
            after.isdigit() or (after == "." and text[start + len(number) + 1 :][:1].isdigit())
        ):
            return True
        start = text.find(number, start + 1)
    return False


def _valid(call_args: str, name: str, tools: list[dict[str, Any]], complete: bool) -> dict[str, Any] | None:
    """The parsed arguments when the call is valid (see the module docstring), else None."""
    spec = next((t["function"] for t in tools if t["function"]["name"] == name), None)
    if spec is None or not complete:
        return None
    try:
        args = json.loads(call_args)
    except ValueError:
        return None
    if not isinstance(args, dict) or any(k not in args for k in spec["parameters"].get("required", [])):
        return None
    return args


def run_eval(llm: LLM, samples: list[Sample], grammar: bool) -> list[Outcome]:
    """Run every conversation to its end (or MAX_ROUNDS model turns); see the module docstring."""
    tok = llm.tokenizer
    assert tok is not None
    encoder = PromptEncoder(tok)
    compiler = GrammarCompiler(tok)
    engine = llm.engine
    outcomes = [
        Outcome(s, [dict(m) for m in s.messages if m["role"] in ("system", "user")][:2]) for s in samples
    ]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    for rnd in range(MAX_ROUNDS):
        live = [o for o in outcomes if not o.done]
        if not live:
            break
        plans: dict[str, tuple[Outcome, ChatPlan]] = {}
        for i, o in enumerate(live):
            plan = plan_chat(o.messages, o.sample.tools or None)
            rid = f"demo-{rnd}-{i}"
            constraint = (
                compile_structured(compiler, plan.structured) if grammar and plan.structured else None
            )
            engine.add_request(rid, plan.prompt(encoder), params, constraint=constraint)
            plans[rid] = (o, plan)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    o, plan = plans[out.request_id]
                    ids = [t for t in out.token_ids if t not in tok.stop_ids]
                    advance(o, plan, plan.parser().parse(tok.decode(ids)))
    return outcomes


def advance(o: Outcome, plan: ChatPlan, parsed: ParsedOutput) -> None:
    """Record one model turn: run its tool calls (the conversation goes on) or take its final answer."""
    if not parsed.tool_calls:
        o.final, o.done = parsed.content, True
        return
    o.messages.append(reply_message(parsed))
    for call in parsed.tool_calls:
        args = _valid(call.arguments, call.name, o.sample.tools, call.complete)
        o.valid_calls += args is not None
        o.calls.append((call.name, args))
        result = (
            execute_tool(call.name, args, o.sample.tables) if args is not None else "error: bad arguments"
        )
        o.messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Shares right overall, on tool questions, per kind, and the share of valid tool calls."""
    kinds = Counter(o.sample.kind for o in outcomes)
    right = Counter(o.sample.kind for o in outcomes if o.right)
    tool_kinds = [o for o in outcomes if o.sample.calls]
    n_calls = sum(len(o.calls) for o in outcomes)
    return {
        "conversations": len(outcomes),
        "right": sum(right.values()) / len(outcomes),
        "right_through_tools": sum(o.right for o in tool_kinds) / max(1, len(tool_kinds)),
        "tool_questions": len(tool_kinds),
        "valid_tool_calls": sum(o.valid_calls for o in outcomes) / max(1, n_calls),
        "tool_calls": n_calls,
        "by_kind": {k: f"{right[k]}/{n}" for k, n in sorted(kinds.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench demo", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    ap.add_argument("--n", type=int, default=200, help="held-out conversations (default 200)")
    ap.add_argument("--grammar", choices=("on", "off", "both"), default="both")
    ap.add_argument("--show", type=int, default=0, help="print this many failed conversations")
    args = ap.parse_args(argv)
    from k2serve.model.demo_model import demo_model_dir

    llm = LLM(args.model or demo_model_dir())
    samples = heldout_samples(args.n)
    for mode in ("off", "on") if args.grammar == "both" else (args.grammar,):
        t0 = time.perf_counter()
        outcomes = run_eval(llm, samples, grammar=mode == "on")
        summary = summarize(outcomes)
        summary["grammar"] = mode
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(summary), flush=True)
        for o in [o for o in outcomes if not o.right][: args.show]:
            print(f"  FAIL {o.sample.kind}: {o.sample.messages[-len(o.sample.messages)]['content'][:60]!r}")
            print(f"    question {[m['content'] for m in o.messages if m['role'] == 'user']}")
            print(f"    calls {o.calls} want {o.sample.calls} final {o.final!r} want {o.sample.expected!r}")
    return 0
