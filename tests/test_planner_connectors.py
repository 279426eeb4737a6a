"""Connectors: the virtual reference, the Kubernetes connector against a stand-in API server (a small
HTTP server on localhost implementing only the StatefulSet GET and scale PATCH the client uses; not a
real Kubernetes), scaling expert-parallel StatefulSets in whole groups, the Ray connector against a
fake Ray handle (ray is not installed here), and the StatefulSet names and group-size annotation
against the chart as Helm renders it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from k2serve.planner.config import PlannerConfig
from k2serve.planner.connector import ConnectorError, ScaleAction, VirtualConnector, apply
from k2serve.planner.kube import MERGE_PATCH, KubernetesConnector, chart_fullname, statefulset_names
from k2serve.planner.observation import Observation, RoleLoad
from k2serve.planner.policy import Planner
from k2serve.planner.ray_actors import RayConnector

NS = "llm"
NAMES = {"prefill": "k2-k2serve-prefill", "decode": "k2-k2serve-decode"}


# ---- virtual connector and apply() -----------------------------------------------------------
def test_virtual_connector_records_actions_and_checks_arguments() -> None:
    c = VirtualConnector({"prefill": 1, "decode": 2})
    c.scale("prefill", 3)
    c.scale("prefill", 3)  # no-op, not recorded
    c.scale("decode", 0)
    assert c.actions == [ScaleAction("prefill", 1, 3), ScaleAction("decode", 2, 0)]
    assert (c.replicas("prefill"), c.replicas("decode")) == (3, 0)
    with pytest.raises(ValueError, match="role"):
        c.scale("router", 1)
    with pytest.raises(ValueError, match="replicas"):
        c.scale("decode", -1)


def test_apply_scales_only_the_changed_roles() -> None:
    o = Observation(RoleLoad(2, 2, waiting=40), RoleLoad(1, 1), ttft_s=None, itl_s=None, window_s=5.0)
    planner = Planner(PlannerConfig(up_after=1))
    c = VirtualConnector({"prefill": 2, "decode": 1})
    done = apply(planner.decide(o, 0.0), c)
    assert done == [("prefill", 2, 6)]
    assert c.actions == [ScaleAction("prefill", 2, 6)]


# ---- Kubernetes, against a stand-in API server ------------------------------------------------
def statefulset(name: str, annotations: dict[str, str] | None = None, args: list[str] | None = None) -> dict:
    """A minimal StatefulSet object (what the client needs to deserialize one)."""
    labels = {"app": name}
    container = {"name": "worker", "image": "k2serve", "args": args or ["decode", "--port", "50070"]}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
        "spec": {
            "selector": {"matchLabels": labels},
            "serviceName": f"{name}-headless",
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


class StandInAPIServer:
    """Stand-in for the Kubernetes API server: GET of /apis/apps/v1/namespaces/<ns>/statefulsets/<name>
    (`objects[name]`, default a minimal StatefulSet without expert parallelism, with `spec.replicas` the
    live count) and GET / PATCH of its `/scale`. Records every request; answers `fail_with` (an HTTP
    status) to PATCHes when set."""

    def __init__(self, replicas: dict[str, int], objects: dict[str, dict] | None = None) -> None:
        self.replicas = dict(replicas)
        self.objects = {name: statefulset(name) for name in replicas} | (objects or {})
        self.requests: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _target(self, scale: bool = True) -> str | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis apps v1 namespaces <ns> statefulsets <name> [scale]
                if len(parts) == 7 + scale and parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[5] == "statefulsets" and parts[7:] == ["scale"] * scale and parts[4] == NS and parts[6] in server.replicas:  # fmt: skip
                    return parts[6]
                return None

            def _scale(self, name: str) -> dict[str, Any]:
                return {
                    "apiVersion": "autoscaling/v1",
                    "kind": "Scale",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"replicas": server.replicas[name]},
                    "status": {"replicas": server.replicas[name]},
                }

            def _not_found(self) -> None:
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})  # fmt: skip

            def do_GET(self) -> None:
                server.requests.append({"method": "GET", "path": self.path})
                if (name := self._target(scale=False)) is not None:
                    obj = json.loads(json.dumps(server.objects[name]))
                    obj["spec"]["replicas"] = server.replicas[name]
                    return self._reply(200, obj)
                name = self._target()
                if name is None:
                    return self._not_found()
                self._reply(200, self._scale(name))

            def do_PATCH(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                server.requests.append(
                    {"method": "PATCH", "path": self.path, "content_type": self.headers["Content-Type"], "body": body}
                )  # fmt: skip
                name = self._target()
                if name is None:
                    return self._not_found()
                if server.fail_with is not None:
                    return self._reply(server.fail_with, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": server.fail_with})  # fmt: skip
                if self.headers["Content-Type"] != MERGE_PATCH or not isinstance(body, dict):
                    return self._reply(415, {"kind": "Status", "code": 415, "reason": "UnsupportedMediaType"})
                server.replicas[name] = int(body["spec"]["replicas"])
                self._reply(200, self._scale(name))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server() -> Iterator[StandInAPIServer]:
    s = StandInAPIServer({NAMES["prefill"]: 1, NAMES["decode"]: 2})
    yield s
    s.close()


def _chart_statefulsets(helm: Any, yaml: Any, values: dict, release: str) -> dict[str, dict]:
    """The chart's StatefulSets, by name, rendered by the embedded Helm with these values."""
    chart = helm.Chart.load(str(Path(__file__).resolve().parents[1] / "helm" / "k2serve"))
    rendered = chart.render(values, name=release, namespace=NS, is_install=True)
    return {
        doc["metadata"]["name"]: doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc and doc.get("kind") == "StatefulSet"
    }


