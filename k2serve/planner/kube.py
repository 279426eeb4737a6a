"""`KubernetesConnector`: the prefill and decode StatefulSets of the Helm chart, scaled through their
`scale` subresource (GET and a JSON merge-patch of `spec.replicas`).

Draining on scale-down is Kubernetes' own: the StatefulSet controller deletes the highest ordinals (all
at once: the chart sets `podManagementPolicy: Parallel`); each pod gets SIGTERM, on which the k2serve worker deregisters from the router (no new requests) and finishes
its in-flight work, then exits; the kubelet SIGKILLs it after `terminationGracePeriodSeconds` (chart
values `prefill/decode.terminationGracePeriodSeconds`, 60 s / 120 s by default). No preStop hook is
needed because the worker handles SIGTERM itself; the grace period is the drain deadline. (As of this
writing the worker does not yet honour it: it stops serving 5 s after SIGTERM and the router cancels
its in-flight streams when it deregisters; see tests/test_planner_local.py.)

Operational notes: turn the chart's `autoscaling` (HPA/KEDA) off for a role the planner scales, or the
two fight; a `helm upgrade` sets `replicas` back to the values' count. The planner's service account
needs `get` and `patch` on `statefulsets/scale` in the release's namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from k2serve.planner.config import ROLES
from k2serve.planner.connector import Connector, ConnectorError, check_request

MERGE_PATCH = "application/merge-patch+json"


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
    anything with its `read_namespaced_stateful_set_scale` / `patch_namespaced_stateful_set_scale`).
    `request_timeout_s` bounds each API call."""

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

        from kubernetes import client, config

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

    def replicas(self, role: str) -> int:
        check_request(role, 0)
        scale = self._call(role, None, self.api.read_namespaced_stateful_set_scale)
        return int(scale.spec.replicas or 0)

    def scale(self, role: str, n: int) -> None:
        """PATCH `{"spec": {"replicas": n}}` as a JSON merge patch (the client's default content type
        for this call is a JSON patch, which expects a list of operations)."""
        check_request(role, n)
        self._call(
            role,
            n,
            self.api.patch_namespaced_stateful_set_scale,
            body={"spec": {"replicas": n}},
            _content_type=MERGE_PATCH,
        )

    def close(self) -> None:
        client = getattr(self.api, "api_client", None)
        if client is not None:
            client.close()
