"""The OpenAI-compatible HTTP API (FastAPI): chat/completions endpoints, prompt encoding, metrics, `serve`.

It talks to generation only through `protocol.GenerationBackend` (local: engine.async_engine.AsyncEngine).
"""
