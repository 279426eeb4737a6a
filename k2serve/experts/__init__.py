"""Expert parallelism: expert placement per rank, the all-to-all dispatch/combine of MoE layers, the
lockstep data-parallel engine worker (`EPWorker`), EPLB load counting, planning and live re-placement,
and the fused INT4 grouped-GEMM kernel (Triton)."""

from k2serve.experts.comm import EPComm, EPConfigError, EPError
from k2serve.experts.dispatch import EPDispatcher
from k2serve.experts.eplb import EPLBConfig, ExpertLoad, plan_placement, rank_loads
from k2serve.experts.placement import ExpertPlacement, PlacementError
from k2serve.experts.state import EPState
from k2serve.experts.triton_moe import grouped_gemm_int4
from k2serve.experts.worker import EPConfig, EPWorker, load_ep_model

__all__ = [
    "EPComm",
    "EPConfig",
    "EPConfigError",
    "EPDispatcher",
    "EPError",
    "EPLBConfig",
    "EPState",
    "EPWorker",
    "ExpertLoad",
    "ExpertPlacement",
    "PlacementError",
    "grouped_gemm_int4",
    "load_ep_model",
    "plan_placement",
    "rank_loads",
]
