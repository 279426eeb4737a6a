"""A dead or hung rank makes the others fail fast with an EPError naming the layer and the peer.

kill: rank 1 of 3 (or rank 0 of 2, the store's host) is SIGKILLed inside MoE layer 2 of its 4th
step; the others, waiting for it in that layer's first all_to_all, see the closed connection at once.
hang: rank 1 of 2 is SIGSTOPped by the test at an arbitrary point; rank 0 times out. The roll call
through the store names the lost rank (rank 0 when the store itself is gone).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.sampling_params import SamplingParams

TIMEOUT_S, ROLL_CALL_S = 1.5, 2.0
ENGINE = EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, ckpt: str, mode: str, victim: int, out: Any) -> None:
    torch.set_num_threads(1)
    from k2serve.experts import EPComm, EPError, EPWorker

    comm = EPComm.connect(
        f"tcp://127.0.0.1:{port}", rank, world, timedelta(seconds=TIMEOUT_S), timedelta(seconds=ROLL_CALL_S)
    )
    w = EPWorker(comm, ckpt, torch.float32, ENGINE)
    step = 0
    if mode == "kill" and rank == victim:
        moe = w.model.layers[2].mlp
        inner = moe.dispatch

        def dying(*args: Any) -> torch.Tensor:
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(*args)

        moe.dispatch = dying
    w.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    try:
        while True:
            w.step()
            step += 1
            if step == 3 and rank == victim and mode == "hang":
                out.put(("ready", rank, os.getpid()))
    except EPError as e:
        out.put(("error", rank, (e.where, e.layer, e.peers, str(e), time.monotonic())))
    finally:
        comm.close()


def launch(world: int, ckpt: Path, mode: str, victim: int) -> list[tuple[Any, ...]]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "k2serve.experts"])
    # One queue per rank: a rank stopped while holding a shared queue's write lock would block the others.
    queues = [ctx.Queue() for _ in range(world)]
    port = free_port()
    procs = [
        ctx.Process(target=run_rank, args=(r, world, port, str(ckpt), mode, victim, queues[r]), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    errors: list[tuple[Any, ...]] = []
    try:
        if mode == "hang":
            kind, rank, pid = queues[victim].get(timeout=60)
            assert (kind, rank) == ("ready", victim)
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
        else:
            procs[victim].join(timeout=60)
            assert procs[victim].exitcode == -signal.SIGKILL
            stopped_at = time.monotonic()
        for r in range(world):
            if r == victim:
                continue
            kind, rank, info = queues[r].get(timeout=TIMEOUT_S + ROLL_CALL_S + 20)
            assert kind == "error"
            errors.append((rank, *info[:4], info[4] - stopped_at))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return errors


@pytest.mark.parametrize(("world", "mode", "victim"), [(3, "kill", 1), (2, "kill", 0), (2, "hang", 1)])
def test_lost_rank_fails_the_others_fast(tiny_ckpt: Path, world: int, mode: str, victim: int) -> None:
    """victim 0 also hosts the store: the survivors cannot hold a roll call and name it for that."""
    errors = launch(world, tiny_ckpt, mode, victim)
    assert sorted(e[0] for e in errors) == [r for r in range(world) if r != victim]
    for rank, where, layer, peers, message, elapsed in errors:
        assert peers == (victim,), message
        assert f"expert-parallel rank {rank}" in message and f"suspected peer rank(s) [{victim}]" in message
        if mode == "kill":  # died inside layer 2: the others fail in its first all_to_all, at once
            assert (where, layer) == ("dispatch sizes", 2), message
            assert "MoE layer 2" in message
            assert elapsed < ROLL_CALL_S + 5
        else:  # hung: the collective times out
            assert elapsed < TIMEOUT_S + ROLL_CALL_S + 5


def test_a_restarted_rank_does_not_join_a_failed_groups_rendezvous() -> None:
    """A rank restarted right after its group failed can reach the old rank 0 while that one still
    stops (its roll call keeps the store up): it must not join that group (whose rank 0 never comes
    back to it) but keep trying until a fresh rank 0 answers, or fail naming rank 0."""
    import torch.distributed as dist

    from k2serve.experts.comm import EPComm, EPError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=5), wait_for_workers=False)
    dist.PrefixStore("ep", old).set("group_failed", "1")  # what the old group's _fail leaves
    start = time.monotonic()
    with pytest.raises(EPError, match="only a failed group's rank 0 answered") as err:
        EPComm.connect(f"tcp://127.0.0.1:{port}", 1, 2, timeout=timedelta(seconds=2))
    assert 2 <= time.monotonic() - start < 10 and err.value.peers == (0,)
