"""The worker runtime prefill and decode processes share: settings, engine loading (alone or as one
expert-parallel rank), the gRPC server, registration and heartbeats, draining shutdown."""
