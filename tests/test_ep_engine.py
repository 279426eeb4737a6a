"""EP engine parity: R = 1, 2, 4 ranks (real processes for 2 and 4, gloo over localhost), each with its
own engine and requests, against the single-process model: prefill logits within fp32 rounding and
identical greedy tokens, for fp32, bf16-stored and INT4 checkpoints, with and without redundant
experts, and across an EPLB re-placement in the middle of generation. One process launch per R
runs every case. Ranks are forked from a forkserver that has torch and k2serve imported (a spawned
rank spends ~5 s importing them on this machine, and the first meta-device model build imports
torch._dynamo)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.model.checkpoint import skew_routing, write_checkpoint
from k2serve.model.loader import load_model

PROMPTS = [
    [5, 17, 99, 3, 250],
    [7, 7, 7],
    [100, 200, 300, 400, 500, 600, 700],
    [1, 2],
    [42] * 4,
    [9, 8, 7, 6],
]
# Which rank serves each prompt: uneven, and for R=4 rank 2 has none (it still steps, with empty forwards).
ASSIGN = {1: [0] * 6, 2: [0, 0, 1, 0, 0, 0], 4: [0, 0, 3, 1, 3, 0]}
LOGIT_ROWS = {1: [3], 2: [2, 1], 4: [2, 0, 1, 3]}  # causal-logit batch size per rank (a 0 included)
ENGINE = EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)


def params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=16 if i % 2 == 0 else 9, ignore_eos=True)


def logit_batch(rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * world + rank)
    return torch.randint(0, 1024, (LOGIT_ROWS[world][rank], 6), generator=g)  # [B, S]


@dataclass(frozen=True)
class Case:
    name: str
    ckpt: str
    redundant: int
    rebalance_at: int | None  # step at which the last rank asks for an EPLB re-placement
    eplb_interval: int | None = None  # EPLB on its schedule: every this many steps, no rank asking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, cases: list[Case], out: Any) -> None:
    """One rank: one group, one EPWorker per case in turn; results (or the error) go to `out`."""
    torch.set_num_threads(1)
    from k2serve.experts import EPComm, EPConfig, EPLBConfig, EPWorker

    comm = EPComm.connect(f"tcp://127.0.0.1:{port}", rank, world, timedelta(seconds=30))
    try:
        for case in cases:
            eplb = None if case.eplb_interval is None else EPLBConfig(8, case.eplb_interval)
            w = EPWorker(comm, case.ckpt, torch.float32, ENGINE, EPConfig(case.redundant, eplb=eplb))
            before = w.placement
            logits = w.causal_logits(logit_batch(rank, world))
            for i, r in enumerate(ASSIGN[world]):
                if r == rank:
                    w.add_request(str(i), PROMPTS[i], params(i))
            done: dict[str, list[int]] = {}
            step = 0
            while True:
                step += 1
                if step == case.rebalance_at and rank == world - 1:
                    w.request_rebalance()
                done.update({o.request_id: o.token_ids for o in w.step() if o.finished})
                if not w.any_work:
                    break
            moved = w.placement != before
            # numpy, pickled by value: a torch tensor would travel as a file descriptor that dies with this rank
            out.put((rank, case.name, logits.detach().cpu().numpy().copy(), done, moved, None))
    except Exception as e:  # noqa: BLE001 - reported to the test process, which fails with it
        out.put((rank, "error", None, {}, False, repr(e)))
    finally:
        comm.close()


_REF_TOKENS: dict[str, dict[str, list[int]]] = {}


def reference(ckpt: str, world: int) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Greedy tokens of the single-process engine (cached per checkpoint) and the causal logits of
    each rank's batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test process shares 2 cores with the ranks it started
    try:
        model = load_model(ckpt, torch.float32)
        if ckpt not in _REF_TOKENS:
            engine = LLMEngine(model, ENGINE, None, model.config.eos_token_ids)
            for i, p in enumerate(PROMPTS):
                engine.add_request(str(i), p, params(i))
            tokens: dict[str, list[int]] = {}
            while engine.has_unfinished_requests():
                tokens.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            _REF_TOKENS[ckpt] = tokens
        return _REF_TOKENS[ckpt], [model(logit_batch(r, world)) for r in range(world)]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt: Path, tiny_int4_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bf16 = write_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), "tiny", seed=1, dtype=torch.bfloat16)
    skewed = write_checkpoint(tmp_path_factory.mktemp("tiny_skewed"), "tiny", seed=2, dtype=torch.float32)
    skew_routing(skewed, range(6), 0.4)  # experts 0-5 (all on rank 0 of 2 at the start) take most tokens
    return {"fp32": str(tiny_ckpt), "bf16": str(bf16), "int4": str(tiny_int4_ckpt), "skewed": str(skewed)}


def cases_for(world: int, ckpts: dict[str, str]) -> list[Case]:
    """Every R runs fp32 and INT4; bf16-stored, redundant experts and EPLB are spread over R = 2 and 4
    (R = 1 cannot hold a second copy of an expert; its EPLB only permutes the local order). R = 2 also
    runs EPLB on its schedule (every 4 steps, mid-generation) over skewed routing."""
    return {
        1: [Case("fp32", ckpts["fp32"], 0, None), Case("int4-eplb", ckpts["int4"], 0, 5)],
        2: [
            Case("fp32", ckpts["fp32"], 0, None),
            Case("bf16-redundant", ckpts["bf16"], 2, None),
            Case("int4-redundant-eplb", ckpts["int4"], 1, 3),
            Case("skewed-redundant-eplb-scheduled", ckpts["skewed"], 1, None, eplb_interval=4),
        ],
        4: [Case("fp32-redundant-eplb", ckpts["fp32"], 1, 6), Case("int4", ckpts["int4"], 0, None)],
    }[world]


def mp_context() -> Any:
    """forkserver with the heavy imports preloaded; the server lives until the test process exits."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "k2serve.experts"])
    return ctx


