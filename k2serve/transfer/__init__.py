"""KV-cache transfer between prefill and decode workers (torch.distributed and gRPC backends)."""
