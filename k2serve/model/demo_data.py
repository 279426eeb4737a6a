"""The corpus the `demo` preset is trained on: short K2-format chats that use tools.

Every sample is an OpenAI-style conversation (`messages` + `tools`) whose assistant turns are what the
model must learn to say. Kinds (`KINDS`): arithmetic through `add` / `subtract` / `multiply` /
`divide`, unit conversion through `convert_units`, a fact looked up in a small table that a
`get_table` tool returns, two-step arithmetic (the second call uses the first result), refusals when
the tool a question needs is not offered, and short chats without a tool. Assistant turns that call a
tool carry empty reasoning (so a conversation renders the same whether or not a client sends the
reasoning back); final answers start with a brief `<think>...</think>`.

`training_samples(n, seed)` and `heldout_samples(n, seed)` draw from disjoint phrasings (`TRAIN` vs
`HELDOUT` templates) with their own seeds; the held-out set is what BENCHMARKS.md's accuracy is
measured on. `render_sample` turns a sample into token ids and a loss mask (1 on assistant tokens).
`execute_tool` is the reference implementation of every tool, used by the generator, the evaluation
harness and the README's agent example alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2serve.chat.template import GENERATION_PROMPT, apply_chat_template, render_message
from k2serve.chat.tokenizer import KimiTokenizer

KINDS = ("arith", "convert", "table", "two_step", "refuse", "chat", "copy")
# "copy" (short copy drills, see `_Gen.copy`) is a training-only kind: weight 0 in the default mix and
# in the held-out set (a trailing 0 weight leaves `random.choices` draws unchanged, so the held-out
# questions and the original recipe's corpus are the same as before the kind existed).
KIND_WEIGHTS = (0.36, 0.14, 0.14, 0.14, 0.11, 0.11, 0.0)
# The second training stage's mix (see demo_train): more of the kinds whose answers copy numbers.
COPY_HEAVY_WEIGHTS = (0.42, 0.16, 0.16, 0.18, 0.04, 0.04, 0.0)
# The copy curriculum (`train-demo --copy-drill`): half the conversations are short copy drills, whose
# answers can only be predicted by copying numbers seen earlier (what induction heads do), the rest the
# copy-heavy mix.
COPY_DRILL_WEIGHTS = (0.21, 0.08, 0.08, 0.09, 0.02, 0.02, 0.5)

ARITH_TOOLS = ("add", "subtract", "multiply", "divide")
_ARITH_DOC = {
    "add": "Add two numbers: a + b.",
    "subtract": "Subtract b from a: a - b.",
    "multiply": "Multiply two numbers: a * b.",
    "divide": "Divide a by b: a / b.",
}
_OP_NAME = {"add": "sum", "subtract": "difference", "multiply": "product", "divide": "quotient"}

# unit -> (dimension, factor to the base unit); temperatures are handled apart.
UNITS: dict[str, tuple[str, float]] = {
    "km": ("length", 1000.0),
    "m": ("length", 1.0),
    "cm": ("length", 0.01),
    "mi": ("length", 1609.344),
    "ft": ("length", 0.3048),
    "in": ("length", 0.0254),
    "kg": ("mass", 1.0),
    "g": ("mass", 0.001),
    "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125),
    "l": ("volume", 1.0),
    "ml": ("volume", 0.001),
    "gal": ("volume", 3.785411784),
    "c": ("temperature", 1.0),
    "f": ("temperature", 1.0),
}
UNIT_WORDS: dict[str, tuple[str, ...]] = {
    "km": ("km", "kilometers"),
    "m": ("m", "meters"),
    "cm": ("cm", "centimeters"),
    "mi": ("miles", "mi"),
    "ft": ("feet", "ft"),
    "in": ("inches", "in"),
    "kg": ("kg", "kilograms"),
    "g": ("grams", "g"),
    "lb": ("pounds", "lb"),
    "oz": ("ounces", "oz"),
    "l": ("liters", "l"),
    "ml": ("ml", "milliliters"),
    "gal": ("gallons", "gal"),
    "c": ("degrees Celsius", "C"),
    "f": ("degrees Fahrenheit", "F"),
}

TABLE_TOPICS: dict[str, tuple[str, str, str]] = {
    # topic -> (row noun, column name, unit or "")
    "cities": ("city", "population", ""),
    "mountains": ("mountain", "height", "m"),
    "rivers": ("river", "length", "km"),
    "employees": ("employee", "age", ""),
    "products": ("product", "price", "dollars"),
    "planets": ("planet", "moons", ""),
}
_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "va", "sel", "dun", "bra", "ori", "pel", "zan", "qui", "mar")


def tool_spec(name: str) -> dict[str, Any]:
    """The OpenAI tool spec of one of the demo tools."""
    if name in ARITH_TOOLS:
        params: dict[str, Any] = {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        }
        desc = _ARITH_DOC[name]
    elif name == "convert_units":
        params = {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"type": "string"},
                "to_unit": {"type": "string"},
            },
            "required": ["value", "from_unit", "to_unit"],
        }
        desc = "Convert a value between units."
    elif name == "get_table":
        params = {
            "type": "object",
            "properties": {"topic": {"type": "string"}},
            "required": ["topic"],
        }
        desc = "Get a table of facts about a topic."
    else:
        raise ValueError(f"unknown demo tool {name!r}")
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": params}}


ALL_TOOLS = (*ARITH_TOOLS, "convert_units", "get_table")


def fmt_number(x: float) -> str:
    """How tools print numbers: integers without a point, others rounded to 2 decimals."""
    r = round(x, 2)
    return str(int(r)) if r == int(r) else f"{r:.2f}".rstrip("0")


def _convert(value: float, src: str, dst: str) -> float:
    if UNITS[src][0] != UNITS[dst][0]:
        raise ValueError(f"cannot convert {src} to {dst}")
    if src == dst:
        return value
    if src == "c":
        return value * 9 / 5 + 32
    if src == "f":
        return (value - 32) * 5 / 9
    return value * UNITS[src][1] / UNITS[dst][1]


def execute_tool(name: str, args: Mapping[str, Any], tables: Mapping[str, str] | None = None) -> str:
    """Run a demo tool and return its result text (the tool message's content); errors as text."""
    try:
        if name in ARITH_TOOLS:
            a, b = float(args["a"]), float(args["b"])
            if name == "divide" and b == 0:
                return "error: division by zero"
            ops: dict[str, Callable[[float, float], float]] = {
                "add": lambda x, y: x + y,
                "subtract": lambda x, y: x - y,
                "multiply": lambda x, y: x * y,
                "divide": lambda x, y: x / y,
            }
            return fmt_number(ops[name](a, b))
        if name == "convert_units":
            return fmt_number(_convert(float(args["value"]), str(args["from_unit"]), str(args["to_unit"])))
        if name == "get_table":
            topic = str(args["topic"])
            if tables is None or topic not in tables:
                return f"error: no table for {topic}"
            return tables[topic]
    except (KeyError, TypeError, ValueError) as exc:
        return f"error: {exc}"
    return f"error: unknown tool {name}"


# ----- phrasings ----------------------------------------------------------------------------------
# {a} and {b} are the operands; each list is split into training and held-out phrasings below.
ARITH_PHRASES: dict[str, tuple[list[str], list[str]]] = {
    "add": (
        [
            "What is {a} + {b}?",
            "Add {a} and {b}.",
            "What is {a} plus {b}?",
            "Please add {a} to {b}.",
            "Compute the sum of {a} and {b}.",
            "{a} + {b} = ?",
            "Can you add {a} and {b} for me?",
            "I have {a} apples and get {b} more. How many apples do I have?",
            "sum {a} {b}",
            "What do you get when you add {a} and {b}?",
        ],
        [
            "How much is {a} plus {b}?",
            "Could you work out {a} + {b}?",
            "Tell me the total of {a} and {b}.",
            "If I combine {a} and {b}, what is the result?",
            "calculate {a}+{b}",
        ],
    ),
    "subtract": (
        [
            "What is {a} - {b}?",
            "Subtract {b} from {a}.",
            "What is {a} minus {b}?",
            "Compute {a} minus {b}.",
            "{a} - {b} = ?",
            "I had {a} dollars and spent {b}. How much is left?",
            "Take {b} away from {a}.",
            "What is the difference between {a} and {b}?",
        ],
        [
            "How much is {a} take away {b}?",
            "Could you work out {a} - {b}?",
            "What remains if you remove {b} from {a}?",
            "calculate {a}-{b}",
        ],
    ),
    "multiply": (
        [
            "What is {a} * {b}?",
            "Multiply {a} by {b}.",
            "What is {a} times {b}?",
            "Compute the product of {a} and {b}.",
            "{a} x {b} = ?",
            "There are {a} boxes with {b} items each. How many items in total?",
            "Can you multiply {a} and {b}?",
            "What is {a} multiplied by {b}?",
        ],
        [
            "How much is {a} times {b}?",
            "Could you work out {a} * {b}?",
            "Give me the product {a} x {b}, please.",
            "calculate {a}*{b}",
        ],
    ),
    "divide": (
        [
            "What is {a} / {b}?",
            "Divide {a} by {b}.",
            "What is {a} divided by {b}?",
            "Compute {a} over {b}.",
            "{a} / {b} = ?",
            "Split {a} into {b} equal parts. How big is each part?",
            "What is the quotient of {a} and {b}?",
        ],
        [
            "How much is {a} divided by {b}?",
            "Could you work out {a} / {b}?",
            "If {a} is shared among {b} people, how much does each get?",
            "calculate {a}/{b}",
        ],
    ),
}
CONVERT_PHRASES = (
    [
        "Convert {v} {src} to {dst}.",
        "How many {dst} is {v} {src}?",
        "What is {v} {src} in {dst}?",
        "{v} {src} to {dst}",
        "Please convert {v} {src} into {dst}.",
        "I need {v} {src} expressed in {dst}.",
    ],
    [
        "How much is {v} {src} when measured in {dst}?",
        "Could you turn {v} {src} into {dst}?",
        "change {v} {src} into {dst} please",
    ],
)
TABLE_PHRASES = (
    [
        "What is the {col} of {name}?",
        "Look up the {col} of {name}.",
        "Find the {col} of the {noun} {name}.",
        "Tell me the {col} of {name} from the {topic} table.",
        "{name}: what is its {col}?",
    ],
    [
        "Do you know the {col} of {name}?",
        "Check the {topic} table: what {col} does {name} have?",
        "I'd like the {col} for {name}.",
    ],
)
TWO_STEP_PHRASES = (
    [
        "Add {a} and {b}, then multiply the result by {c}.",
        "What is ({a} + {b}) * {c}?",
        "Multiply {a} by {b} and then subtract {c}.",
        "What is {a} * {b} - {c}?",
        "Subtract {b} from {a}, then add {c}.",
        "What is ({a} - {b}) + {c}?",
        "Add {a} and {b}, then divide by {c}.",
        "What is ({a} + {b}) / {c}?",
    ],
    [
        "First add {a} to {b}, and multiply that by {c}.",
        "Take the product of {a} and {b} and remove {c} from it.",
        "Start from {a}, take away {b}, then add {c}. What do you get?",
        "Sum {a} and {b}; divide the sum by {c}.",
    ],
)
# (first op, second op) of each two-step phrase, in order, for both lists.
_TWO_STEP_OPS = (("add", "multiply"), ("multiply", "subtract"), ("subtract", "add"), ("add", "divide"))
CHATS = (
    [
        ("Hi!", "Hello! How can I help you today?"),
        ("Hello", "Hello! How can I help you today?"),
        ("Who are you?", "I am a small demo model served by k2serve. I can do arithmetic with tools."),
        ("Thanks!", "You're welcome!"),
        ("Thank you.", "You're welcome!"),
        ("Good morning", "Good morning! How can I help you today?"),
        (
            "What can you do?",
            "I can add, subtract, multiply and divide numbers, convert units and look up facts, using the tools you give me.",
        ),
        ("Bye", "Goodbye!"),
        ("How are you?", "I'm fine, thank you. How can I help you today?"),
    ],
    [
        ("Hey there", "Hello! How can I help you today?"),
        ("thanks a lot", "You're welcome!"),
        (
            "what are you able to help with?",
            "I can add, subtract, multiply and divide numbers, convert units and look up facts, using the tools you give me.",
        ),
    ],
)
_FINAL = {
    "add": ["The sum is {r}.", "{a} + {b} = {r}.", "The answer is {r}."],
    "subtract": ["The difference is {r}.", "{a} - {b} = {r}.", "The answer is {r}."],
    "multiply": ["The product is {r}.", "{a} * {b} = {r}.", "The answer is {r}."],
    "divide": ["The quotient is {r}.", "{a} / {b} = {r}.", "The answer is {r}."],
}


# ----- varied training phrasings (`train-demo --phrasings varied`) ----------------------------------
# The fixed TRAIN templates above are few, and a model this small learns where in each template the
# numbers sit instead of reading them: on the held-out phrasings it picks the wrong number. The varied
# mode composes training questions from parts (an operand expression, a wrapper around it, optional
# words before and after), tens of thousands of shapes, so that the numbers, units and names move about
# and only reading them works. No composed question matches a held-out template (tested), and the
# held-out set is unchanged.
_EXPR: dict[str, tuple[str, ...]] = {
    "add": (
        "{a} + {b}",
        "{a}+{b}",
        "{a} plus {b}",
        "the sum of {a} and {b}",
        "{a} and {b} added together",
        "{a} added to {b}",
        "{a} + {b} together",
        "the sum {a} + {b}",
    ),
    "subtract": (
        "{a} - {b}",
        "{a}-{b}",
        "{a} minus {b}",
        "{b} subtracted from {a}",
        "the difference of {a} and {b}",
        "{a} less {b}",
        "{a} reduced by {b}",
        "the difference {a} - {b}",
    ),
    "multiply": (
        "{a} * {b}",
        "{a}*{b}",
        "{a} x {b}",
        "{a} times {b}",
        "the product of {a} and {b}",
        "{a} multiplied by {b}",
        "{a} x{b}",
        "the product {a} * {b}",
    ),
    "divide": (
        "{a} / {b}",
        "{a}/{b}",
        "{a} divided by {b}",
        "the quotient of {a} and {b}",
        "{a} over {b}",
        "{a} divided into {b} parts",
        "the ratio of {a} to {b}",
        "the quotient {a} / {b}",
    ),
}
_WRAP = (
    "What is {e}?",
    "What's {e}?",
    "what is {e}",
    "{e}",
    "{e}?",
    "{e} = ?",
    "{e}=?",
    "Compute {e}.",
    "compute {e}",
    "Evaluate {e}.",
    "evaluate {e}",
    "Find {e}.",
    "Please find {e}.",
    "Can you compute {e}?",
    "Could you find {e}?",
    "Tell me {e}.",
    "I want to know {e}.",
    "Quick question: what is {e}?",
    "Solve {e}",
    "Help me find {e}.",
    "Figure out {e}.",
    "Determine {e}, please.",
    "What does {e} come to?",
    "Result of {e}?",
    "{e}, please.",
    "Give me {e}.",
    "I need {e}.",
    "Do {e} for me.",
    "So what is {e}?",
    "Work {e}",
    "What would {e} be?",
    "Please tell me what {e} is.",
    "Answer this: {e}",
)
# whole sentences per op (the verb carries the operation), on top of the fixed TRAIN templates
_VERB: dict[str, tuple[str, ...]] = {
    "add": ("Add {a} to {b}.", "add {a} and {b}", "Please add {a} and {b} together.", "Add up {a} and {b}."),
    "subtract": (
        "Subtract {b} from {a}.",
        "subtract {b} from {a}",
        "From {a}, subtract {b}.",
        "Deduct {b} from {a}.",
    ),
    "multiply": (
        "Multiply {a} by {b}.",
        "multiply {a} and {b}",
        "Multiply {a} with {b}, please.",
        "Multiply together {a} and {b}.",
    ),
    "divide": (
        "Divide {a} by {b}.",
        "divide {a} by {b}",
        "Please divide {a} by {b}.",
        "Divide {a} into {b} equal parts.",
    ),
}
_BEFORE = (
    "",
    "",
    "",
    "",
    "Hi! ",
    "Hey, ",
    "Hello. ",
    "OK, ",
    "One more: ",
    "Next one. ",
    "Quick one: ",
    "Please, ",
)
_AFTER = (
    "",
    "",
    "",
    "",
    " Thanks!",
    " Thank you.",
    " Please.",
    " Use the tool.",
    " Thanks in advance.",
    " :)",
)
_CONVERT_EXPR = (
    "{v} {src} in {dst}",
    "{v} {src} to {dst}",
    "{v} {src} as {dst}",
    "{v} {src} expressed in {dst}",
    "{v} {src} converted to {dst}",
    "{v} {src} into {dst}",
)
_CONVERT_WRAP = (
    "What is {e}?",
    "Convert {e}.",
    "convert {e}",
    "{e}",
    "{e}?",
    "Please convert {e}.",
    "Express {e}.",
    "Can you convert {e}?",
    "Give me {e}.",
    "I need {e}.",
    "Quick question: what is {e}?",
    "Tell me {e}.",
)
_CONVERT_WHOLE = (
    "How many {dst} are in {v} {src}?",
    "How many {dst} is {v} {src}?",
    "how many {dst} in {v} {src}",
    "What is {v} {src} when converted to {dst}?",
    "I have {v} {src}. How many {dst} is that?",
    "{v} {src} equals how many {dst}?",
    "Convert from {src} to {dst}: {v}",
    "In {dst}, what is {v} {src}?",
)
_TABLE_WHOLE = (
    "What is the {col} of {name}?",
    "What's the {col} of {name}?",
    "{col} of {name}?",
    "Find the {col} of {name}.",
    "Look up {name}: what is the {col}?",
    "Which {col} does the {noun} {name} have?",
    "Give me the {col} of {name}.",
    "What {col} is listed for {name}?",
    "The {col} of {name}, please.",
    "Search the {topic} table for {name}'s {col}.",
    "Tell me {name}'s {col}.",
    "How about the {col} of {name}?",
    "Get the {col} of the {noun} {name}.",
    "I need the {col} of {name} from the {topic} table.",
    "{name}'s {col}?",
    "Please look up the {col} of {name}.",
)
_TWO_STEP_VARIED: tuple[tuple[str, ...], ...] = (  # per _TWO_STEP_OPS
    (
        "({a} + {b}) * {c}",
        "({a}+{b})*{c}",
        "Compute ({a} + {b}) x {c}.",
        "Take the sum of {a} and {b}, then multiply it by {c}.",
        "Multiply the sum of {a} and {b} by {c}.",
        "Add {a} plus {b} and then times {c}.",
        "What do you get if you add {a} and {b} and multiply by {c}?",
        "First the sum of {a} and {b}, then that times {c}.",
    ),
    (
        "{a} * {b} - {c}",
        "{a}*{b}-{c}",
        "Compute {a} x {b} minus {c}.",
        "Take the product of {a} and {b}, then subtract {c}.",
        "Subtract {c} from the product of {a} and {b}.",
        "Multiply {a} and {b}, then minus {c}.",
        "What do you get if you multiply {a} by {b} and subtract {c}?",
        "First {a} times {b}, then less {c}.",
    ),
    (
        "({a} - {b}) + {c}",
        "({a}-{b})+{c}",
        "Compute {a} minus {b} plus {c}.",
        "Take the difference of {a} and {b}, then add {c}.",
        "Add {c} to the difference of {a} and {b}.",
        "Subtract {b} from {a} and then plus {c}.",
        "What do you get if you subtract {b} from {a} and add {c}?",
        "First {a} minus {b}, then add {c} to it.",
    ),
    (
        "({a} + {b}) / {c}",
        "({a}+{b})/{c}",
        "Compute ({a} + {b}) divided by {c}.",
        "Take the sum of {a} and {b}, then divide it by {c}.",
        "Divide the sum of {a} and {b} by {c}.",
        "Add {a} plus {b} and then split by {c}.",
        "What do you get if you add {a} and {b} and divide by {c}?",
        "First the sum of {a} and {b}, then that over {c}.",
    ),
)
_CHATS_VARIED = (
    ("Hi", "Hello! How can I help you today?"),
    ("Hi there!", "Hello! How can I help you today?"),
    ("Hey", "Hello! How can I help you today?"),
    ("Hey!", "Hello! How can I help you today?"),
    ("hello there", "Hello! How can I help you today?"),
    ("Good evening", "Good evening! How can I help you today?"),
    ("Good afternoon!", "Good afternoon! How can I help you today?"),
    ("Thanks", "You're welcome!"),
    ("thank you so much", "You're welcome!"),
    ("Many thanks!", "You're welcome!"),
    ("great, thanks", "You're welcome!"),
    ("What are you?", "I am a small demo model served by k2serve. I can do arithmetic with tools."),
    ("Who made you?", "I am a small demo model served by k2serve. I can do arithmetic with tools."),
    (
        "How can you help me?",
        "I can add, subtract, multiply and divide numbers, convert units and look up facts, using the tools you give me.",
    ),
    (
        "What are you good at?",
        "I can add, subtract, multiply and divide numbers, convert units and look up facts, using the tools you give me.",
    ),
    ("Goodbye", "Goodbye!"),
    ("See you", "Goodbye!"),
    ("how's it going?", "I'm fine, thank you. How can I help you today?"),
)


def _varied(rng: random.Random, sentence: str) -> str:
    """Optional words before and after a composed question (a capital after a greeting stays)."""
    before, after = rng.choice(_BEFORE), rng.choice(_AFTER)
    if before and sentence[:1].isupper() and before.endswith(", "):
        sentence = sentence[0].lower() + sentence[1:]
    return before + sentence + after


def varied_arith_phrase(rng: random.Random, op: str) -> str:
    """A composed training question for `op` with {a} and {b}: a fixed TRAIN template, a verb sentence,
    or an operand expression in a wrapper."""
    r = rng.random()
    if r < 0.15:
        core = rng.choice(ARITH_PHRASES[op][0])
    elif r < 0.3:
        core = rng.choice(_VERB[op])
    else:
        core = rng.choice(_WRAP).replace("{e}", rng.choice(_EXPR[op]))
    return _varied(rng, core)


def varied_convert_phrase(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        core = rng.choice(CONVERT_PHRASES[0])
    elif r < 0.45:
        core = rng.choice(_CONVERT_WHOLE)
    else:
        core = rng.choice(_CONVERT_WRAP).replace("{e}", rng.choice(_CONVERT_EXPR))
    return _varied(rng, core)


def varied_table_phrase(rng: random.Random) -> str:
    return _varied(rng, rng.choice(TABLE_PHRASES[0] + list(_TABLE_WHOLE)))


def varied_two_step_phrase(rng: random.Random, which: int) -> str:
    fixed = TWO_STEP_PHRASES[0][2 * which : 2 * which + 2]
    return _varied(rng, rng.choice(list(fixed) + list(_TWO_STEP_VARIED[which])))


@dataclass
class Sample:
    """A conversation to learn (or to evaluate: `messages[:1 + system]` is the question).

    `expected` is the number (as text) the final answer must contain, `calls` the tool calls (name,
    arguments) the model must make in order, `tables` what `get_table` returns in this sample."""

    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    expected: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)


class _Gen:
    """One sample generator: `split` 0 = training phrasings, 1 = held-out phrasings; `varied` (training
    only): composed phrasings (`varied_arith_phrase` etc.) instead of the fixed TRAIN templates."""

    def __init__(self, rng: random.Random, split: int, varied: bool = False) -> None:
        self.rng = rng
        self.split = split
        self.varied = varied and split == 0

    def number(self) -> int:
        """Operands: mostly 1-3 digits (one token each), some 4-5 digits."""
        r = self.rng.random()
        if r < 0.15:
            return self.rng.randint(0, 20)
        if r < 0.55:
            return self.rng.randint(21, 999)
        if r < 0.85:
            return self.rng.randint(1000, 9999)
        return self.rng.randint(10000, 99999)

    def pick(self, pair: tuple[list[str], list[str]]) -> str:
        return self.rng.choice(pair[self.split])

    def tools_with(self, needed: Sequence[str], exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The needed tools plus 0-2 others (mostly none: shorter prompts train faster), shuffled;
        never one in `exclude`."""
        others = [t for t in ALL_TOOLS if t not in needed and t not in exclude]
        extra = self.rng.choices((0, 1, 2), (0.5, 0.35, 0.15))[0] + (0 if needed else 1)
        chosen = list(needed) + self.rng.sample(others, min(extra, len(others)))
        self.rng.shuffle(chosen)
        return [tool_spec(t) for t in chosen]

    def conversation(self, question: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        del tools
        msgs: list[dict[str, Any]] = []
        if self.rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a helpful assistant. Use the tools."})
        msgs.append({"role": "user", "content": question})
        return msgs

    def sample(self, kind: str) -> Sample:
        return {
            "arith": self.arith,
            "convert": self.convert,
            "table": self.table,
            "two_step": self.two_step,
            "refuse": self.refuse,
            "chat": self.chat,
            "copy": self.copy,
        }[kind]()

    def arith(self) -> Sample:
        op = self.rng.choice(ARITH_TOOLS)
        a, b = self.number(), self.number()
        if op == "subtract" and self.rng.random() < 0.7 and b > a:
            a, b = b, a
        if op == "divide":
            b = self.rng.randint(1, 99)
            if self.rng.random() < 0.6:
                a = b * self.rng.randint(1, 999)
        question = self.arith_phrase(op).format(a=a, b=b)
        s = Sample("arith", self.conversation(question, []), self.tools_with([op]))
        self.call_chain(s, [(op, {"a": a, "b": b})], final=self.rng.choice(_FINAL[op]))
        return s

    def arith_phrase(self, op: str) -> str:
        return varied_arith_phrase(self.rng, op) if self.varied else self.pick(ARITH_PHRASES[op])

    def call_chain(self, s: Sample, calls: list[tuple[str, dict[str, Any]]], final: str) -> None:
        """Append to `s` one assistant tool call + tool result per call, then the final answer.

        An argument given as the string "$prev" is the previous call's result."""
        prev = ""
        result = ""
        for idx, (name, args) in enumerate(calls):
            real = {k: (json.loads(prev) if v == "$prev" else v) for k, v in args.items()}
            call_id = f"functions.{name}:{idx}"
            s.messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": json.dumps(real)},
                        }
                    ],
                }
            )
            s.calls.append((name, real))
            result = execute_tool(name, real, s.tables)
            s.messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
            prev = result
        fields = dict(calls[0][1]) if calls else {}
        s.expected = result
        think = f"The tool returned {result}." if len(calls) == 1 else f"The last tool returned {result}."
        s.messages.append(
            {
                "role": "assistant",
                "reasoning_content": think,
                "content": final.format(r=result, **{k: v for k, v in fields.items() if k in ("a", "b")}),
            }
        )

    def convert(self) -> Sample:
        dim = self.rng.choice(["length", "mass", "volume", "temperature"])
        units = [u for u, (d, _) in UNITS.items() if d == dim]
        src, dst = self.rng.sample(units, 2)
        v = (
            self.rng.randint(0, 120)
            if dim == "temperature"
            else self.rng.choice([self.rng.randint(1, 999), self.number()])
        )
        phrase = varied_convert_phrase(self.rng) if self.varied else self.pick(CONVERT_PHRASES)
        dst_word = self.rng.choice(UNIT_WORDS[dst]) if self.varied else UNIT_WORDS[dst][0]
        question = phrase.format(v=v, src=self.rng.choice(UNIT_WORDS[src]), dst=dst_word)
        s = Sample("convert", self.conversation(question, []), self.tools_with(["convert_units"]))
        final = self.rng.choice(["{v} {s} is {r} {d}.", "That is {r} {d}."])
        args = {"value": v, "from_unit": src, "to_unit": dst}
        self.call_chain(s, [("convert_units", args)], final="")
        s.messages[-1]["content"] = final.format(
            v=v, s=UNIT_WORDS[src][0], r=s.expected, d=UNIT_WORDS[dst][0]
        )
        return s

    def name(self) -> str:
        return "".join(self.rng.choice(_SYLLABLES) for _ in range(self.rng.randint(2, 3))).capitalize()

    def table(self) -> Sample:
        topic = self.rng.choice(list(TABLE_TOPICS))
        noun, col, unit = TABLE_TOPICS[topic]
        names = list(dict.fromkeys(self.name() for _ in range(self.rng.randint(3, 6))))
        values = [self.rng.randint(1, 9999) if col != "moons" else self.rng.randint(0, 99) for _ in names]
        rows = "\n".join(f"| {n} | {v} |" for n, v in zip(names, values, strict=True))
        target = self.rng.randrange(len(names))
        phrase = varied_table_phrase(self.rng) if self.varied else self.pick(TABLE_PHRASES)
        question = phrase.format(col=col, name=names[target], noun=noun, topic=topic)
        s = Sample("table", self.conversation(question, []), self.tools_with(["get_table"]))
        s.tables = {topic: f"| {noun} | {col} |\n{rows}"}
        self.call_chain(s, [("get_table", {"topic": topic})], final="")
        value = str(values[target])
        s.expected = value
        suffix = f" {unit}" if unit else ""
        s.messages[-1]["reasoning_content"] = f"The row of {names[target]} says {value}."
        s.messages[-1]["content"] = f"The {col} of {names[target]} is {value}{suffix}."
        return s

    def two_step(self) -> Sample:
        which = self.rng.randrange(len(_TWO_STEP_OPS))
        first, second = _TWO_STEP_OPS[which]
        a, b = self.rng.randint(1, 999), self.rng.randint(1, 999)
        if first == "subtract" and b > a:
            a, b = b, a
        c = self.rng.randint(2, 20) if second in ("multiply", "divide") else self.rng.randint(1, 999)
        phrases = TWO_STEP_PHRASES[self.split]
        # phrases come in pairs per op chain: index 2 * which (+ 1 in training)
        if self.varied:
            question = varied_two_step_phrase(self.rng, which)
        else:
            question = phrases[2 * which + self.rng.randrange(2)] if self.split == 0 else phrases[which]
        question = question.format(a=a, b=b, c=c)
        s = Sample("two_step", self.conversation(question, []), self.tools_with([first, second]))
        self.call_chain(
            s, [(first, {"a": a, "b": b}), (second, {"a": "$prev", "b": c})], final="The result is {r}."
        )
        return s

    def refuse(self) -> Sample:
        kind = self.rng.choice(["arith", "arith", "convert", "table"])
        if kind == "arith":
            op = self.rng.choice(ARITH_TOOLS)
            question = self.arith_phrase(op).format(a=self.number(), b=self.rng.randint(1, 999))
            needed = op
        elif kind == "convert":
            question = self.pick(CONVERT_PHRASES).format(v=self.rng.randint(1, 999), src="km", dst="miles")
            needed = "convert_units"
        else:
            question = self.pick(TABLE_PHRASES).format(
                col="population", name=self.name(), noun="city", topic="cities"
            )
            needed = "get_table"
        tools = self.tools_with([], exclude=[needed]) if self.rng.random() < 0.8 else []
        s = Sample("refuse", self.conversation(question, []), tools)
        s.messages.append(
            {
                "role": "assistant",
                "reasoning_content": f"This needs the {needed} tool, which is not available.",
                "content": f"I can't answer that: the {needed} tool is not available to me.",
            }
        )
        s.expected = needed
        return s

    def chat(self) -> Sample:
        q, a = self.rng.choice(CHATS[0] + list(_CHATS_VARIED) if self.varied else CHATS[self.split])
        tools = self.tools_with([]) if self.rng.random() < 0.6 else []
        s = Sample("chat", self.conversation(q, []), tools)
        s.messages.append(
            {"role": "assistant", "reasoning_content": "A greeting or chat; no tool needed.", "content": a}
        )
        s.expected = a
        return s

    def copy(self) -> Sample:
        """A short copy drill without tools: repeat numbers, name the first/last one, write them as the
        tool-argument JSON, or answer with a result the user quotes (the copies tool use needs)."""
        nums = [self.number() for _ in range(self.rng.randint(1, 4))]
        drill = self.rng.randrange(4)
        if drill == 0:
            listed = " ".join(map(str, nums))
            question, answer = f"Repeat after me: {listed}", listed
        elif drill == 1:
            nums = nums + [self.number()] if len(nums) == 1 else nums
            which = self.rng.choice(["first", "last"])
            pick = nums[0] if which == "first" else nums[-1]
            question = f"Which number comes {which}: {', '.join(map(str, nums))}?"
            answer = f"The {which} number is {pick}."
        elif drill == 2:
            a, b = self.number(), self.number()
            question = f"Write a = {a} and b = {b} as JSON."
            answer = json.dumps({"a": a, "b": b})
        else:
            r = fmt_number(nums[0] / self.rng.choice([1, 1, 1, 4, 8]))
            question = f"The tool returned {r}. What is the answer?"
            answer = f"The answer is {r}."
        s = Sample("copy", self.conversation(question, []), [])
        s.messages.append({"role": "assistant", "reasoning_content": "Copy the numbers.", "content": answer})
        s.expected = answer
        return s


