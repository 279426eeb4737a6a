"""`k2serve bench kv-tiers` (k2serve/bench/kv_tiers.py) at a small size: with --reuse-context every
full block of context A comes back from the tier each round (none from the device: the reservation
evicted them all), the `none` mode recomputes all of them, and nothing is given up by the reload timeout."""

from __future__ import annotations

from k2serve.bench.kv_tiers import run


def test_reuse_context_reloads_every_block_of_a_from_the_tier() -> None:
    out = run(256, 1, False, ("none", "host", "disk"), reuse_context=True, reload_timeout_s=60.0)
    full = (256 - 32) // 16 * 16  # A's full blocks: all evicted into the tier by the reservation
    assert out["none"]["hit_tokens_last_round"] == {"all": 0}
    assert out["host"]["hit_tokens_last_round"] == {"all": full, "host": full, "disk": 0}
    assert out["disk"]["hit_tokens_last_round"] == {"all": full, "host": 0, "disk": full}
    for m in ("host", "disk"):
        assert out[m]["reload_timeouts"] == 0 and out[m]["min_s"] <= out[m]["median_s"] <= out[m]["max_s"]
    assert out["reuse_context"] and out["reload_timeout_s"] == 60.0
