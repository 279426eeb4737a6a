"""The EP MoE layer, live reshard and EPWorker's lockstep against the single-process model, with the
ranks as threads of this process (gloo groups are per object, so threads make a real group; no spawn)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import RequestError
from k2serve.experts import (
    EPComm,
    EPDispatcher,
    EPError,
    EPWorker,
    ExpertLoad,
    ExpertPlacement,
    plan_placement,
)
from k2serve.experts.reshard import reshard_layer
from k2serve.experts.state import EPState
from k2serve.model import moe
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
        except BaseException as e:  # noqa: BLE001 - reported to the test thread below
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
    ("world", "redundant", "counts", "dtype"),
    [
        (1, 0, [5], torch.float32),
        (2, 2, [7, 0], torch.float32),
        (4, 1, [3, 9, 0, 1], torch.float32),
        (2, 1, [6, 4], torch.bfloat16),  # activations cross the wire in bf16
    ],
)
def test_ep_moe_matches_single_process(
    tiny_ckpt: Path, world: int, redundant: int, counts: list[int], dtype: torch.dtype
) -> None:
    full = load_model(tiny_ckpt, dtype).layers[LAYER].mlp
    placement = ExpertPlacement.contiguous(16, world, redundant)
    load = [ExpertLoad(1, 16) for _ in range(world)]
    # Loaded here, not in the rank threads: load_model sets torch's (process-wide) default dtype.
    moes = [
        load_model(tiny_ckpt, dtype, expert_ids=placement.owned(r)).layers[LAYER].mlp for r in range(world)
    ]

    def fn(comm: EPComm) -> torch.Tensor:
        moe = moes[comm.rank]
        moe.dispatch = EPDispatcher(EPState(comm, (placement,), load[comm.rank]), LAYER, 0)
        with torch.inference_mode():
            return moe(tokens(comm.rank, counts[comm.rank]).to(dtype))

    outs = run_group(world, fn)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: rounding after a different summation order
    with torch.inference_mode():
        for r, y in enumerate(outs):
            assert y.shape == (counts[r], 128) and y.dtype == dtype
            if counts[r]:
                want = full(tokens(r, counts[r]).to(dtype)).float()
                assert (y.float() - want).abs().max() <= tol * max(1.0, float(want.abs().max()))
    assert int(sum(x.counts.sum() for x in load)) == sum(counts) * 6  # top-6 slots per token


def test_all_ranks_empty(tiny_ckpt: Path) -> None:
    placement = ExpertPlacement.contiguous(16, 2)

    def fn(comm: EPComm) -> tuple[int, ...]:
        moe = load_model(tiny_ckpt, torch.float32, expert_ids=placement.owned(comm.rank)).layers[LAYER].mlp
        moe.dispatch = EPDispatcher(EPState(comm, (placement,)), LAYER, 0)
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

    def fn(comm: EPComm) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        moe = load_model(ckpt, torch.float32, expert_ids=old.owned(comm.rank)).layers[LAYER].mlp
        state = EPState(comm, (old,))
        moe.dispatch = EPDispatcher(state, LAYER, 0)
        with torch.inference_mode():
            before = moe(tokens(comm.rank, 6))
        reshard_layer(comm, moe.experts, old, new, LAYER)
        state.set_placement((new,))
        with torch.inference_mode():
            return list(moe.experts.expert_ids), before, moe(tokens(comm.rank, 6))

    outs = run_group(2, fn)
    with torch.inference_mode():
        for r, (ids, before, after) in enumerate(outs):
            assert tuple(ids) == new.owned(r)
            assert (after - full(tokens(r, 6))).abs().max() < 1e-5
            assert (after - before).abs().max() < 1e-5


@pytest.mark.parametrize("dense_min_rows", [1, 6, 10**9])  # all dense, mixed, all fused
def test_ep_int4_experts_match_dequantized_model(
    tiny_int4_ckpt: Path,
    tiny_int4_dequantized_ckpt: Path,
    int4_expert_rows: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    dense_min_rows: int,
) -> None:
    """INT4 experts (torch's CPU tiles) behind EP dispatch: experts with fewer received rows than
    INT4_DENSE_MIN_ROWS run the fused kernel, the others are dequantised; either way every rank's
    output equals the dequantised checkpoint's MoE layer."""
    monkeypatch.setitem(moe.INT4_DENSE_MIN_ROWS, torch.float32, dense_min_rows)
    reference = load_model(tiny_int4_dequantized_ckpt, torch.float32).layers[LAYER].mlp
    placement = ExpertPlacement.contiguous(16, 2)
    moes = [
        load_model(tiny_int4_ckpt, torch.float32, expert_ids=placement.owned(r), int4_layout="cpu")
        .layers[LAYER]
        .mlp
        for r in range(2)
    ]

    def fn(comm: EPComm) -> torch.Tensor:
        layer = moes[comm.rank]
        layer.dispatch = EPDispatcher(EPState(comm, (placement,)), LAYER, 0)
        with torch.inference_mode():
            return layer(tokens(comm.rank, 10))

    outs = run_group(2, fn)
    with torch.inference_mode():
        for r, y in enumerate(outs):
            want = reference(tokens(r, 10))
            assert (y - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    fused, dense = int4_expert_rows["fused"], int4_expert_rows["dense"]
    assert all(n < dense_min_rows for n in fused) and all(n >= dense_min_rows for n in dense)
    both = {1: (False, True), 6: (True, True), 10**9: (True, False)}[dense_min_rows]
    assert (bool(fused), bool(dense)) == both


def test_out_of_step_placement_is_a_typed_error(tiny_ckpt: Path) -> None:
    placement = ExpertPlacement.contiguous(16, 1)

    def fn(comm: EPComm) -> None:
        moe = load_model(tiny_ckpt, torch.float32, expert_ids=list(range(15, -1, -1))).layers[LAYER].mlp
        moe.dispatch = EPDispatcher(EPState(comm, (placement,)), LAYER, 0)
        moe(tokens(0, 2))

    with pytest.raises(EPError, match="MoE layer 1") as info:
        run_group(1, fn)
    assert info.value.layer == LAYER and info.value.where == "dispatch"


# ---- EPWorker, ranks as threads ------------------------------------------------------------------


def test_failed_step_keeps_the_group_in_lockstep(tiny_ckpt: Path) -> None:
    """A rank whose engine raises before its forward still runs an empty one, so the others' step
    completes; after it drops the request both ranks go on to finish."""
    engine = EngineConfig(num_kv_blocks=4, block_size=4)  # 16 token slots

    def fn(comm: EPComm) -> tuple[str, list[int]]:
        w = EPWorker(comm, tiny_ckpt, torch.float32, engine)
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        if comm.rank == 0:
            w.add_request("doomed", list(range(1, 10)), params)
            schedule = w.engine.scheduler.schedule

            def fail_once() -> Any:  # an engine error before the forward, once
                w.engine.scheduler.schedule = schedule
                raise RequestError("the scheduler failed")

            w.engine.scheduler.schedule = fail_once  # type: ignore[method-assign]
            with pytest.raises(RequestError, match="the scheduler failed"):
                w.step()
            assert w.abort_request("doomed")
        else:
            w.add_request("small", [5, 6, 7], params)
        done = w.run_until_idle()
        return ("small" if comm.rank else "none"), [t for o in done.values() for t in o.token_ids]

    outs = run_group(2, fn)
    assert outs[0] == ("none", []) and outs[1][0] == "small" and len(outs[1][1]) == 4


def test_per_layer_placement_and_global_load(tiny_ckpt: Path) -> None:
    layers = (plan_placement(torch.arange(16) ** 2, [9, 9]), ExpertPlacement.contiguous(16, 2, 1))
    model = load_model(tiny_ckpt, torch.float32)
    batches = [torch.randint(0, 1024, (n, 5), generator=torch.Generator().manual_seed(n)) for n in (3, 1)]

    def fn(comm: EPComm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
        w = EPWorker(comm, tiny_ckpt, torch.float32, placement=layers)
        logits = w.causal_logits(batches[comm.rank])
        held = [list(layer.mlp.experts.expert_ids) for layer in w.model.layers[1:]]
        return logits, w.expert_load(), w.global_expert_load(), held

    outs = run_group(2, fn)
    for r, (logits, _, total, held) in enumerate(outs):
        assert held == [list(p.owned(r)) for p in layers]
        assert (logits - model(batches[r])).abs().max() < 1e-4
        assert torch.equal(total, outs[0][1] + outs[1][1])
        assert total.sum(1).tolist() == [(3 + 1) * 5 * 6] * 2  # tokens * top-k, per MoE layer
