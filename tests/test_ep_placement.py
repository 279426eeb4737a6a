"""Expert placement, the EPLB planner, load window and config (flags -> settings -> launcher), and the
reshard transfer plan: pure functions, no processes."""

from __future__ import annotations

import itertools

import pytest
import torch

from k2serve.experts import (
    EPConfigError,
    EPLBConfig,
    ExpertPlacement,
    PlacementError,
    plan_placement,
    rank_loads,
)
from k2serve.experts.eplb import ExpertLoad, imbalance, replicate
from k2serve.experts.reshard import transfer_plan


def test_contiguous_shares_and_holders() -> None:
    p = ExpertPlacement.contiguous(16, 4)
    assert p.slots == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert p.holders(5) == (1,)
    uneven = ExpertPlacement.contiguous(10, 3)
    assert [len(s) for s in uneven.slots] == [4, 3, 3]
    assert sorted(itertools.chain(*uneven.slots)) == list(range(10))


def test_contiguous_redundant_replicas() -> None:
    p = ExpertPlacement.contiguous(16, 4, redundant_per_rank=2)
    assert p.slots[0] == (0, 1, 2, 3, 4, 5)
    assert p.slots[3] == (12, 13, 14, 15, 0, 1)  # wraps
    assert p.holder_map()[0] == (0, 3) and p.holders(7) == (1,)
    t = p.dispatch_tables()
    assert t.count.tolist()[:6] == [2, 2, 1, 1, 2, 2]
    assert t.rank[0].tolist() == [0, 3] and t.local[0].tolist() == [0, 4]
    assert t.rank[7].tolist() == [1, 1] and t.local[7].tolist() == [3, 3]  # padding repeats replica 0


@pytest.mark.parametrize(
    ("slots", "match"),
    [
        (((0, 1), (1, 2)), "held by no rank"),
        (((0, 1, 1), (2, 3)), "twice"),
        (((0, 1), (2, 9)), "outside"),
        (((0, 1, 2, 3), ()), "holds no expert"),
    ],
)
def test_invalid_placements_name_the_value(slots: tuple[tuple[int, ...], ...], match: str) -> None:
    with pytest.raises(PlacementError, match=match) as info:
        ExpertPlacement(4, slots)
    assert info.value.value is not None


def test_contiguous_rejects_impossible_sizes() -> None:
    with pytest.raises(PlacementError, match="world_size"):
        ExpertPlacement.contiguous(4, 5)
    with pytest.raises(PlacementError, match="replicate"):
        ExpertPlacement.contiguous(4, 1, redundant_per_rank=1)  # one rank cannot hold a copy twice


def test_replicate_gives_spare_slots_to_the_hottest() -> None:
    assert replicate([10.0, 1.0, 1.0, 4.0], 7, max_replicas=4) == [3, 1, 1, 2]
    assert replicate([10.0, 0.0], 4, max_replicas=2) == [2, 2]  # capped by the rank count
    with pytest.raises(PlacementError):
        replicate([1.0, 1.0], 5, max_replicas=2)


def _check_plan(p: ExpertPlacement, capacities: list[int], n: int) -> None:
    assert [len(s) for s in p.slots] == capacities
    assert set(itertools.chain(*p.slots)) == set(range(n))


