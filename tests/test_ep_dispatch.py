"""The EP MoE layer and live reshard against the single-process MoE, with the ranks as threads of
this process (gloo groups are per object, so threads make a real group; fast, no spawn)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.experts import EPComm, EPDispatcher, EPError, ExpertLoad, ExpertPlacement, plan_placement
from k2serve.experts.reshard import reshard_layer
from k2serve.model.loader import load_model

LAYER = 1  # the tiny preset's first MoE layer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(world: int, fn: Callable[[EPComm], Any], timeout_s: float = 10.0) -> list[Any]:
    """fn(comm) on `world` threads forming one group; returns results by rank, re-raises the first error."""
    port, results, errors = free_port(), [None] * world, []

    def body(rank: int) -> None:
        comm = None
        try:
            comm = EPComm.connect(f"tcp://127.0.0.1:{port}", rank, world, timedelta(seconds=timeout_s))
            results[rank] = fn(comm)
        except BaseException as e:  # reported to the test thread below
            errors.append(e)
        finally:
            if comm is not None:
                comm.close()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 3)
    assert not any(t.is_alive() for t in threads), "a rank thread did not finish"
    if errors:
        raise errors[0]
    return results


def tokens(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, 128, generator=torch.Generator().manual_seed(100 + rank))  # [T, D]


@pytest.mark.parametrize(
    ("world", "redundant", "counts"), [(1, 0, [5]), (2, 2, [7, 0]), (4, 1, [3, 9, 0, 1])]
)
def test_ep_moe_matches_single_process(
    tiny_ckpt: Path, world: int, redundant: int, counts: list[int]
) -> None:
    full = load_model(tiny_ckpt, torch.float32).layers[LAYER].mlp
    placement = ExpertPlacement.contiguous(16, world, redundant)
    load = [ExpertLoad(1, 16) for _ in range(world)]

    def fn(comm: EPComm) -> torch.Tensor:
        moe = load_model(tiny_ckpt, torch.float32, expert_ids=placement.owned(comm.rank)).layers[LAYER].mlp
        moe.dispatch = EPDispatcher(comm, LAYER, 0, placement, load[comm.rank])
        with torch.inference_mode():
            return moe(tokens(comm.rank, counts[comm.rank]))

    outs = run_group(world, fn)
    with torch.inference_mode():
        for r, y in enumerate(outs):
            assert y.shape == (counts[r], 128)
            if counts[r]:
                assert (y - full(tokens(r, counts[r]))).abs().max() < 1e-5
    assert int(sum(x.counts.sum() for x in load)) == sum(counts) * 6  # top-6 slots per token


def test_all_ranks_empty(tiny_ckpt: Path) -> None:
    placement = ExpertPlacement.contiguous(16, 2)

    def fn(comm: EPComm) -> tuple[int, ...]:
        moe = load_model(tiny_ckpt, torch.float32, expert_ids=placement.owned(comm.rank)).layers[LAYER].mlp
        moe.dispatch = EPDispatcher(comm, LAYER, 0, placement, None)
        with torch.inference_mode():
            return tuple(moe(torch.zeros(0, 128)).shape)

    assert run_group(2, fn) == [(0, 128), (0, 128)]


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_reshard_then_forward_is_unchanged(tiny_ckpt: Path, tiny_int4_ckpt: Path, quant: str) -> None:
    ckpt = tiny_int4_ckpt if quant == "int4" else tiny_ckpt
    full = load_model(ckpt, torch.float32).layers[LAYER].mlp
    old = ExpertPlacement.contiguous(16, 2, redundant_per_rank=1)
    new = plan_placement(torch.arange(16) ** 2, [9, 9])  # hot high ids: replicated and moved
    assert new != old

    def fn(comm: EPComm) -> tuple[list[int], torch.Tensor]:
        moe = load_model(ckpt, torch.float32, expert_ids=old.owned(comm.rank)).layers[LAYER].mlp
        moe.dispatch = d = EPDispatcher(comm, LAYER, 0, old, None)
        reshard_layer(comm, moe.experts, old, new, LAYER)
        d.set_placement(new)
        with torch.inference_mode():
            return list(moe.experts.expert_ids), moe(tokens(comm.rank, 6))

    outs = run_group(2, fn)
    with torch.inference_mode():
        for r, (ids, y) in enumerate(outs):
            assert tuple(ids) == new.owned(r)
            assert (y - full(tokens(r, 6))).abs().max() < 1e-5


def test_out_of_step_placement_is_a_typed_error(tiny_ckpt: Path) -> None:
    placement = ExpertPlacement.contiguous(16, 1)

    def fn(comm: EPComm) -> None:
        moe = load_model(tiny_ckpt, torch.float32, expert_ids=list(range(15, -1, -1))).layers[LAYER].mlp
        moe.dispatch = EPDispatcher(comm, LAYER, 0, placement, None)
        moe(tokens(0, 2))

    with pytest.raises(EPError, match="MoE layer 1") as info:
        run_group(1, fn)
    assert info.value.layer == LAYER and info.value.where == "dispatch"
