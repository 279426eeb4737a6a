"""The Ray placement plan, without Ray: groups and their bundles, packed EP ranks, groups spread over
the nodes able to hold them, and the errors that name what cannot be placed."""

from __future__ import annotations

import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import ClusterSpec
from k2serve.cluster.ray_plan import NodeInfo, RayOptions, plan_groups
from k2serve.cluster.ray_runtime import RayCluster

GPU_NODE = {"CPU": 16.0, "GPU": 8.0}


def spec(prefill: int = 1, decode: int = 1, ep: int = 1) -> ClusterSpec:
    return local_cluster_spec("/m", num_prefill=prefill, num_decode=decode, ep_size=ep)


def nodes(*resources: dict[str, float]) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", r) for i, r in enumerate(resources)]


def test_one_group_per_worker_with_one_bundle_per_rank() -> None:
    opts = RayOptions(rank_resources={"CPU": 2, "GPU": 1})
    plan = plan_groups(spec(prefill=2, decode=1, ep=4), opts, nodes(GPU_NODE, GPU_NODE))
    assert [g.name for g in plan] == ["router", "prefill-0", "prefill-1", "decode-0"]
    router, *workers = plan
    assert router.bundles == ({"CPU": 1.0},) and router.process_names == ("router",)
    for g in workers:
        assert g.strategy == "STRICT_PACK" and g.ep_size == 4
        assert g.bundles == tuple({"CPU": 2, "GPU": 1} for _ in range(4))
        assert g.total() == {"CPU": 8.0, "GPU": 4.0}
    assert workers[0].process_names == tuple(f"prefill-0-ep{r}" for r in range(4))
    assert plan_groups(spec(), opts, nodes(GPU_NODE))[1].process_names == ("prefill-0",)


def test_groups_spread_round_robin_over_nodes_that_hold_a_whole_group() -> None:
    head = {"CPU": 8.0}  # no GPU: never a target for GPU groups
    opts = RayOptions(rank_resources={"CPU": 1, "GPU": 1})
    plan = plan_groups(spec(prefill=2, decode=2, ep=8), opts, nodes(head, GPU_NODE, GPU_NODE, GPU_NODE))
    target = {g.name: g.target_node for g in plan}
    assert target["router"] is None
    # prefill-0, decode-0, prefill-1, decode-1 take n1, n2, n3, n1: each role on distinct nodes first
    assert target == {
        "router": None,
        "prefill-0": "n1",
        "decode-0": "n2",
        "prefill-1": "n3",
        "decode-1": "n1",
    }
    small = {"CPU": 16.0, "GPU": 4.0}  # holds a rank but not a group of 8: not a target
    plan = plan_groups(spec(ep=8), opts, nodes(small, GPU_NODE))
    assert {g.target_node for g in plan[1:]} == {"n1"}


def test_no_targets_when_packing_loosely_spreading_off_or_no_node_holds_a_group() -> None:
    many = nodes(GPU_NODE, GPU_NODE)
    for opts in (
        RayOptions(rank_resources={"CPU": 1, "GPU": 1}, group_strategy="PACK"),
        RayOptions(rank_resources={"CPU": 1, "GPU": 1}, spread_groups=False),
    ):
        plan = plan_groups(spec(ep=2), opts, many)
        assert all(g.target_node is None for g in plan)
        assert {g.strategy for g in plan[1:]} == {opts.group_strategy}
    opts = RayOptions(rank_resources={"CPU": 1, "GPU": 1})
    assert all(g.target_node is None for g in plan_groups(spec(ep=16), opts, many))


def test_no_node_holds_a_rank_is_an_error_naming_the_need() -> None:
    with pytest.raises(
        ValueError, match=r"no Ray node can hold one worker process needing \{'CPU': 1.0, 'GPU': 1"
    ):
        plan_groups(spec(), RayOptions(rank_resources={"CPU": 1, "GPU": 1}), nodes({"CPU": 64.0}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_resources": {"GPU": 1}}, "rank_resources needs CPU > 0"),
        ({"router_resources": {"CPU": 0}}, "router_resources needs CPU > 0"),
        ({"rank_resources": {"CPU": 1, "GPU": -1}}, "resources must be >= 0"),
        ({"group_strategy": "SPREAD"}, "group_strategy must be one of"),
        ({"max_restarts": -2}, "max_restarts must be >= -1"),
        ({"placement_timeout_s": 0}, "placement_timeout_s must be > 0"),
    ],
)
def test_options_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RayOptions(**kwargs)


def test_options_are_frozen_copies() -> None:
    res = {"CPU": 1.0}
    opts = RayOptions(rank_resources=res)
    res["CPU"] = 99.0
    assert opts.rank_resources["CPU"] == 1.0
    with pytest.raises(TypeError):
        opts.rank_resources["CPU"] = 2.0  # type: ignore[index]


def test_status_table_lists_each_workers_metrics_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """`k2serve up --ray` prints each process's metrics URL as the router's /cluster/workers lists it
    ("-" for one not registered yet); no Ray needed: the actors' info and the router's answer are faked."""
    cluster = RayCluster(spec(prefill=1, decode=1), "auto")
    cluster.router_ip, cluster.http_port = "10.0.0.1", 8000
    infos = [
        {"name": "router", "node_ip": "10.0.0.1", "pid": 11, "log": "/w/router.log"},
        {"name": "prefill-0", "node_ip": "10.0.0.2", "pid": 12, "log": "/w/prefill-0.log"},
        {"name": "decode-0", "node_ip": "10.0.0.3", "pid": 13, "log": "/w/decode-0.log"},
    ]
    registered = [{"worker_id": "prefill-0", "metrics_url": "http://10.0.0.2:9100/metrics"}]
    monkeypatch.setattr(cluster, "info", lambda: infos)
    monkeypatch.setattr(cluster, "workers", lambda: registered)
    rows = [line.split() for line in cluster.status_table().splitlines()]
    assert rows == [
        ["process", "node", "pid", "metrics", "log"],
        ["router", "10.0.0.1", "11", "http://10.0.0.1:8000/metrics", "/w/router.log"],
        ["prefill-0", "10.0.0.2", "12", "http://10.0.0.2:9100/metrics", "/w/prefill-0.log"],
        ["decode-0", "10.0.0.3", "13", "-", "/w/decode-0.log"],
    ]

    def down() -> list[dict]:
        raise ConnectionError("router not up")

    monkeypatch.setattr(cluster, "workers", down)
    assert [line.split()[3] for line in cluster.status_table().splitlines()[1:]] == [
        "http://10.0.0.1:8000/metrics",
        "-",
        "-",
    ]
