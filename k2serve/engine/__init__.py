"""The single-node engine: scheduler, model runner, sampling and the offline LLM API."""
