"""k2serve: serving Kimi-K2 / DeepSeek-V3-architecture models across many machines."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # The offline API pulls in torch; import it lazily so `k2serve --help` stays fast.
    if name == "LLM":
        from k2serve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from k2serve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
