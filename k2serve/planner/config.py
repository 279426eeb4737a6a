"""The planner's configuration: SLO targets, thresholds, streaks, cooldowns and bounds (frozen, checked)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROLES = ("prefill", "decode")


class PlannerConfigError(ValueError):
    """A planner setting out of range; names the setting and its value."""


@dataclass(frozen=True)
class RoleLimits:
    """Bounds of one role: replicas in [min_replicas, max_replicas], at most `max_step_up` added per
    decision (scale-down removes one replica per decision)."""

    min_replicas: int = 1
    max_replicas: int = 8
    max_step_up: int = 4

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise PlannerConfigError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise PlannerConfigError(
                f"max_replicas must be >= max(1, min_replicas={self.min_replicas}), got {self.max_replicas}"
            )
        if self.max_step_up < 1:
            raise PlannerConfigError(f"max_step_up must be >= 1, got {self.max_step_up}")


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner aims for and how cautiously it moves. Times in seconds, fractions in [0, 1].

    Targets, each a ratio measured / target where > 1 is over target:
    - prefill: the `quantile` (0.9 = p90) of TTFT over the observation window / `ttft_slo_s`; prompts
      outstanding on prefill workers (running + waiting) / (`prefill_queue_per_replica` x replicas).
    - decode: the quantile of inter-token latency / `itl_slo_s`; requests waiting on decode workers /
      (`decode_queue_per_replica` x replicas); sequences running on them / (`decode_seqs_per_replica`
      x replicas; keep it below the workers' --max-num-seqs); the fraction of decode KV blocks in use /
      `kv_high`.

    Hysteresis: a role scales up after `up_after` consecutive observations over target, by
    ceil(replicas x largest ratio) - replicas (1 to `max_step_up`). It scales down by one only after
    `down_after` consecutive idle observations, idle meaning every signal in the low band: latency
    ratios at most `down_fraction`, load ratios (queues, running sequences) at most `down_fraction` and
    KV usage at most `kv_low` even with one replica fewer (that load spread over n - 1 replicas). Between
    the bands nothing happens, which is what keeps a role from flapping.

    Cooldowns: after a role changed, no scale-up of it for `up_cooldown_s` (set it to at least the time
    a new replica takes to serve) and no scale-down for `down_cooldown_s`.
    """

    ttft_slo_s: float = 10.0
    itl_slo_s: float = 0.1
    quantile: float = 0.9
    prefill_queue_per_replica: float = 4.0
    decode_queue_per_replica: float = 1.0
    decode_seqs_per_replica: float = 48.0
    kv_high: float = 0.85
    kv_low: float = 0.5
    down_fraction: float = 0.5
    up_after: int = 2
    down_after: int = 6
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 180.0
    prefill: RoleLimits = field(default_factory=RoleLimits)
    decode: RoleLimits = field(default_factory=RoleLimits)

    def __post_init__(self) -> None:
        for name in (
            "ttft_slo_s",
            "itl_slo_s",
            "prefill_queue_per_replica",
            "decode_queue_per_replica",
            "decode_seqs_per_replica",
        ):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise PlannerConfigError(f"{name} must be a finite number > 0, got {v}")
        for name in ("up_cooldown_s", "down_cooldown_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise PlannerConfigError(f"{name} must be a finite number >= 0, got {v}")
        if not 0 < self.quantile < 1:
            raise PlannerConfigError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0 < self.down_fraction < 1:
            raise PlannerConfigError(f"down_fraction must be in (0, 1), got {self.down_fraction}")
        if not 0 < self.kv_low < self.kv_high <= 1:
            raise PlannerConfigError(
                f"need 0 < kv_low < kv_high <= 1, got kv_low={self.kv_low}, kv_high={self.kv_high}"
            )
        for name in ("up_after", "down_after"):
            if getattr(self, name) < 1:
                raise PlannerConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def limits(self, role: str) -> RoleLimits:
        if role not in ROLES:
            raise PlannerConfigError(f"role must be one of {ROLES}, got {role!r}")
        return self.prefill if role == "prefill" else self.decode
