"""The OpenAI-compatible HTTP front door (FastAPI): chat/completions endpoints, sessions, metrics, `serve`.

It talks to generation only through `k2serve.engine.protocol.GenerationBackend` (local:
`k2serve.engine.async_engine.AsyncEngine`; cluster: the router's `ClusterBackend`); a chat request takes
the path every front door shares, `k2serve.chat.request`.
"""
