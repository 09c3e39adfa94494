"""Prometheus metrics: request latency by route template, and job gauges read at scrape time.

Why a pure ASGI middleware (not ``BaseHTTPMiddleware``): the latter buffers and re-wraps
streaming responses, which would break SSE and artifact downloads. Why the route *template*
(``/jobs/{job_id}``) as a label: raw paths carry job ids and would explode the series count.
Why a custom collector for jobs: gauges set by the API would be wrong as soon as a worker
changes a row, so the collector asks the database (the truth) at every scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def request_histogram(registry: CollectorRegistry) -> Histogram:
    """The latency histogram, registered in the app's own registry (one per app instance)."""
    return Histogram(
        "pcd_http_request_duration_seconds",
        "HTTP request latency (to the end of the response body).",
        ["route", "method", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )


class MetricsMiddleware:
    """Times every HTTP request and labels it by route template, method and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before starting a response

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # FastAPI puts the matched route in the scope; unmatched paths share one label.
            template = getattr(route, "path", None) or "<unmatched>"
            self.histogram.labels(template, scope.get("method", ""), str(status)).observe(
                time.perf_counter() - start)


class JobsCollector(Collector):
    """``pcd_jobs{status}`` and ``pcd_queue_depth{queue}`` read from the database per scrape.

    ``status_counts`` returns ``{status: n}``; ``queued_by_queue`` returns ``{queue: n}`` of jobs
    waiting in the database (the broker's own depth is not portable across transports, and a
    job queued in the DB but lost by the broker is exactly what operators need to see).
    """

    def __init__(self, status_counts: Callable[[], Mapping[str, int]],
                 queued_by_queue: Callable[[], Mapping[str, int]],
                 statuses: Iterable[str]) -> None:
        self._status_counts = status_counts
        self._queued = queued_by_queue
        self._statuses = tuple(statuses)

    def describe(self) -> Iterable[Metric]:
        """Nothing: registration must not query the database (it may not be migrated yet)."""
        return []

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("pcd_jobs", "Jobs by status (from the database).",
                                 labels=["status"])
        depth = GaugeMetricFamily("pcd_queue_depth", "Jobs queued and not yet started.",
                                  labels=["queue"])
        up = GaugeMetricFamily("pcd_jobs_collector_up", "1 if the job gauges could be read.")
        try:
            counts = dict(self._status_counts())
            queued = dict(self._queued())
        except Exception:  # a scrape must not 500 because the DB blinked
            log.warning("job metrics collection failed", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        for status in sorted(set(self._statuses) | set(counts)):
            jobs.add_metric([status], counts.get(status, 0))
        for queue, n in sorted(queued.items()):
            depth.add_metric([queue], n)
        up.add_metric([], 1)
        yield jobs
        yield depth
        yield up