def _samples(
    n: int,
    seed: int,
    split: int,
    kinds: Sequence[str] | None,
    kind_weights: Sequence[float] | None = None,
    varied: bool = False,
) -> list[Sample]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not a secret
    gen = _Gen(rng, split, varied)
    pool = list(kinds) if kinds else list(KINDS)
    table = tuple(kind_weights or KIND_WEIGHTS)
    if len(table) > len(KINDS) or any(w < 0 for w in table) or not any(table):
        raise ValueError(
            f"kind weights {table} must be at most {len(KINDS)} non-negative numbers (per {KINDS})"
        )
    table += (0.0,) * (len(KINDS) - len(table))  # kinds left off (e.g. a mix from before "copy"): 0
    weights = [table[KINDS.index(k)] for k in pool]
    return [gen.sample(rng.choices(pool, weights)[0]) for _ in range(n)]


def training_samples(
    n: int, seed: int = 0, kind_weights: Sequence[float] | None = None, varied: bool = False
) -> list[Sample]:
    """`n` training conversations from the training phrasings (deterministic in `seed`); `kind_weights`
    (per KINDS) changes the mix, default KIND_WEIGHTS; `varied`: composed phrasings (see `_EXPR`)."""
    return _samples(n, seed, 0, None, kind_weights, varied)