@pytest.mark.parametrize("seed", range(20))
def test_planner_balances_better_than_contiguous(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, world, slots = 16, 4, 5
    load = (torch.rand(n, generator=g) ** 4 * 1000).round().long()  # skewed, like real routing
    p = plan_placement(load, [slots] * world)
    _check_plan(p, [slots] * world, n)
    planned = rank_loads(p, load)
    baseline = rank_loads(ExpertPlacement.contiguous(n, world, redundant_per_rank=1), load)
    assert planned.max() <= baseline.max() + 1e-9
    assert torch.isclose(planned.sum(), load.double().sum())
    # LPT bound: the most loaded rank exceeds the mean by at most one replica's load
    per_replica = max(float(load[e]) / len(p.holders(e)) for e in range(n))
    assert planned.max() <= planned.mean() + per_replica + 1e-9
    assert p == plan_placement(load.clone(), [slots] * world)  # deterministic


def test_planner_replicates_a_hot_expert_on_distinct_ranks() -> None:
    load = torch.tensor([1000, 1, 1, 1, 1, 1, 1, 1])
    p = plan_placement(load, [3, 3, 3, 3])
    assert len(p.holders(0)) == 4  # all 4 spare slots go to expert 0, one per rank
    assert rank_loads(p, load).max() < 260


def test_planner_handles_zero_load_and_unequal_capacities() -> None:
    _check_plan(plan_placement(torch.zeros(10, dtype=torch.long), [4, 3, 3]), [4, 3, 3], 10)
    _check_plan(plan_placement(torch.arange(10), [5, 4, 4]), [5, 4, 4], 10)
    with pytest.raises(PlacementError):
        plan_placement(torch.ones(10), [3, 3, 3])  # fewer slots than experts


def test_transfer_plan_moves_every_slot_once() -> None:
    old = ExpertPlacement.contiguous(8, 2, redundant_per_rank=1)  # (0..3, 4), (4..7, 0)
    new = ExpertPlacement(8, ((7, 0, 1, 2, 6), (3, 4, 5, 6, 0)))
    plans = [transfer_plan(old, new, r) for r in range(2)]
    for dst in range(2):
        filled = sorted(s for src in range(2) for s in plans[dst][1][src])
        assert filled == list(range(len(new.slots[dst])))
        for src in range(2):  # what src sends dst is what dst expects from src, in order
            sent = [old.slots[src][i] for i in plans[src][0][dst]]
            expected = [new.slots[dst][s] for s in plans[dst][1][src]]
            assert sent == expected
    assert plans[0][1][0] == [1, 2, 3]  # rank 0 keeps 0, 1, 2 locally


def test_expert_load_counts_per_layer() -> None:
    load = ExpertLoad(2, 4)
    load.record(1, torch.tensor([[0, 3], [3, 2]]))
    load.record(1, torch.zeros(0, 2, dtype=torch.long))  # a zero-token forward
    assert load.counts.tolist() == [[0, 0, 0, 0], [1, 0, 1, 2]]
    load.reset()
    assert int(load.counts.sum()) == 0


def test_expert_load_window_keeps_the_last_steps() -> None:
    """end_step moves a step's counts into the window; a full window drops its oldest step; reset
    zeroes only the since-re-placement counts (the window is history EPLB keeps planning from)."""
    load = ExpertLoad(1, 3, window_size=2)
    for step_ids in ([0, 0], [1], [2, 2, 2]):
        load.record(0, torch.tensor(step_ids))
        load.end_step()
    assert load.window.tolist() == [[0, 1, 3]]  # the first step left the window
    assert load.counts.tolist() == [[2, 1, 3]]
    load.reset()
    load.end_step()  # a step without tokens still counts as a step
    assert load.window.tolist() == [[0, 0, 3]] and int(load.counts.sum()) == 0
    unbounded = ExpertLoad(1, 2)
    for _ in range(5):
        unbounded.record(0, torch.tensor([1]))
        unbounded.end_step()
    assert unbounded.window.tolist() == [[0, 5]]


def test_imbalance_is_max_over_mean_rank_load() -> None:
    p = ExpertPlacement.contiguous(4, 2)
    assert imbalance(p, torch.tensor([3, 1, 0, 0])) == 2.0
    assert imbalance(p, torch.tensor([1, 1, 1, 1])) == 1.0
    assert imbalance(p, torch.zeros(4)) == 1.0
    spread = ExpertPlacement(4, ((0, 1, 2), (0, 3)))  # expert 0's load halves over its two replicas
    assert imbalance(spread, torch.tensor([4, 0, 0, 0])) == 1.0


def test_eplb_config_parses_vllm_keys_and_names_bad_ones() -> None:
    cfg = EPLBConfig.from_json('{"window_size": 10, "step_interval": 20, "num_redundant_experts": 4}')
    assert (cfg.window_size, cfg.step_interval, cfg.num_redundant_experts) == (10, 20, 4)
    assert EPLBConfig.from_json(cfg.to_json()) == cfg
    assert EPLBConfig.from_json("{}") == EPLBConfig(1000, 3000, 0)  # vLLM's defaults
    assert cfg.redundant_per_rank(2) == 2 and cfg.redundant_per_rank(4) == 1
    with pytest.raises(EPConfigError, match="multiple of the EP size 3"):
        cfg.redundant_per_rank(3)
    for text, match in [
        ("{", "not JSON"),
        ("[1]", "JSON object"),
        ('{"window": 3}', "unknown.*'window'"),
        ('{"step_interval": "5"}', "integers"),
        ('{"step_interval": true}', "integers"),
        ('{"step_interval": 0}', "step_interval must be >= 1"),
        ('{"window_size": -1}', "window_size must be >= 1"),
        ('{"num_redundant_experts": -2}', "num_redundant_experts must be >= 0"),
    ]:
        with pytest.raises(EPConfigError, match=match):
            EPLBConfig.from_json(text)


def test_eplb_flags_reach_the_worker_and_the_launcher() -> None:
    """--enable-eplb/--eplb-config -> WorkerSettings.eplb -> EPConfig (redundant slots per rank);
    `k2serve up` passes them to every rank; misuse is refused naming the flag."""
    from k2serve.cli import build_parser
    from k2serve.cli.settings import cluster_spec, worker_settings
    from k2serve.worker.runtime import ep_config

    parser = build_parser()
    ep = ["--model", "/m", "--ep", "2", "--ep-init", "tcp://127.0.0.1:29500", "--insecure-internal"]
    eplb = ["--enable-eplb", "--eplb-config", '{"step_interval": 50, "num_redundant_experts": 4}']
    settings = worker_settings("decode", parser.parse_args(["decode", *ep, *eplb]))
    assert settings.eplb == EPLBConfig(step_interval=50, num_redundant_experts=4)
    cfg = ep_config(settings)
    assert (cfg.redundant_per_rank, cfg.eplb) == (2, settings.eplb)
    assert worker_settings("decode", parser.parse_args(["decode", *ep])).eplb is None
    assert ep_config(worker_settings("decode", parser.parse_args(["decode", *ep]))).redundant_per_rank == 0
    assert worker_settings("decode", parser.parse_args(["decode", *ep, "--enable-eplb"])).eplb == EPLBConfig()
    with pytest.raises(EPConfigError, match="needs --enable-eplb"):
        worker_settings("decode", parser.parse_args(["decode", *ep, "--eplb-config", "{}"]))
    with pytest.raises(ValueError, match="--enable-eplb needs --ep > 1"):
        worker_settings(
            "decode", parser.parse_args(["decode", "--model", "/m", "--enable-eplb", "--insecure-internal"])
        )
    odd = ["--enable-eplb", "--eplb-config", '{"num_redundant_experts": 3}']
    with pytest.raises(EPConfigError, match="multiple of the EP size 2"):
        worker_settings("decode", parser.parse_args(["decode", *ep, *odd]))

    spec = cluster_spec(parser.parse_args(["up", "--model", "/m", "--ep", "2", *eplb]))
    argv = spec.worker_args("decode", "decode-0", "127.0.0.1", "127.0.0.1:1", 1, "tcp://127.0.0.1:29500")
    i = argv.index("--eplb-config")
    assert argv[i - 1] == "--enable-eplb" and EPLBConfig.from_json(argv[i + 1]) == settings.eplb
    plain = cluster_spec(parser.parse_args(["up", "--model", "/m", "--ep", "2"]))
    assert "--enable-eplb" not in plain.worker_args("decode", "d", "h", "r", 0, "tcp://h:1")
    with pytest.raises(ValueError, match="--enable-eplb needs --ep > 1"):
        cluster_spec(parser.parse_args(["up", "--model", "/m", "--enable-eplb"]))
