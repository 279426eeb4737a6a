"""Apply a new expert placement between steps: move expert weights between ranks, then swap.

For one layer, every rank derives the same transfer plan from (old, new) placements: a slot whose
expert the rank already held is a local copy; otherwise the expert comes from one of its old holders
(chosen by destination rank, spreading the senders). Each weight tensor of the stacked experts
(dense w13/w2, or INT4 packed words and scales, in whatever layout the experts hold) moves in one all_to_all along dim 0 (one row = one
expert). The new stacked tensors are built aside and installed together, so the layer switches from
the old placement to the new one at once; the caller does this for every layer before the next step.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.experts.comm import EPComm
from k2serve.experts.placement import ExpertPlacement
from k2serve.model.moe import RoutedExperts


def expert_tensors(experts: RoutedExperts) -> list[str]:
    """Names of the stacked per-expert weights (dim 0 = local slot), whatever the storage layout:
    every parameter and buffer of the module except the global -> local map."""
    own = [*experts.named_parameters(recurse=False), *experts.named_buffers(recurse=False)]
    return [n for n, _ in own if n != "global_to_local"]


def _source(old: ExpertPlacement, expert: int, dst: int) -> int:
    holders = old.holders(expert)
    return dst if dst in holders else holders[dst % len(holders)]


def transfer_plan(
    old: ExpertPlacement, new: ExpertPlacement, rank: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(sends, recvs) for `rank`: sends[p] = old local slots to send to rank p, in p's new slot order;
    recvs[p] = new local slots filled, in order, by what rank p sends (p == rank: local copies)."""
    w = new.world_size
    sends: list[list[int]] = [[] for _ in range(w)]
    recvs: list[list[int]] = [[] for _ in range(w)]
    for dst in range(w):
        for slot, e in enumerate(new.slots[dst]):
            src = _source(old, e, dst)
            if src == rank:
                sends[dst].append(old.slots[rank].index(e))
            if dst == rank:
                recvs[src].append(slot)
    return sends, recvs


def reshard_layer(
    comm: EPComm, experts: RoutedExperts, old: ExpertPlacement, new: ExpertPlacement, layer: int
) -> None:
    """Make `experts` hold `new.owned(rank)` (a collective: all ranks call it for the same layers in
    the same order). The swap happens only after every transfer of the layer completed."""
    rank = comm.rank
    sends, recvs = transfer_plan(old, new, rank)
    send_split = [len(s) if p != rank else 0 for p, s in enumerate(sends)]
    recv_split = [len(r) if p != rank else 0 for p, r in enumerate(recvs)]
    remote_send = [i for p, s in enumerate(sends) if p != rank for i in s]
    remote_recv = [i for p, r in enumerate(recvs) if p != rank for i in r]
    fresh: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in expert_tensors(experts):
            cur: torch.Tensor = getattr(experts, name)  # [S_old, ...]
            out = cur.new_empty(len(new.owned(rank)), *cur.shape[1:])  # [S_new, ...]
            out[recvs[rank]] = cur[sends[rank]]  # experts this rank keeps
            got = cur.new_empty(len(remote_recv), *cur.shape[1:])
            comm.all_to_all(
                got, cur[remote_send].contiguous(), recv_split, send_split, f"reshard {name}", layer
            )
            out[remote_recv] = got
            fresh[name] = out
    install(experts, new.owned(rank), fresh)


def install(experts: RoutedExperts, expert_ids: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
    """Swap in stacked weights holding `expert_ids` (local order) and the matching global -> local map."""
    local = torch.full((experts.n_global,), -1, dtype=torch.long, device=experts.global_to_local.device)
    local[torch.tensor(expert_ids, dtype=torch.long)] = torch.arange(len(expert_ids), device=local.device)
    for name, t in tensors.items():
        if isinstance(getattr(experts, name), nn.Parameter):
            setattr(experts, name, nn.Parameter(t, requires_grad=False))
        else:
            setattr(experts, name, t)
    experts.global_to_local = local
    experts.expert_ids = list(expert_ids)