HELDOUT_SEED = 20261207


def heldout_samples(n: int, seed: int = HELDOUT_SEED, kinds: Sequence[str] | None = None) -> list[Sample]:
    """`n` evaluation conversations from the held-out phrasings (none appears in training)."""
    return _samples(n, seed, 1, kinds)


def render_sample(tok: KimiTokenizer, s: Sample) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a mask: 1 on the tokens of assistant turns (what the
    model generates after the generation prompt, reasoning and `<|im_end|>` included), 0 elsewhere.

    Each assistant turn is rendered as the model produces it (after the prompt of the turns before
    it, its reasoning kept), not as the template re-renders history (which drops old reasoning)."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    tools = s.tools or None
    for i, msg in enumerate(s.messages):
        if msg["role"] != "assistant":
            continue
        prompt = apply_chat_template(s.messages[:i], tools, add_generation_prompt=True)
        _extend(tok, ids, mask, prompt, done, 0)
        target = render_message(msg, keep_reasoning=True).removeprefix(GENERATION_PROMPT)
        _extend(tok, ids, mask, prompt + target, prompt, 1)
        done = prompt + target
    return ids, mask


def _extend(tok: KimiTokenizer, ids: list[int], mask: list[int], text: str, done: str, flag: int) -> None:
    """Append the tokens of `text` past its prefix `done` (which must be a prefix) with mask `flag`."""
    if not text.startswith(done):
        raise ValueError("a conversation's rendering is not a prefix of its continuation")
    new = tok.encode(text[len(done) :])
    ids.extend(new)
    mask.extend([flag] * len(new))


def corpus_text(samples: Sequence[Sample]) -> str:
    """The rendered conversations with the special tokens cut out: what the BPE ranks learn from."""
    from k2serve.chat.vocab import NAMED_SPECIAL_OFFSETS

    text = "\n".join(
        apply_chat_template(s.messages, s.tools or None, add_generation_prompt=False) for s in samples
    )
    for name in NAMED_SPECIAL_OFFSETS.values():
        text = text.replace(name, "\n")
    return text
