"""One rank of an expert-parallel group: its own engine (data-parallel attention), shared experts.

Each rank runs an `LLMEngine` with its own requests and its own KV cache; only the routed experts
are split. The MoE layers exchange tokens with all_to_all, so every rank must run every forward:
`step()` starts with an all_reduce of flags (has work, rebalance wanted) and a rank with nothing
scheduled runs a zero-token forward so the collectives line up. Steps therefore must be called
the same number of times on every rank: a serving loop calls `step()` continuously while
`any_work` (and polls its inbox between steps when the group is idle).

Endpoint model (for the prefill/decode workers of the cluster): every rank is its own
data-parallel endpoint. It registers with the router under its own address, receives requests
(and, in disaggregated serving, KV transfers) for its own engine and KV cache, and streams its own
outputs; there is no leader relaying requests. The router balances (and prefix-routes) across the
ranks as across any workers; the group only shares the lockstep. Rebalancing (EPLB) may be asked
for by any rank (`request_rebalance`); it takes effect for all ranks at the start of the next step.

A rank's serving loop (one process per rank, e.g. a decode worker):

    w = EPWorker.connect(rank, world, model_dir, dtype, engine_config, "tcp://head:port")
    while True:
        for req in inbox.drain():                  # filled by this rank's gRPC handlers (thread-safe)
            w.add_request(req.id, req.prompt_token_ids, req.params)
        publish(w.step())                          # every rank calls step() every iteration
        if not w.any_work:
            time.sleep(0.001)                      # the group is idle: avoid spinning on all_reduce

An `EPError` (a peer died or hung) is fatal for the whole group: a gloo group cannot be repaired,
so every rank exits and the launcher restarts all of them; in-flight requests fail back to the
router, which retries them elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine, RequestOutput, tokenizer_and_eos
from k2serve.engine.sampling_params import SamplingParams
from k2serve.experts.comm import EPComm, EPConfigError, EPError, local_ep_device
from k2serve.experts.dispatch import EPDispatcher
from k2serve.experts.eplb import EPLBConfig, ExpertLoad, imbalance, plan_placement
from k2serve.experts.placement import ExpertPlacement
from k2serve.experts.reshard import expert_tensors, install, reshard_layer
from k2serve.experts.state import EPState
from k2serve.model.loader import load_model
from k2serve.model.mla import MLA
from k2serve.model.model import K2Model
from k2serve.model.moe import MoE

logger = logging.getLogger(__name__)
# A scheduled re-placement moves a layer only when it lowers the layer's imbalance (max / mean load per
# rank) by at least this fraction: smaller gains are within the window's noise and not worth a pause.
EPLB_MIN_GAIN = 0.05


@dataclass(frozen=True)
class EPConfig:
    """redundant_per_rank: replica slots per rank in the initial (contiguous) placement.
    timeout_s: bound on any collective, so also on the longest step of any rank (seconds).
    roll_call_s: how long a failing rank waits for the others to report before naming suspects.
    eplb: re-place the experts while serving, every `eplb.step_interval` group steps, from the load
    of the last `eplb.window_size` steps; None: only when a rank asks (`request_rebalance`)."""

    redundant_per_rank: int = 0
    timeout_s: float = 60.0
    roll_call_s: float = 2.0
    eplb: EPLBConfig | None = None

    def __post_init__(self) -> None:
        if self.redundant_per_rank < 0:
            raise EPConfigError("redundant_per_rank must be >= 0", self.redundant_per_rank)
        for name in ("timeout_s", "roll_call_s"):
            if getattr(self, name) <= 0:
                raise EPConfigError(f"{name} must be > 0", getattr(self, name))


def moe_layers(model: K2Model) -> list[tuple[int, MoE]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]


def load_ep_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    placement: Sequence[ExpertPlacement],
    rank: int,
    device: torch.device | str = "cpu",
) -> K2Model:
    """The model with only rank's routed experts (per-layer placement); everything else in full; on
    `device` (the rank's own GPU, or the CPU)."""
    owned = {p.owned(rank) for p in placement}
    if len(owned) == 1:
        return load_model(model_dir, dtype, expert_ids=next(iter(owned)), device=device)
    union = sorted({e for ids in owned for e in ids})  # layers differ: load the union, keep each layer's
    model = load_model(model_dir, dtype, expert_ids=union, device=device)
    for (_, moe), p in zip(moe_layers(model), placement, strict=True):
        rows = torch.tensor([union.index(e) for e in p.owned(rank)], device=model.embed_tokens.weight.device)
        kept = {n: getattr(moe.experts, n)[rows].clone() for n in expert_tensors(moe.experts)}
        install(moe.experts, p.owned(rank), kept)
    return model


class _NoAttention:
    """Attention backend of a zero-token forward: there is nothing to attend."""

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        return q_nope.new_zeros(*q_nope.shape[:-2], mla.n_heads, mla.v_dim)


class EPWorker:
    """Rank `comm.rank` of the group. The request API is the engine's, for this rank's own requests;
    `step`, `run_until_idle`, `causal_logits`, `global_expert_load` are collectives."""

    def __init__(
        self,
        comm: EPComm,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        engine_config: EngineConfig | None = None,
        ep_config: EPConfig | None = None,
        placement: Sequence[ExpertPlacement] | None = None,
    ) -> None:
        self.comm = comm
        self.ep_config = ep_config or EPConfig()
        model_dir = Path(model_dir)
        mc = ModelConfig.from_file(model_dir)
        if placement is None:
            one = ExpertPlacement.contiguous(
                mc.n_routed_experts, comm.world_size, self.ep_config.redundant_per_rank
            )
            placement = [one] * mc.num_moe_layers
        eplb = self.ep_config.eplb
        window = eplb.window_size if eplb is not None else None
        self.state = EPState(
            comm,
            tuple(placement),
            ExpertLoad(mc.num_moe_layers, mc.n_routed_experts, window, comm.device),
        )
        self.model = load_ep_model(model_dir, dtype, placement, comm.rank, comm.device)
        self.dispatchers: list[EPDispatcher] = []
        for j, (i, moe) in enumerate(moe_layers(self.model)):
            moe.dispatch = EPDispatcher(self.state, i, j)
            self.dispatchers.append(moe.dispatch)
        tokenizer, eos = tokenizer_and_eos(model_dir, self.model.config)
        self.engine = LLMEngine(self.model, engine_config, tokenizer, eos)
        self.any_work = False  # whether any rank had work in the last step
        self.steps = 0  # group steps in which some rank had work: the same count on every rank
        self.rebalances = 0  # re-placements applied (EPLB), read by the metrics endpoint
        # MoE layer index -> the imbalance (max / mean load per rank) of the group's windowed load
        # under its placement before and after its last re-placement (absent until it moved once)
        self.imbalance_before: dict[int, float] = {}
        self.imbalance_after: dict[int, float] = {}
        self._rebalanced_at = 0
        self._rebalance_wanted = False
        self._owns_comm = False

    @classmethod
    def connect(
        cls,
        rank: int,
        world_size: int,
        model_dir: str | Path,
        dtype: torch.dtype,
        engine_config: EngineConfig | None,
        init_method: str,
        ep_config: EPConfig | None = None,
    ) -> EPWorker:
        """Join the group at init_method ('tcp://host:port', hosted by rank 0) and load this rank's share."""
        cfg = ep_config or EPConfig()
        engine_config = engine_config or EngineConfig()
        device = local_ep_device(engine_config.torch_device, rank)  # a bare "cuda": this rank's own GPU
        engine_config = dataclasses.replace(engine_config, device=str(device))
        comm = EPComm.connect(
            init_method,
            rank,
            world_size,
            timedelta(seconds=cfg.timeout_s),
            timedelta(seconds=cfg.roll_call_s),
            device,
        )
        worker = cls(comm, model_dir, dtype, engine_config, cfg)
        worker._owns_comm = True
        return worker

    # ---- this rank's requests (local, no collective) -------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, prompt_token_ids, params)

    def abort_request(self, request_id: str) -> bool:
        return self.engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def request_rebalance(self) -> None:
        """Ask for an EPLB re-placement from the load counted so far; all ranks apply it next step."""
        self._rebalance_wanted = True

    def expert_load(self) -> torch.Tensor:
        """This rank's routed (token, slot) counts [num_moe_layers, n_experts] since the last re-placement."""
        return self.load.counts.cpu().clone()

    def global_expert_load(self) -> torch.Tensor:
        """The group's counts [L, E]; a collective (call on every rank between the same steps)."""
        return self.load.global_counts(self.comm)

    # ---- lockstep ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of the group. Returns this rank's outputs; sets `any_work`."""
        flags = torch.tensor([int(self.engine.has_unfinished_requests()), int(self._rebalance_wanted)])
        self.comm.all_reduce(flags, "max", "step agreement")
        self.any_work = bool(flags[0])
        if flags[1] or (self.any_work and self._rebalance_due()):
            self._rebalance(forced=bool(flags[1]))
        if not self.any_work:
            return []
        before = self._forwards()
        try:
            outputs = self.engine.step()
        except EPError:
            raise
        except Exception:
            if self.dispatchers and self._forwards() == before:  # failed before the forward:
                self._empty_forward()  # keep the others' collectives whole, then report
            raise
        else:
            if self.dispatchers and self._forwards() == before:
                self._empty_forward()  # nothing scheduled here: still take part in every MoE collective
        finally:  # counted on every rank whatever happened here, so the ranks' EPLB schedules agree
            self.steps += 1
            self.load.end_step()
        return outputs

    def _rebalance_due(self) -> bool:
        """EPLB's schedule: every `step_interval` working steps. Every rank agrees without a message:
        `steps` counts the steps the agreement all_reduce said some rank had work, the same on all."""
        eplb = self.ep_config.eplb
        return eplb is not None and self.steps > self._rebalanced_at and self.steps % eplb.step_interval == 0

    def run_until_idle(self) -> dict[str, RequestOutput]:
        """Step until no rank has work; returns this rank's finished requests by id."""
        done: dict[str, RequestOutput] = {}
        while True:
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
            if not self.any_work:
                return done

    @torch.inference_mode()
    def causal_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A cache-free forward of this rank's batch [B, S] (B may be 0) -> fp32 logits [B, S, V]."""
        return self.model(input_ids)

    def _forwards(self) -> int:
        return self.dispatchers[0].calls if self.dispatchers else 0

    @torch.inference_mode()
    def _empty_forward(self) -> None:
        empty = torch.zeros(0, dtype=torch.long, device=self.comm.device)
        self.model.forward_hidden(empty, empty, _NoAttention())

    def _rebalance(self, forced: bool) -> None:
        """Plan from the group's windowed load (the same on every rank, so every rank takes the same
        decisions without a message), move the weights of the layers whose placement changes, swap.
        On EPLB's schedule a layer moves only when the plan lowers its imbalance for that load by at
        least EPLB_MIN_GAIN (moving weights costs a pause of the whole group); a rank's
        `request_rebalance` (`forced`) moves every layer the plan changes. Requests in flight are
        untouched: only which rank computes an expert changes. A window without any load (nothing
        routed yet) changes nothing."""
        self._rebalance_wanted = False
        self._rebalanced_at = self.steps
        counts = self.load.global_window(self.comm)  # [L, E]
        if not bool(counts.any()):
            return
        placement = list(self.placement)
        moved: list[int] = []
        for j, ((i, moe), old) in enumerate(zip(moe_layers(self.model), self.placement, strict=True)):
            new = plan_placement(counts[j], [len(s) for s in old.slots])  # each rank keeps its slot count
            before, after = imbalance(old, counts[j]), imbalance(new, counts[j])
            if new == old or not (forced or after < before * (1 - EPLB_MIN_GAIN)):
                continue
            reshard_layer(self.comm, moe.experts, old, new, i)
            placement[j] = new
            self.imbalance_before[j], self.imbalance_after[j] = before, after
            moved.append(j)
        if not moved:
            return
        self.state.set_placement(placement)
        self.load.reset()
        self.rebalances += 1
        logger.info(
            "EPLB re-placement %d at step %d on rank %d: imbalance of MoE layers %s: %s -> %s",
            self.rebalances,
            self.steps,
            self.comm.rank,
            moved,
            [round(self.imbalance_before[j], 3) for j in moved],
            [round(self.imbalance_after[j], 3) for j in moved],
        )

    @property
    def placement(self) -> tuple[ExpertPlacement, ...]:
        """The current placement, one per MoE layer."""
        return self.state.placement

    @property
    def load(self) -> ExpertLoad:
        assert self.state.load is not None  # the worker always counts
        return self.state.load

    def close(self) -> None:
        if self._owns_comm:
            self.comm.close()
