"""The chat layer: Kimi tokenizer, chat template, reasoning and tool-call parsers, structured output."""
