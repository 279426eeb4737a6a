"""The chat layer: Kimi tokenizer, chat template, reasoning and tool-call parsers, structured output.

Text in, token ids out and back: `load_tokenizer` / `apply_chat_template` build prompts, the
parsers turn generated text into reasoning, content and tool calls. Grammar-constrained decoding
lives in `k2serve.chat.structured` (imported on its own: it needs the `llguidance` package); the chat
request path the front doors share (checks, prompt, grammar spec, output) in `k2serve.chat.request`.
"""

from k2serve.chat.bpe_train import train_bpe_ranks, write_tokenizer
from k2serve.chat.parsers import (
    DeltaEvent,
    EventKind,
    OutputParser,
    ParsedOutput,
    ReasoningParser,
    ToolCall,
    ToolCallParser,
    collect,
)
from k2serve.chat.template import ChatTemplateError, apply_chat_template, render_jinja_template
from k2serve.chat.tokenizer import IncrementalDecoder, KimiTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ChatTemplateError",
    "DeltaEvent",
    "EventKind",
    "IncrementalDecoder",
    "KimiTokenizer",
    "OutputParser",
    "ParsedOutput",
    "ReasoningParser",
    "TokenizerError",
    "ToolCall",
    "ToolCallParser",
    "apply_chat_template",
    "collect",
    "load_tokenizer",
    "render_jinja_template",
    "train_bpe_ranks",
    "write_tokenizer",
]
