"""The planner's decision logic on hand-made observations: scale-up on SLO breach and queue growth,
scale-down only after idle streaks and cooldowns, bounds, the hysteresis band, no flapping."""

from __future__ import annotations

import dataclasses

import pytest

from k2serve.planner.config import PlannerConfig, PlannerConfigError, RoleLimits
from k2serve.planner.connector import VirtualConnector, apply
from k2serve.planner.observation import Observation, RoleLoad
from k2serve.planner.policy import Planner, PlannerError

CFG = PlannerConfig(
    ttft_slo_s=1.0,
    itl_slo_s=0.05,
    up_after=2,
    down_after=3,
    up_cooldown_s=30.0,
    down_cooldown_s=60.0,
    prefill=RoleLimits(1, 6, 2),
    decode=RoleLimits(1, 4, 2),
)


def obs(
    prefill: int = 1,
    decode: int = 1,
    ttft: float | None = 0.1,
    itl: float | None = 0.01,
    pre_waiting: int = 0,
    dec_waiting: int = 0,
    dec_running: int = 0,
    kv: float | None = 0.1,
) -> Observation:
    return Observation(
        prefill=RoleLoad(replicas=prefill, ready=prefill, waiting=pre_waiting),
        decode=RoleLoad(replicas=decode, ready=decode, running=dec_running, waiting=dec_waiting, kv_used=kv),
        ttft_s=ttft,
        itl_s=itl,
        window_s=5.0,
    )


def test_ttft_breach_scales_prefill_up_after_the_streak_in_proportion() -> None:
    p = Planner(CFG)
    first = p.decide(obs(prefill=2, ttft=1.8), 0.0)
    assert not first.changed and "1/2 obs" in first.prefill.reason
    d = p.decide(obs(prefill=2, ttft=1.8), 5.0)
    assert (d.prefill.current, d.prefill.target) == (2, 4)  # ceil(2 x 1.8) = 4
    assert "TTFT p90 1.8 s > SLO 1 s" in d.prefill.reason
    assert not d.decode.changed


def test_growing_prefill_queue_scales_up_even_without_ttft_samples() -> None:
    p = Planner(CFG)
    ds = [p.decide(obs(ttft=None, pre_waiting=w), t) for t, w in ((0, 6), (5, 9))]
    assert ds[-1].prefill.target == 3  # 9 outstanding / (4 per replica x 1) -> ceil(2.25) = 3
    assert "9 outstanding > 4/replica x 1" in ds[-1].prefill.reason


def test_step_is_capped_by_max_step_up_and_max_replicas() -> None:
    p = Planner(CFG)
    for t in (0.0, 5.0):
        d = p.decide(obs(prefill=1, ttft=50.0), t)
    assert d.prefill.target == 3  # +2 at most
    for t in (40.0, 45.0):
        d = p.decide(obs(prefill=5, ttft=50.0), t)
    assert d.prefill.target == 6  # max
    for t in (80.0, 85.0):
        d = p.decide(obs(prefill=6, ttft=50.0), t)
    assert not d.prefill.changed and d.prefill.reason.startswith("hold at the maximum 6")


def test_up_cooldown_holds_a_second_scale_up() -> None:
    p = Planner(CFG)
    for t in (0.0, 5.0):
        d = p.decide(obs(prefill=1, ttft=2.0), t)
    assert d.prefill.target == 2
    for t in (10.0, 15.0):
        d = p.decide(obs(prefill=2, ttft=2.0), t)
    assert not d.prefill.changed and "up-cooldown 20 s left" in d.prefill.reason
    d = p.decide(obs(prefill=2, ttft=2.0), 35.0)
    assert d.prefill.target == 4


def test_scale_down_after_idle_streak_and_cooldown_one_at_a_time() -> None:
    p = Planner(CFG)
    decisions = [
        p.decide(obs(prefill=3, decode=3, ttft=0.1, itl=0.01, kv=0.1), float(t)) for t in range(0, 15, 5)
    ]
    # Never changed before: the cooldown since -inf has passed; the third idle observation scales down.
    assert [d.prefill.target for d in decisions] == [3, 3, 2]
    assert [d.decode.target for d in decisions] == [3, 3, 2]
    assert "idle for 3 obs" in decisions[-1].prefill.reason
    # Right after a change, idle observations wait for the down-cooldown (60 s).
    later = [p.decide(obs(prefill=2, decode=2), float(t)) for t in range(15, 75, 5)]
    assert all(not d.prefill.changed for d in later[:-1])
    assert "down-cooldown" in later[2].prefill.reason
    assert later[-1].prefill.target == 1 and later[-1].decode.target == 1  # at 70 s, 60 s after


