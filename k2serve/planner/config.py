"""The planner's configuration (SLO targets, thresholds, streaks, cooldowns, bounds) and the dry-run
model's parameters; frozen and checked on construction."""

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


@dataclass(frozen=True)
class SimParams:
    """The dry-run's queueing model (see `simulate`), per replica; seconds, tokens.

    Defaults were measured with `python -m k2serve.planner.measure_cli --preset tiny` (the `tiny` preset,
    float32, on the development machine's 2 CPU cores under other load: 897 prompt tokens/s for a
    2,048-token prompt; best-of-3 decode steps of 15.8 / 32.0 / 37.9 ms at batch 1 / 8 / 32, fitted to
    20.5 ms + 0.59 ms x batch), the engine's defaults (`--max-num-seqs 64`; `--kv-cache-mb 1024` holds
    1,118,481 tokens of tiny's 960-byte fp32 latent KV), and `startup_s` from a tiny decode worker's
    spawn to its registration with the router there (11-17 s, tests/test_planner_local.py). They describe that test model on a CPU, not a K2 deployment: pass your own.
    """

    prefill_tokens_per_s: float = 900.0
    decode_itl_base_s: float = 0.02
    decode_itl_per_seq_s: float = 0.0006
    decode_max_batch: int = 64
    decode_kv_tokens: int = 1_118_481
    startup_s: float = 15.0
    step_s: float = 0.1
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_itl_base_s", "step_s", "interval_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise PlannerConfigError(f"{name} must be a finite number > 0, got {v}")
        for name in ("decode_itl_per_seq_s", "startup_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise PlannerConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.decode_max_batch < 1 or self.decode_kv_tokens < 1:
            raise PlannerConfigError(
                f"decode_max_batch and decode_kv_tokens must be >= 1, got "
                f"{self.decode_max_batch}, {self.decode_kv_tokens}"
            )
        if self.interval_s < self.step_s:
            raise PlannerConfigError(f"interval_s ({self.interval_s}) must be >= step_s ({self.step_s})")

    def itl(self, batch: int) -> float:
        return self.decode_itl_base_s + self.decode_itl_per_seq_s * batch
