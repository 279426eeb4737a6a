"""The router: public gRPC and OpenAI-compatible HTTP APIs, worker registry and dispatch policy."""