def launch(world: int, cases: list[Case]) -> list[tuple[Any, ...]]:
    """Run the ranks (in this process when world == 1); every process is stopped before returning."""
    port = free_port()
    if world == 1:
        q: Any = queue.Queue()
        run_rank(0, 1, port, cases, q)
        return [q.get_nowait() for _ in cases]
    ctx = mp_context()
    mq = ctx.Queue()
    procs = [
        ctx.Process(target=run_rank, args=(r, world, port, cases, mq), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        results = [mq.get(timeout=120) for _ in range(world * len(cases))]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ep_engine_matches_single_process(world: int, ckpts: dict[str, str]) -> None:
    cases = cases_for(world, ckpts)
    results = launch(world, cases)
    errors = [r[5] for r in results if r[5] is not None]
    assert not errors, errors
    refs = {c.ckpt: reference(c.ckpt, world) for c in cases}
    seen: dict[str, dict[str, list[int]]] = {}
    worst: dict[str, float] = {}
    for rank, name, array, done, moved, _ in results:
        case = next(c for c in cases if c.name == name)
        logits = torch.as_tensor(array)
        ref_tokens, ref_logits = refs[case.ckpt]
        assert logits.shape == ref_logits[rank].shape
        if logits.numel():
            diff = float((logits - ref_logits[rank]).abs().max())
            worst[name] = max(worst.get(name, 0.0), diff)
            assert diff < 1e-4 * max(1.0, float(ref_logits[rank].abs().max())), (name, rank, diff)
        for rid, toks in done.items():
            assert toks == ref_tokens[rid], (name, rank, rid)
        seen.setdefault(name, {}).update(done)
        assert moved == (case.rebalance_at is not None or case.eplb_interval is not None), (name, rank)
    for case in cases:  # every request finished, on the rank it was given to
        assert sorted(seen[case.name]) == sorted(str(i) for i in range(len(PROMPTS)))
    print(f"R={world} max |logit diff| per case: {worst}")
