"""`k2serve bench tool-schemas`: schema validity of emitted tool calls (Moonshot's K2 Vendor Verifier
measure) over generated agent requests.

Each request declares 1-3 tools with generated schemas (nested objects, enums, arrays, optional fields,
numbers, booleans; some `strict`) and goes through the one chat path (`plan_chat`): its grammar spec
(tool_choice "auto" for most, "required" for the rest) is compiled by the engine's `compile_structured`,
and a stand-in model (random logits, with a bias towards opening the tool-call section so that most
turns call) samples under it until the grammar ends. The output is parsed by `plan.parser()` and every
emitted call is validated with `jsonschema` against its tool's schema (closed for strict tools). The
grammar is what makes calls valid, so this measures it and the parser, not a model's skill: every
emitted call must validate (Moonshot's official API: 100%).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.parsers import collect
from k2serve.chat.request import plan_chat
from k2serve.chat.structured import GrammarCompiler, tool_schema
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.chat.vocab import TOOL_CALLS_SECTION_BEGIN
from k2serve.engine.validation import compile_structured
from k2serve.extras import MissingExtraError

try:
    import jsonschema
except ImportError as e:
    raise MissingExtraError("jsonschema", "bench", "validating emitted tool calls") from e

_WORDS = ("city", "query", "path", "mode", "limit", "tags", "filter", "options", "unit", "items", "depth")


def _schema(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum", "array"] + (
        ["object"] * 2 if depth < 2 else []
    )
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        return {"type": "integer", "minimum": rng.randint(-5, 0), "maximum": rng.randint(1, 999)}
    if kind == "number":
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["a", "b", "celsius", "fahrenheit", "fast", "slow"], 3)}
    if kind == "array":
        item = rng.choice([{"type": "string", "maxLength": 6}, {"type": "integer"}, _object(rng, depth + 1)])
        return {"type": "array", "items": item, "maxItems": rng.randint(1, 3)}
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(_WORDS, rng.randint(1, 4))
    props = {n: _schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.6]  # the rest are optional
    return {"type": "object", "properties": props, "required": required}


def generate_requests(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` agent requests: messages, 1-3 tools with generated schemas, tool_choice."""
    rng = random.Random(seed)  # noqa: S311 - benchmark data, not secrets
    out = []
    for i in range(n):
        tools = [
            {
                "type": "function",
                "function": {
                    "name": f"tool_{i}_{j}",
                    "parameters": _object(rng, 0),
                    **({"strict": True} if rng.random() < 0.3 else {}),
                },
            }
            for j in range(rng.randint(1, 3))
        ]
        choice = "auto" if rng.random() < 0.8 else "required"
        out.append(
            {"messages": [{"role": "user", "content": f"task {i}"}], "tools": tools, "tool_choice": choice}
        )
    return out


def run_one(
    tok: KimiTokenizer, compiler: GrammarCompiler, req: dict[str, Any], seed: int, max_steps: int
) -> tuple[int, int, list[str]] | None:
    """(calls emitted, calls valid, errors) of one request; None when it was cut by `max_steps` (a
    "length" finish, which the verifier does not score)."""
    plan = plan_chat(req["messages"], req["tools"], req["tool_choice"])
    assert plan.structured is not None
    constraint = compile_structured(compiler, plan.structured)
    assert constraint is not None
    vocab = tok.vocab_size
    section = tok.token_to_id(TOOL_CALLS_SECTION_BEGIN)
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        mask = constraint.allowed_mask(vocab)
        logits = torch.randn(vocab, generator=gen)
        logits[section] += 6.0  # the stand-in model calls a tool in most turns
        logits[tok.eos_id] += 4.0  # and ends a turn within a few hundred tokens
        token = int(
            torch.multinomial(torch.softmax(logits.masked_fill(~mask, float("-inf")), -1), 1, generator=gen)
        )
        constraint.accept(token)
        ids.append(token)
        if constraint.is_terminated():
            break
    else:
        return None
    text = plan.output_text(tok)
    parser = plan.parser()
    out = collect(parser.feed(text.add(ids, finished=True)) + parser.finish())
    schemas = {t["function"]["name"]: tool_schema(t["function"]) for t in req["tools"]}
    valid, errors = 0, []
    for call in out.tool_calls:
        try:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            valid += 1
        except (ValueError, KeyError, jsonschema.ValidationError) as e:
            errors.append(f"{call.id}: {str(e)[:200]}")
    return len(out.tool_calls), valid, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench tool-schemas", description=__doc__)
    ap.add_argument("--requests", type=int, default=200, help="generated agent requests (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-steps", type=int, default=3000, help="token cap per request (a cut turn is not scored)"
    )
    ap.add_argument(
        "--tokenizer", type=Path, default=None, help="a tokenizer dir (default: a trained tiny one)"
    )
    args = ap.parse_args(argv)
    if args.tokenizer is None:
        tmp = Path(tempfile.mkdtemp(prefix="k2tok-"))
        write_tokenizer(tmp, 1024)
        args.tokenizer = tmp
    tok = load_tokenizer(args.tokenizer)
    compiler = GrammarCompiler(tok)
    t0 = time.perf_counter()
    calls = valid = calling = truncated = 0
    errors: list[str] = []
    for i, req in enumerate(generate_requests(args.requests, args.seed)):
        result = run_one(tok, compiler, req, args.seed * 100_003 + i, args.max_steps)
        if result is None:
            truncated += 1
            continue
        n, ok, errs = result
        calls, valid, calling = calls + n, valid + ok, calling + (n > 0)
        errors += errs
    report = {
        "requests": args.requests,
        "cut_by_max_steps": truncated,
        "requests_with_calls": calling,
        "calls": calls,
        "valid_calls": valid,
        "schema_accuracy": valid / calls if calls else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "errors": errors[:10],
    }
    print(json.dumps(report, indent=2))
    return 0 if valid == calls else 1


if __name__ == "__main__":
    sys.exit(main())