def _connector(server: StandInAPIServer, names: dict[str, str] = NAMES) -> KubernetesConnector:
    from kubernetes import client

    cfg = client.Configuration(host=server.url)
    return KubernetesConnector(client.AppsV1Api(client.ApiClient(cfg)), NS, names, request_timeout_s=5)


def test_kubernetes_connector_reads_and_merge_patches_the_scale_subresource(
    api_server: StandInAPIServer,
) -> None:
    c = _connector(api_server)
    try:
        assert (c.replicas("prefill"), c.replicas("decode")) == (1, 2)
        c.scale("prefill", 4)
        c.scale("decode", 1)
        assert (c.replicas("prefill"), c.replicas("decode")) == (4, 1)
    finally:
        c.close()
    patches = [r for r in api_server.requests if r["method"] == "PATCH"]
    assert [(p["path"].split("?")[0], p["content_type"], p["body"]) for p in patches] == [
        (f"/apis/apps/v1/namespaces/{NS}/statefulsets/{NAMES['prefill']}/scale", MERGE_PATCH, {"spec": {"replicas": 4}}),
        (f"/apis/apps/v1/namespaces/{NS}/statefulsets/{NAMES['decode']}/scale", MERGE_PATCH, {"spec": {"replicas": 1}}),
    ]  # fmt: skip
    assert api_server.replicas == {NAMES["prefill"]: 4, NAMES["decode"]: 1}


def test_kubernetes_connector_applies_planner_decisions(api_server: StandInAPIServer) -> None:
    c = _connector(api_server)
    planner = Planner(PlannerConfig(up_after=1))
    busy = Observation(
        RoleLoad(c.replicas("prefill"), 1, waiting=10), RoleLoad(c.replicas("decode"), 2), 30.0, 0.01, 5.0
    )
    assert apply(planner.decide(busy, 0.0), c) == [("prefill", 1, 3)]  # TTFT 3x SLO -> ceil(1 x 3)
    assert api_server.requests[-1]["body"] == {"spec": {"replicas": 3}}
    c.close()


def test_kubernetes_errors_are_typed_and_name_the_statefulset(api_server: StandInAPIServer) -> None:
    c = _connector(api_server)
    api_server.fail_with = 403
    with pytest.raises(ConnectorError) as e:
        c.scale("decode", 3)
    assert e.value.role == "decode" and e.value.replicas == 3
    assert f"{NS}/{NAMES['decode']}" in str(e.value) and "403" in str(e.value)
    missing = _connector(api_server, {"prefill": "nope-prefill", "decode": NAMES["decode"]})
    with pytest.raises(ConnectorError, match="404"):
        missing.replicas("prefill")
    c.close()
    missing.close()


