"""The expert-parallel routed forward of one MoE layer: dispatch, grouped compute, combine.

Per layer, every rank of the group, whatever its token count (zero included), runs:

1. route locally (the Router is replicated) -> weights, global ids [T, k];
2. pick for each (token, slot) one rank holding the expert: replica `token % replicas` of it, so the
   choice is deterministic and spreads a hot expert's tokens over its replicas;
3. all_to_all of the counts matrix [W, S] (rows for each of the receiver's local slots): both the
   split sizes and, since rows travel grouped by slot, each received row's local expert;
4. all_to_all of the activations [N, D] with those variable splits;
5. run the received rows grouped by local expert (`run_sorted`: torch, or Triton for INT4 on GPU);
6. all_to_all of the outputs back along the reverse splits;
7. weight by the routing weights and index_add into [T, D]. Shared experts are added by `MoE`.
"""

from __future__ import annotations

import torch

from k2serve.experts.comm import EPError
from k2serve.experts.placement import DispatchTables, ExpertPlacement
from k2serve.experts.state import EPState
from k2serve.experts.triton_moe import run_sorted
from k2serve.model.moe import RoutedExperts


class EPDispatcher:
    """`MoE.dispatch` for one layer (a `RoutedDispatch`): `layer` is the model's layer index (named in
    errors), `moe_index` its index in `state.placement` and `state.load`. `calls` counts forwards (the
    worker compares it to keep ranks in lockstep)."""

    def __init__(self, state: EPState, layer: int, moe_index: int) -> None:
        self.state = state
        self.layer = layer
        self.moe_index = moe_index
        self.calls = 0
        self._cache: tuple[ExpertPlacement, torch.device, DispatchTables] | None = None

    def _tables(self, placement: ExpertPlacement, device: torch.device) -> DispatchTables:
        """The placement's replica tables on `device`, rebuilt only when the placement was replaced."""
        if self._cache is None or self._cache[0] is not placement or self._cache[1] != device:
            t = placement.dispatch_tables()
            tables = DispatchTables(t.rank.to(device), t.local.to(device), t.count.to(device))
            self._cache = (placement, device, tables)
        return self._cache[2]

    def __call__(
        self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D], weights fp32 / ids [T, k] -> weighted routed outputs [T, D]. A collective."""
        self.calls += 1
        comm, placement = self.state.comm, self.state.placement[self.moe_index]
        w, s = comm.world_size, max(len(ids_) for ids_ in placement.slots)  # S: slot columns of the counts
        tables = self._tables(placement, x.device)
        if tuple(experts.expert_ids) != placement.owned(comm.rank):
            raise EPError(
                comm.rank,
                "dispatch",
                self.layer,
                (),
                f"experts held {experts.expert_ids} differ from the placement's {list(placement.owned(comm.rank))}",
            )
        t, k = ids.shape
        flat = ids.flatten()  # [T*k]
        if self.state.load is not None:
            self.state.load.record(self.moe_index, flat)
        token = torch.arange(t * k, device=x.device) // k  # [T*k]
        replica = token % tables.count[flat]
        key = tables.rank[flat, replica] * s + tables.local[flat, replica]  # [T*k] rank * S + slot
        order = torch.argsort(key, stable=True)  # (token, slot) positions grouped by (rank, slot)
        send_counts = torch.bincount(key, minlength=w * s)  # [W*S]
        recv_counts = torch.empty_like(send_counts)
        comm.all_to_all(recv_counts, send_counts, [s] * w, [s] * w, "dispatch sizes", self.layer)
        recv_mat = recv_counts.view(w, s)  # [W, S]: rows from rank p for my slot j
        if int(recv_mat[:, experts.num_local :].sum()) != 0:
            raise EPError(
                comm.rank,
                "dispatch",
                self.layer,
                (),
                f"rows sent to local slots >= {experts.num_local}: the group's placements are out of step",
            )
        send_split = send_counts.view(w, s).sum(1).tolist()
        recv_split = recv_mat.sum(1).tolist()

        rows = token[order]  # [N_send]
        recv_x = x.new_empty(sum(recv_split), x.shape[1])  # [N_recv, D]
        comm.all_to_all(recv_x, x[rows].contiguous(), recv_split, send_split, "dispatch", self.layer)
        slot_ids = torch.arange(s, device=x.device).repeat(w)  # [W*S]
        local = torch.repeat_interleave(slot_ids, recv_mat.flatten())  # [N_recv] local slot of each row
        perm = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=s)[: experts.num_local].tolist()
        y = torch.empty_like(recv_x)
        y[perm] = run_sorted(experts, recv_x[perm], counts)  # [N_recv, D]

        back = x.new_empty(rows.shape[0], x.shape[1])  # [N_send, D]
        comm.all_to_all(back, y, send_split, recv_split, "combine", self.layer)
        back = back * weights.flatten()[order].unsqueeze(1).to(back.dtype)
        return torch.zeros_like(x).index_add_(0, rows, back)
