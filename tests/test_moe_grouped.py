"""Routed experts as grouped GEMMs (`RoutedExperts.run_grouped`) against the loop over experts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from k2serve.bench import moe_grouped as moe_grouped_bench
from k2serve.config import ModelConfig
from k2serve.model import moe
from k2serve.model.moe import RoutedExperts
from k2serve.model.presets import PRESETS

CONFIG = ModelConfig.from_dict(PRESETS["tiny"])


def random_experts(dtype: torch.dtype, expert_ids: list[int] | None = None, seed: int = 0) -> RoutedExperts:
    experts = RoutedExperts(CONFIG, expert_ids, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=g) * 0.05)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=g) * 0.05)
    return experts


def uneven_counts(n_experts: int) -> dict[str, list[int]]:
    """Uneven routings of rows over `n_experts` local experts (experts without rows included)."""
    skewed = [0] * n_experts
    skewed[1], skewed[2], skewed[5], skewed[-1] = 1, 37, 3, 20
    return {
        "skewed": skewed,
        "all_to_first": [40] + [0] * (n_experts - 1),
        "all_to_last": [0] * (n_experts - 1) + [17],
        "every_expert": [(3 * e) % 7 + 1 for e in range(n_experts)],
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("routing", ["skewed", "all_to_first", "all_to_last", "every_expert"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_grouped_equals_loop_on_uneven_routing(routing: str, dtype: torch.dtype, tol: float) -> None:
    """Grouped GEMMs give the loop's rows: fp32 up to summation order, bf16 up to bf16 rounding."""
    experts = random_experts(dtype)
    counts = uneven_counts(experts.num_local)[routing]
    x = torch.randn(sum(counts), experts.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        got = experts.run_grouped(x, counts)
        want = experts.run_loop(x, counts)
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    assert rel_err(got, want) <= tol
    if dtype == torch.float32:  # and each row is its own expert's SwiGLU, computed by hand
        start = 0
        for e, n in enumerate(counts):
            rows = x[start : start + n].double()
            h = rows @ experts.w13[e].double().t()
            gate, up = h.split(experts.inter, dim=-1)
            ref = (torch.nn.functional.silu(gate) * up) @ experts.w2[e].double().t()
            assert rel_err(got[start : start + n], ref) <= 1e-5 if n else True
            start += n


def test_grouped_with_no_rows_and_bad_counts() -> None:
    experts = random_experts(torch.float32)
    empty = torch.zeros(0, experts.hidden)
    assert experts.run_grouped(empty, [0] * experts.num_local).shape == (0, experts.hidden)
    with pytest.raises(ValueError, match="counts for 16 local experts"):
        experts.run_grouped(torch.zeros(3, experts.hidden), [3])


def test_routed_forward_grouped_equals_loop_on_an_ep_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's subset of experts (ids it does not hold are skipped): the whole routed forward, grouped
    (threshold 0) and looped (threshold huge), agree in fp32, and every token goes to one expert too."""
    held = [3, 0, 9, 12, 7]
    experts = random_experts(torch.float32, held)
    g = torch.Generator().manual_seed(4)
    t, k = 33, CONFIG.num_experts_per_tok
    x = torch.randn(t, experts.hidden, generator=g)
    weights = torch.rand(t, k, generator=g)
    for ids in (
        torch.stack([torch.randperm(CONFIG.n_routed_experts, generator=g)[:k] for _ in range(t)]),
        torch.tensor([[9] + [1, 2, 4, 5, 6][: k - 1]] * t),  # every token to one held expert, others not held
    ):
        with torch.inference_mode():
            monkeypatch.setattr(moe, "GROUPED_MIN_ROWS", 0)
            got = experts(x, weights, ids)
            monkeypatch.setattr(moe, "GROUPED_MIN_ROWS", 1 << 60)
            want = experts(x, weights, ids)
        assert rel_err(got, want) <= 1e-6


def test_run_sorted_takes_the_grouped_path_from_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = random_experts(torch.float32)
    calls: list[str] = []
    monkeypatch.setattr(RoutedExperts, "run_grouped", lambda self, x, c: calls.append("grouped") or x)
    monkeypatch.setattr(RoutedExperts, "run_loop", lambda self, x, c: calls.append("loop") or x)
    t = moe.GROUPED_MIN_ROWS
    for n in (t - 1, t, t + 5):
        experts.run_sorted(torch.zeros(n, experts.hidden), [n] + [0] * (experts.num_local - 1))
    assert calls == ["loop", "grouped", "grouped"]
    monkeypatch.undo()
    int4 = RoutedExperts(CONFIG, int4_group_size=32, dtype=torch.float32)  # INT4 keeps the loop
    assert not int4.grouped_applies(torch.zeros(t + 5, experts.hidden))
    with pytest.raises(ValueError, match="dense"):
        int4.run_grouped(torch.zeros(t, experts.hidden), [t] + [0] * (experts.num_local - 1))


def test_grouped_min_rows_from_the_environment() -> None:
    code = "import k2serve.model.moe as m; print(m.GROUPED_MIN_ROWS)"
    env = {"K2SERVE_MOE_GROUPED_MIN_ROWS": "1000000", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000000"


def test_bench_layer_reports_both_paths() -> None:
    res = moe_grouped_bench.bench_layer(CONFIG, torch.float32, [1, 8], rounds=2)
    assert [r["batch"] for r in res] == [1, 8]
    assert all(r["grouped_ms"] > 0 and r["loop_ms"] > 0 and r["grouped_over_loop"] > 0 for r in res)
