"""The planner's decision logic: `Planner.decide(observation, now) -> Decision`, with its reasons.

Pure: no I/O, no clock; the only state is what the planner remembers of its own decisions (the time
of each role's last change and how many observations in a row were over target or idle), so the same
sequence of (observation, now) always gives the same decisions. Prefill and decode are decided apart:
prefill answers to TTFT and the prefill queue, decode to inter-token latency, the decode queue and
KV-cache usage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from k2serve.planner.config import ROLES, PlannerConfig
from k2serve.planner.observation import Observation


class PlannerError(ValueError):
    """decide() was called out of order; carries the offending time (s)."""

    def __init__(self, message: str, now: float) -> None:
        super().__init__(message)
        self.now = now


@dataclass(frozen=True)
class RoleDecision:
    """One role: go from `current` to `target` replicas (equal: hold), and why."""

    role: str
    current: int
    target: int
    reason: str

    @property
    def changed(self) -> bool:
        return self.target != self.current


@dataclass(frozen=True)
class Decision:
    """Both roles at time `time` (s, the caller's clock)."""

    time: float
    prefill: RoleDecision
    decode: RoleDecision

    @property
    def changed(self) -> bool:
        return self.prefill.changed or self.decode.changed

    def role(self, role: str) -> RoleDecision:
        return self.prefill if role == "prefill" else self.decode

    @property
    def reason(self) -> str:
        """The reasons of the roles that change, or of both when neither does."""
        parts = [d for d in (self.prefill, self.decode) if d.changed] or [self.prefill, self.decode]
        return "; ".join(f"{d.role}: {d.reason}" for d in parts)


@dataclass
class _RoleMemory:
    last_change: float = -math.inf
    over: int = 0  # consecutive observations over target
    idle: int = 0  # consecutive idle observations


@dataclass(frozen=True)
class _Signals:
    """pressure: the largest measured/target ratio (> 1: over target) and what it was; idle: whether
    every signal is in the low band, and a description."""

    pressure: float
    over_what: str
    idle: bool
    state: str


def _fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.3g} {unit}".rstrip()


@dataclass
class Planner:
    """Decides replica counts per role. Call `decide` once per observation with a non-decreasing `now`
    (seconds); it remembers its decisions for cooldowns and streaks. The counts it starts from are the
    observation's `replicas` (the connector's), so a decision that was not applied is not assumed."""

    config: PlannerConfig = field(default_factory=PlannerConfig)
    _memory: dict[str, _RoleMemory] = field(default_factory=lambda: {r: _RoleMemory() for r in ROLES})
    _last_now: float = -math.inf

    def decide(self, obs: Observation, now: float) -> Decision:
        if now < self._last_now:
            raise PlannerError(f"decide() at {now} s after a call at {self._last_now} s", now)
        self._last_now = now
        return Decision(now, self._decide_role("prefill", obs, now), self._decide_role("decode", obs, now))

    # ---- per role --------------------------------------------------------------------------------
    def _signals(self, role: str, obs: Observation) -> _Signals:
        """Each signal is a ratio measured / target (> 1: over target) and whether it is in the low band;
        per-replica loads are judged in the low band as if spread over one replica fewer."""
        c = self.config
        load = obs.role(role)
        n = max(1, load.replicas)
        fewer = n / (n - 1) if n > 1 else math.inf
        q = f"p{round(c.quantile * 100)}"
        signals: list[tuple[float, bool, str, str]] = []  # (ratio, low, state, why over)

        def per_replica(count: int, target: float, what: str) -> None:
            ratio = count / (target * n)
            low = count == 0 or ratio * fewer <= c.down_fraction
            signals.append((ratio, low, f"{count} {what}", f"{count} {what} > {target:g}/replica x {n}"))

        if role == "prefill":
            lat, slo, name = obs.ttft_s, c.ttft_slo_s, f"TTFT {q}"
            per_replica(load.running + load.waiting, c.prefill_queue_per_replica, "outstanding")
        else:
            lat, slo, name = obs.itl_s, c.itl_slo_s, f"ITL {q}"
            per_replica(load.waiting, c.decode_queue_per_replica, "waiting")
            per_replica(load.running, c.decode_seqs_per_replica, "running")
            if load.kv_used is not None:
                kv = load.kv_used
                signals.append(
                    (kv / c.kv_high, kv * fewer <= c.kv_low, f"KV {kv:.0%}", f"KV {kv:.0%} > {c.kv_high:.0%}")
                )
        if lat is None:
            signals.append((0.0, True, f"{name} -", ""))
        else:
            state = f"{name} {_fmt(lat)}"
            signals.append((lat / slo, lat <= c.down_fraction * slo, state, f"{state} > SLO {_fmt(slo)}"))
        ratio, _, _, over_what = max(signals, key=lambda x: x[0])
        return _Signals(ratio, over_what, all(x[1] for x in signals), ", ".join(x[2] for x in signals))

    def _decide_role(self, role: str, obs: Observation, now: float) -> RoleDecision:
        c = self.config
        lim = c.limits(role)
        mem = self._memory[role]
        n = obs.role(role).replicas
        sig = self._signals(role, obs)
        mem.over = mem.over + 1 if sig.pressure > 1 else 0
        mem.idle = mem.idle + 1 if sig.idle else 0

        def change(target: int, reason: str) -> RoleDecision:
            mem.last_change, mem.over, mem.idle = now, 0, 0
            return RoleDecision(role, n, target, reason)

        if n < lim.min_replicas:
            return change(lim.min_replicas, f"up {n}->{lim.min_replicas}: below the minimum")
        if n > lim.max_replicas:
            return change(lim.max_replicas, f"down {n}->{lim.max_replicas}: above the maximum")
        since = now - mem.last_change
        if mem.over >= c.up_after:
            if n >= lim.max_replicas:
                return RoleDecision(role, n, n, f"hold at the maximum {n}: {sig.over_what}")
            if since < c.up_cooldown_s:
                return RoleDecision(
                    role, n, n, f"hold: {sig.over_what}, up-cooldown {c.up_cooldown_s - since:.0f} s left"
                )
            # Grow in proportion to the pressure, at least one and at most max_step_up replicas.
            step = min(lim.max_step_up, max(1, math.ceil(max(n, 1) * sig.pressure) - n))
            target = min(lim.max_replicas, n + step)
            return change(target, f"up {n}->{target}: {sig.over_what} for {mem.over} obs")
        if mem.idle >= c.down_after and n > lim.min_replicas:
            if since < c.down_cooldown_s:
                return RoleDecision(
                    role, n, n, f"hold: idle, down-cooldown {c.down_cooldown_s - since:.0f} s left"
                )
            streak = mem.idle
            return change(n - 1, f"down {n}->{n - 1}: idle for {streak} obs ({sig.state})")
        if sig.pressure > 1:
            return RoleDecision(role, n, n, f"hold: {sig.over_what} ({mem.over}/{c.up_after} obs)")
        return RoleDecision(role, n, n, f"hold: {sig.state}")