def test_kubernetes_connector_scales_whole_ep_groups() -> None:
    """Decode in expert-parallel groups of 2 (the chart's annotation): the planner's worker count is
    groups, the StatefulSet's replicas pods = groups x 2; prefill without EP is counted in pods."""
    decode = statefulset(NAMES["decode"], {"k2serve.io/ep-size": "2"})
    server = StandInAPIServer({NAMES["prefill"]: 1, NAMES["decode"]: 4}, {NAMES["decode"]: decode})
    c = _connector(server)
    try:
        assert (c.replicas("prefill"), c.replicas("decode")) == (1, 2)
        c.scale("decode", 3)
        assert server.replicas[NAMES["decode"]] == 6 and c.replicas("decode") == 3
        planner = Planner(PlannerConfig(up_after=1))
        busy = Observation(RoleLoad(1, 1), RoleLoad(c.replicas("decode"), 6, waiting=200), None, None, 5.0)
        (action,) = apply(planner.decide(busy, 0.0), c)
        assert action[:2] == ("decode", 3) and action[2] > 3
        assert server.replicas[NAMES["decode"]] == 2 * action[2]  # whole groups
        assert server.requests[-1]["body"] == {"spec": {"replicas": 2 * action[2]}}
        c.scale("decode", 0)
        assert server.replicas[NAMES["decode"]] == 0 and c.replicas("decode") == 0
        server.replicas[NAMES["decode"]] = 5  # scaled by hand: a group split
        with pytest.raises(ConnectorError, match="has 5 pods, not whole expert-parallel groups of 2"):
            c.replicas("decode")
    finally:
        c.close()
        server.close()


def test_kubernetes_group_size_from_ep_flag_and_bad_sizes_named() -> None:
    """Without the annotation (a StatefulSet not from this chart version) the container's --ep counts;
    a size that is not an integer >= 1 is a ConnectorError naming where it came from."""
    objects = {
        NAMES["prefill"]: statefulset(NAMES["prefill"], args=["prefill", "--ep", "4", "--ep-timeout", "300"]),
        NAMES["decode"]: statefulset(NAMES["decode"], {"k2serve.io/ep-size": "two"}),
    }
    server = StandInAPIServer({NAMES["prefill"]: 8, NAMES["decode"]: 2}, objects)
    c = _connector(server)
    try:
        assert c.replicas("prefill") == 2
        c.scale("prefill", 1)
        assert server.replicas[NAMES["prefill"]] == 4
        with pytest.raises(ConnectorError, match=r"annotation k2serve.io/ep-size is 'two', not an expert"):
            c.scale("decode", 1)
        assert server.replicas[NAMES["decode"]] == 2  # nothing patched
        server.objects[NAMES["decode"]] = statefulset(NAMES["decode"], args=["decode", "--ep", "0"])
        with pytest.raises(ConnectorError, match=r"container 'worker': --ep is '0'"):
            c.replicas("decode")
    finally:
        c.close()
        server.close()


def test_kubernetes_connector_on_the_rendered_ep_chart() -> None:
    """The StatefulSets as the chart renders them with decode groups of 2: the connector reads the
    chart's annotation, reports the values' group counts, and scales decode in pairs of pods."""
    values = {"prefill": {"replicas": 2}, "decode": {"replicas": 3, "ep": {"size": 2}}}
    sets = _chart_statefulsets(helm, yaml, values, "k2")
    assert sets[NAMES["decode"]]["metadata"]["annotations"]["k2serve.io/ep-size"] == "2"
    server = StandInAPIServer({n: sets[n]["spec"]["replicas"] for n in NAMES.values()}, sets)
    assert server.replicas == {NAMES["prefill"]: 2, NAMES["decode"]: 6}
    c = _connector(server)
    try:
        assert (c.replicas("prefill"), c.replicas("decode")) == (2, 3)
        c.scale("decode", 4)
        c.scale("prefill", 3)
        assert server.replicas == {NAMES["prefill"]: 3, NAMES["decode"]: 8}
    finally:
        c.close()
        server.close()


def test_kubernetes_connector_unreachable_api_server_is_a_connector_error() -> None:
    from kubernetes import client

    cfg = client.Configuration(host="http://127.0.0.1:9")  # discard port: nothing listens
    cfg.retries = 0
    c = KubernetesConnector(client.AppsV1Api(client.ApiClient(cfg)), NS, NAMES, request_timeout_s=2)
    with pytest.raises(ConnectorError, match="prefill"):
        c.replicas("prefill")
    c.close()


def test_fullname_follows_the_chart_helper() -> None:
    assert chart_fullname("k2") == "k2-k2serve"
    assert chart_fullname("my-k2serve-prod") == "my-k2serve-prod"  # contains the chart name
    assert chart_fullname("k2", fullname_override="serve") == "serve"
    assert chart_fullname("a" * 38) == ("a" * 38 + "-k")  # 40 characters
    assert chart_fullname("a" * 39) == "a" * 39  # "<39 a>-" cut to 40, trailing '-' dropped
    assert statefulset_names("k2") == NAMES


