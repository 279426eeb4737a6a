"""Facts about the Kimi vocabulary shared by the tokenizer, the BPE trainer and the parsers.

Special ids follow the BPE ranks: with `num_ranks` mergeable ranks the 256 special ids are
`num_ranks .. num_ranks + 255` (163584..163839 for the real model). Named ones sit at fixed
offsets in that block; the others are `<|reserved_token_{id}|>`.
"""

from __future__ import annotations

NUM_SPECIAL_TOKENS = 256

# Text forms of the special tokens the chat layer reads and writes.
BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
UNK = "[UNK]"
PAD = "[PAD]"

# Offset inside the special block -> name (Kimi-K2: id = 163584 + offset).
NAMED_SPECIAL_OFFSETS: dict[int, str] = {
    0: BOS,
    1: EOS,
    2: IM_END,
    3: IM_USER,
    4: IM_ASSISTANT,
    10: IM_SYSTEM,
    11: TOOL_CALLS_SECTION_BEGIN,
    12: TOOL_CALLS_SECTION_END,
    13: TOOL_CALL_BEGIN,
    14: TOOL_CALL_ARGUMENT_BEGIN,
    15: TOOL_CALL_END,
    17: IM_MIDDLE,
    22: THINK_BEGIN,
    23: THINK_END,
    254: UNK,
    255: PAD,
}

# Kimi's pre-tokenizer split pattern (tiktoken / fancy-regex syntax with class intersection
# `&&`): runs of Han characters are their own pieces; other letters split on case like
# cl100k; digits in groups of at most three; punctuation runs; whitespace runs.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTIONS}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTIONS}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


def special_token_names(num_ranks: int) -> dict[int, str]:
    """Default id -> name map of the 256 special tokens that follow `num_ranks` BPE ranks."""
    return {
        num_ranks + off: NAMED_SPECIAL_OFFSETS.get(off, f"<|reserved_token_{num_ranks + off}|>")
        for off in range(NUM_SPECIAL_TOKENS)
    }
