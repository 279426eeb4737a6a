"""Shared fixtures: small random checkpoints written once per session, the repo's sibling ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: ../shared (reference files) exists only in the k2serve workspace")
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, fp32 weights, seed 0, with its tokenizer."""
    from k2serve.model.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_int4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k2serve.model.checkpoint import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("tiny_int4"), "tiny", seed=0, quant="int4", dtype=torch.float32
    )