def test_statefulset_names_match_the_rendered_chart() -> None:
    for release, values in (("k2", {}), ("k2serve-prod", {}), ("k2", {"fullnameOverride": "kimi"})):
        sets = _chart_statefulsets(helm, yaml, values, release)
        names = statefulset_names(release, fullname_override=values.get("fullnameOverride"))
        assert set(names.values()) <= set(sets), (release, sorted(sets))
        # Draining on scale-down relies on the pods' grace period (the worker drains on SIGTERM).
        for name in names.values():
            assert sets[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


# ---- Ray, against a fake handle ------------------------------------------------------------------
class FakeRayHandle:
    """Fake of the RayHandle interface (ray is not installed): actors are names in a dict; draining
    ones stay listed until `finish_drains()`."""

    def __init__(self, live: list[str] | None = None) -> None:
        self.live = {n: "running" for n in live or []}
        self.calls: list[tuple[str, str]] = []
        self.refuse = False

    def list_workers(self, prefix: str) -> list[str]:
        return sorted(n for n in self.live if n.startswith(prefix))

    def start_worker(self, role: str, name: str) -> None:
        if self.refuse or name in self.live:
            raise RuntimeError(f"cannot place actor {name}")
        self.calls.append(("start", name))
        self.live[name] = "running"

    def drain_worker(self, name: str, timeout_s: float) -> None:
        if name not in self.live:
            raise RuntimeError(f"no actor {name}")
        self.calls.append(("drain", name))
        self.live[name] = "draining"

    def finish_drains(self) -> None:
        self.live = {n: s for n, s in self.live.items() if s != "draining"}


def test_ray_connector_starts_lowest_free_names_and_drains_highest_first() -> None:
    h = FakeRayHandle(["k2serve-decode-0", "k2serve-decode-1", "other-decode-0"])
    c = RayConnector(h)
    assert (c.replicas("prefill"), c.replicas("decode")) == (0, 2)  # adopts its prefix only
    c.scale("prefill", 2)
    c.scale("decode", 1)
    assert h.calls == [
        ("start", "k2serve-prefill-0"),
        ("start", "k2serve-prefill-1"),
        ("drain", "k2serve-decode-1"),
    ]
    assert c.replicas("decode") == 1  # the draining actor no longer counts, though still alive
    c.scale("decode", 2)  # its index is still taken: a new name
    assert h.calls[-1] == ("start", "k2serve-decode-2")
    h.finish_drains()
    assert c.replicas("decode") == 2
    c.scale("decode", 3)
    assert h.calls[-1] == ("start", "k2serve-decode-1")  # freed after the drain ended


def test_ray_refusal_is_a_connector_error() -> None:
    h = FakeRayHandle()
    h.refuse = True
    with pytest.raises(ConnectorError) as e:
        RayConnector(h).scale("prefill", 1)
    assert e.value.role == "prefill" and e.value.replicas == 1 and "cannot place" in str(e.value)


# ---- the live loop -----------------------------------------------------------------------------
def test_run_planner_observes_decides_applies_and_survives_metrics_and_connector_errors() -> None:
    import threading

    from k2serve.planner.loop import run_planner
    from k2serve.planner.observation import MetricsError

    class Flaky(VirtualConnector):
        """Refuses its first scale action."""

        refused = False

        def scale(self, role: str, n: int) -> None:
            if not self.refused:
                self.refused = True
                raise ConnectorError(role, n, "HTTP 409 Conflict")
            super().scale(role, n)

    conn = Flaky({"prefill": 1, "decode": 1})
    stop = threading.Event()
    rounds = iter(range(100))

    def observe() -> Observation:
        k = next(rounds)
        if k == 1:
            raise MetricsError("http://router/metrics", "unreachable")
        if k == 4:
            stop.set()
        n = conn.replicas("prefill")
        return Observation(RoleLoad(n, n, waiting=30), RoleLoad(1, 1), ttft_s=None, itl_s=None, window_s=1.0)

    lines: list[str] = []
    clock = iter(float(t) for t in range(1000))
    planner = Planner(PlannerConfig(up_after=1, up_cooldown_s=0.0))
    decisions = run_planner(planner, observe, conn, 0.0, stop, lines.append, clock=lambda: next(clock))
    assert "round skipped: ConnectorError: scaling prefill to 5: HTTP 409 Conflict" in lines[0]
    assert "round skipped: MetricsError: http://router/metrics: unreachable" in lines[1]
    assert "prefill   5  decode   1  prefill: up 1->5: 30 outstanding" in lines[2]  # retried, applied
    assert len(decisions) == 4 and conn.actions[0] == ScaleAction("prefill", 1, 5)
