"""The parallel state of one expert-parallel rank, passed down to every EP MoE layer (no globals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from k2serve.experts.comm import EPComm, EPConfigError
from k2serve.experts.eplb import ExpertLoad
from k2serve.experts.placement import ExpertPlacement


@dataclass
class EPState:
    """comm: the group (rank, world size, process group). placement[j]: where the routed experts of
    MoE layer j live; replaced whole by `set_placement` between steps, after the weights moved.
    load: routed (token, slot) counts per MoE layer, or None to count nothing."""

    comm: EPComm
    placement: tuple[ExpertPlacement, ...]
    load: ExpertLoad | None = None

    def __post_init__(self) -> None:
        self.set_placement(self.placement)
        if self.load is not None and self.load.counts.shape[0] != len(self.placement):
            raise EPConfigError(
                f"load counts {len(self.placement)} MoE layers", tuple(self.load.counts.shape)
            )

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def set_placement(self, placement: Sequence[ExpertPlacement]) -> None:
        bad = [p.world_size for p in placement if p.world_size != self.comm.world_size]
        if bad:
            raise EPConfigError(f"placements must span the group's {self.comm.world_size} ranks", bad)
        self.placement = tuple(placement)
