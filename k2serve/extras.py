"""The optional extras of the package: which pip extra brings which third-party module.

A module that needs a package outside the base install imports it inside
``try: ... except ImportError as e: raise MissingExtraError("module", "extra") from e`` so that a base
install fails with the command that fixes it, never a bare ModuleNotFoundError.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "MissingExtraError"]

# extra -> the modules it brings, top-level ones or subpackages of a namespace package (keep in step with
# pyproject.toml's optional-dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    "ray": ("ray",),
    "agent": ("openai",),
    "gpu": ("triton",),
    "plot": ("matplotlib",),
    "kube": ("kubernetes",),
    "hf": ("transformers",),
    "bench": ("jsonschema",),  # `k2serve bench tool-schemas` validates emitted calls
    "mooncake": ("mooncake",),  # --kv-store mooncake: the shared KV tier's Mooncake Store client
    # the opentelemetry namespace itself is in the base install (FastAPI requires opentelemetry-api)
    "tracing": (
        "opentelemetry.sdk",
        "opentelemetry.exporter.otlp.proto.http",
        "opentelemetry.exporter.otlp.proto.grpc",
    ),
}


class MissingExtraError(ImportError):
    """`module` is missing; the optional extra `extra` installs it."""

    def __init__(self, module: str, extra: str, purpose: str = "") -> None:
        if extra not in EXTRAS:
            raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
        self.module = module
        self.extra = extra
        needed = f" for {purpose}" if purpose else ""
        super().__init__(
            f"the {module!r} package is needed{needed} but is not installed; "
            f"install it with: pip install 'k2serve[{extra}]'",
            name=module,
        )