def test_never_below_min_never_above_max_and_out_of_bounds_counts_are_corrected() -> None:
    p = Planner(CFG)
    for t in range(0, 100, 5):
        d = p.decide(obs(prefill=1, decode=1), float(t))  # idle forever at the minimum
        assert not d.changed
    d = p.decide(obs(prefill=0, decode=9), 100.0)
    assert (d.prefill.target, d.decode.target) == (1, 4)
    assert "below the minimum" in d.prefill.reason and "above the maximum" in d.decode.reason


def test_between_the_bands_nothing_happens() -> None:
    p = Planner(CFG)
    for t in range(0, 300, 5):  # TTFT at 0.7 x SLO: neither over target nor idle
        d = p.decide(obs(prefill=3, decode=2, ttft=0.7, itl=0.03, kv=0.3), float(t))
        assert not d.changed


def test_decode_scales_on_kv_usage_and_itl_and_running_and_keeps_kv_headroom_when_shrinking() -> None:
    p = Planner(CFG)
    for t in (0.0, 5.0):
        d = p.decide(obs(decode=2, kv=0.95), t)
    assert d.decode.target == 3 and "KV 95% > 85%" in d.decode.reason
    p = Planner(CFG)
    for t in (0.0, 5.0):
        d = p.decide(obs(decode=1, itl=0.2), t)
    assert d.decode.target == 3  # ITL at 4x SLO, capped by max_step_up 2
    p = Planner(CFG)
    for t in (0.0, 5.0):
        d = p.decide(obs(decode=1, dec_running=60), t)
    assert d.decode.target == 2 and "60 running > 48/replica x 1" in d.decode.reason
    # KV at 40% over 3 replicas would be 60% over 2 (> kv_low 50%): no scale-down however long idle.
    p = Planner(CFG)
    for t in range(0, 600, 5):
        d = p.decide(obs(decode=3, kv=0.4), float(t))
        assert not d.decode.changed


def test_oscillating_load_does_not_flap() -> None:
    """Load alternating between over target and idle every few observations: the streaks and the
    cooldowns keep the replica count from following it up and down."""
    p = Planner(CFG)
    conn = VirtualConnector({"prefill": 2, "decode": 1})
    for k in range(240):  # 20 minutes at 5 s
        high = (k // 2) % 2 == 0  # 2 observations high, 2 low
        o = obs(
            prefill=conn.replicas("prefill"),
            decode=conn.replicas("decode"),
            ttft=2.0 if high else 0.1,
        )
        apply(p.decide(o, 5.0 * k), conn)
    ups = [a for a in conn.actions if a.after > a.before]
    downs = [a for a in conn.actions if a.after < a.before]
    assert not downs  # never idle for 3 observations in a row
    assert len(ups) <= 3  # only up, to the cap, with cooldowns between
    assert conn.replicas("prefill") <= CFG.prefill.max_replicas


def test_load_step_up_then_idle_converges_down_to_the_minimum() -> None:
    p = Planner(CFG)
    conn = VirtualConnector({"prefill": 1, "decode": 1})
    history = []
    for k in range(200):
        n = conn.replicas("prefill")
        busy = 20 <= k < 60
        o = obs(prefill=n, decode=conn.replicas("decode"), ttft=3.0 / n if busy else 0.05, pre_waiting=0)
        d = p.decide(o, 5.0 * k)
        apply(d, conn)
        history.append(conn.replicas("prefill"))
    assert max(history) >= 3
    assert history[-1] == 1
    # Every change respects the cooldowns: at least 30 s between changes of the role.
    changes = [i for i in range(1, len(history)) if history[i] != history[i - 1]]
    assert all((b - a) * 5.0 >= 30.0 for a, b in zip(changes, changes[1:], strict=False))


def test_decide_rejects_time_going_backwards() -> None:
    p = Planner(CFG)
    p.decide(obs(), 10.0)
    with pytest.raises(PlannerError) as e:
        p.decide(obs(), 9.0)
    assert e.value.now == 9.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("ttft_slo_s", 0.0), ("quantile", 1.0), ("kv_low", 0.9), ("up_after", 0), ("down_cooldown_s", -1.0)],
)
def test_config_rejects_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(PlannerConfigError, match=field):
        dataclasses.replace(CFG, **{field: value})


def test_role_limits_are_checked() -> None:
    with pytest.raises(PlannerConfigError, match="max_replicas"):
        RoleLimits(min_replicas=3, max_replicas=2)
    with pytest.raises(PlannerConfigError, match="max_step_up"):
        RoleLimits(max_step_up=0)
