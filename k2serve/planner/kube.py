"""`KubernetesConnector`: the prefill and decode StatefulSets of the Helm chart, read with a GET and
scaled with a JSON merge-patch of `spec.replicas` on their `scale` subresource.

Expert-parallel groups: with the chart's `ep.size` N > 1 a worker is a group of N pods (ordinal i is
rank i % N of group i / N), and the StatefulSet's replicas are groups x N. Adding or removing single
pods would leave a group without some of its ranks, so the connector counts in groups: `replicas()`
is the StatefulSet's pods / N and `scale(role, n)` sets n x N pods; the StatefulSet controller then
adds or removes the highest ordinals, i.e. whole groups. N is read from the StatefulSet each time (a
`helm upgrade` may change it): its `k2serve.io/ep-size` annotation (the chart sets it), else the
`--ep N` of its pod template's container, else 1.

Draining on scale-down is Kubernetes' own: the StatefulSet controller deletes the highest ordinals (all
at once: the chart sets `podManagementPolicy: Parallel`); each pod gets SIGTERM, on which the k2serve worker deregisters from the router (no new requests) and finishes
its in-flight work, then exits; the kubelet SIGKILLs it after `terminationGracePeriodSeconds` (chart
values `prefill/decode.terminationGracePeriodSeconds`, 60 s / 120 s by default). No preStop hook is
needed because the worker handles SIGTERM itself; the grace period is the drain deadline. (As of this
writing the worker does not yet honour it: it stops serving 5 s after SIGTERM and the router cancels
its in-flight streams when it deregisters; see tests/test_planner_local.py.)

Operational notes: turn the chart's `autoscaling` (HPA/KEDA) off for a role the planner scales, or the
two fight; a `helm upgrade` sets `replicas` back to the values' count. The planner's service account
needs `get` on `statefulsets` and `patch` on `statefulsets/scale` in the release's namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from k2serve.extras import MissingExtraError
from k2serve.planner.config import ROLES
from k2serve.planner.connector import Connector, ConnectorError, check_request

MERGE_PATCH = "application/merge-patch+json"
EP_SIZE_ANNOTATION = "k2serve.io/ep-size"


def ep_size_of(statefulset: Any) -> int:
    """The expert-parallel group size of a StatefulSet (a `kubernetes.client.V1StatefulSet`): its
    `k2serve.io/ep-size` annotation, else the value after `--ep` in a container's command or args,
    else 1. Raises ValueError naming the source when the value is not an integer >= 1."""
    raw = (statefulset.metadata.annotations or {}).get(EP_SIZE_ANNOTATION)
    source = f"annotation {EP_SIZE_ANNOTATION}"
    if raw is None:
        for c in statefulset.spec.template.spec.containers:
            argv = [*(c.command or []), *(c.args or [])]
            if "--ep" in argv:
                k = argv.index("--ep")
                raw = argv[k + 1] if k + 1 < len(argv) else ""
                source = f"container {c.name!r}: --ep"
                break
    if raw is None:
        return 1
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{source} is {raw!r}, not an expert-parallel group size (an integer >= 1)")
    return size


def chart_fullname(release: str, chart: str = "k2serve", fullname_override: str | None = None) -> str:
    """`k2serve.fullname` of `helm/k2serve/templates/_helpers.tpl`: the override, else the release name
    when it contains the chart name, else "<release>-<chart>"; cut to 40 characters, no trailing '-'."""
    if fullname_override:
        name = fullname_override
    elif chart in release:
        name = release
    else:
        name = f"{release}-{chart}"
    return name[:40].rstrip("-")


def statefulset_names(
    release: str, chart: str = "k2serve", fullname_override: str | None = None
) -> dict[str, str]:
    """The chart's worker StatefulSets ("<fullname>-prefill", "<fullname>-decode"), by role."""
    full = chart_fullname(release, chart, fullname_override)
    return {role: f"{full}-{role}" for role in ROLES}


class KubernetesConnector(Connector):
    """Scales `statefulsets[role]` in `namespace` through `api`, a `kubernetes.client.AppsV1Api` (or
    anything with its `read_namespaced_stateful_set` / `patch_namespaced_stateful_set_scale`), in whole
    expert-parallel groups (see the module docstring). `request_timeout_s` bounds each API call."""

    def __init__(
        self, api: Any, namespace: str, statefulsets: Mapping[str, str], request_timeout_s: float = 10.0
    ) -> None:
        if sorted(statefulsets) != sorted(ROLES):
            raise ValueError(f"statefulsets must name exactly {ROLES}, got {sorted(statefulsets)}")
        if not namespace:
            raise ValueError("namespace must not be empty")
        self.api = api
        self.namespace = namespace
        self.statefulsets = dict(statefulsets)
        self.timeout = request_timeout_s

    @classmethod
    def from_environment(
        cls, namespace: str, statefulsets: Mapping[str, str], kubeconfig: str | None = None
    ) -> KubernetesConnector:
        """In a pod (KUBERNETES_SERVICE_HOST set and no `kubeconfig`): the service account; else the
        kubeconfig file (default ~/.kube/config, current context)."""
        import os

        try:
            from kubernetes import client, config
        except ImportError as e:
            raise MissingExtraError("kubernetes", "kube", "the Kubernetes connector") from e

        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=kubeconfig)
        return cls(client.AppsV1Api(), namespace, statefulsets)

    def _call(self, role: str, n: int | None, fn: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        name = self.statefulsets[role]
        try:
            return fn(name, self.namespace, _request_timeout=self.timeout, **kwargs)
        except ApiException as e:
            raise ConnectorError(
                role, n, f"StatefulSet {self.namespace}/{name}: HTTP {e.status} {e.reason}: {e.body}"
            ) from e
        except HTTPError as e:
            raise ConnectorError(role, n, f"StatefulSet {self.namespace}/{name}: {e}") from e

    def _read(self, role: str, n: int | None) -> tuple[int, int]:
        """The role's StatefulSet: (pods it is set to, pods per expert-parallel group)."""
        sts = self._call(role, n, self.api.read_namespaced_stateful_set)
        try:
            size = ep_size_of(sts)
        except ValueError as e:
            name = f"{self.namespace}/{self.statefulsets[role]}"
            raise ConnectorError(role, n, f"StatefulSet {name}: {e}") from e
        return int(sts.spec.replicas or 0), size

    def replicas(self, role: str) -> int:
        """The role's workers: the StatefulSet's pods / its group size. A pod count that is not whole
        groups (the StatefulSet scaled by hand) is a ConnectorError saying what to set."""
        check_request(role, 0)
        pods, size = self._read(role, None)
        if pods % size:
            raise ConnectorError(
                role,
                None,
                f"StatefulSet {self.namespace}/{self.statefulsets[role]} has {pods} pods, not whole "
                f"expert-parallel groups of {size}: scale it to a multiple of {size}",
            )
        return pods // size

    def scale(self, role: str, n: int) -> None:
        """Set the role's StatefulSet to n groups: PATCH `{"spec": {"replicas": n x group size}}` as a
        JSON merge patch (the client's default content type for this call is a JSON patch, which expects
        a list of operations)."""
        check_request(role, n)
        _, size = self._read(role, n)
        self._call(
            role,
            n,
            self.api.patch_namespaced_stateful_set_scale,
            body={"spec": {"replicas": n * size}},
            _content_type=MERGE_PATCH,
        )

    def close(self) -> None:
        client = getattr(self.api, "api_client", None)
        if client is not None:
            client.close()
