"""`RouterScraper`: one Observation per call, read over HTTP from the router (`GET /metrics`,
`GET /cluster/workers`, which needs the API key when the router has keys: the client sends it) plus
the connector's replica counts."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from k2serve.planner.config import ROLES
from k2serve.planner.observation import MetricsError, Observation, RouterMetrics, observe, parse_metrics


class RouterScraper:
    """Keeps the previous scrape so latency quantiles cover only the time since it (the first call's
    cover the router's whole life). `replicas(role)` gives the connector's counts. `timeout_s` bounds
    each HTTP request; failures raise MetricsError naming the URL."""

    def __init__(
        self,
        url: str,
        replicas: Callable[[str], int],
        quantile: float,
        timeout_s: float = 5.0,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        self.replicas = replicas
        self.quantile = quantile
        self.client = client or httpx.Client(timeout=timeout_s)
        self.clock = clock
        self._previous: RouterMetrics | None = None
        self._previous_t: float | None = None

    def _get(self, path: str) -> httpx.Response:
        url = f"{self.url}{path}"
        try:
            r = self.client.get(url)
        except httpx.HTTPError as e:
            raise MetricsError(url, f"unreachable ({e})") from e
        if r.status_code != 200:
            raise MetricsError(url, f"HTTP {r.status_code}: {r.text[:200]}")
        return r

    def observe(self) -> Observation:
        metrics = parse_metrics(self._get("/metrics").text, f"{self.url}/metrics")
        try:
            workers = self._get("/cluster/workers").json()
        except ValueError as e:
            raise MetricsError(f"{self.url}/cluster/workers", f"not JSON ({e})") from e
        now = self.clock()
        window = now - self._previous_t if self._previous_t is not None else 0.0
        obs = observe(
            metrics, self._previous, workers, {r: self.replicas(r) for r in ROLES}, self.quantile, window
        )
        self._previous, self._previous_t = metrics, now
        return obs

    def close(self) -> None:
        self.client.close()
