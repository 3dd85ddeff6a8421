"""Prometheus metrics at `GET /metrics` on every service and on the gateway (D28).

Each app has its own registry (several apps may share a process in tests). HTTP requests are
counted by route template, never by raw path, so patient ids never become label values.
A service also reports its store's head, how far its relay has published, and what its consumer
has handled, duplicated and dead-lettered: the numbers an operator watches for a stuck relay or
a poison topic.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.kafka import broker_reachable

UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (`/v1/patients/{patient_id}`)."""
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("trial_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram("trial_http_request_duration_seconds",
                                  "Time to the end of each HTTP answer", ["method", "route"],
                                  registry=self.registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.head = Gauge("trial_store_head_position", "Position of the last committed event",
                          registry=self.registry)
        self.relay_lag = Gauge("trial_relay_lag_events",
                               "Committed events the relay has not published yet",
                               registry=self.registry)

    async def response(self, refresh: Callable[[], Awaitable[None]] | None = None) -> Response:
        if refresh is not None:
            await refresh()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts and times every HTTP answer, labelled by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 label: Callable[[Scope], str] = route_template) -> None:
        self.app = app
        self.metrics = metrics
        self.label = label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route, method = self.label(scope), scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.perf_counter() - started)


class CountersCollector(Collector):
    """Counters kept as plain integers elsewhere (the consumer's), read at each scrape."""

    def __init__(self, read: Callable[[], dict[str, int]], name: str, documentation: str,
                 label: str) -> None:
        self.read, self.name, self.documentation, self.label = read, name, documentation, label

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value_label, value in self.read().items():
            family.add_metric([value_label], value)
        yield family


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    refresh = getattr(request.app.state, "refresh_metrics", None)
    return await metrics.response(refresh)


def install_service_metrics(app: FastAPI) -> None:
    """`GET /metrics` on a service: HTTP answers, the store's head, the relay's lag behind it, and
    the consumer's records by outcome, read from the running runtime at each scrape."""
    metrics = app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every final status
    # A broker outage shows here and in /healthz, not in /readyz: writes do not need the broker.
    broker_up = Gauge("trial_broker_reachable",
                      "1 when the Kafka bootstrap servers accept a connection, else 0",
                      registry=metrics.registry)
    app.add_api_route("/metrics", metrics_endpoint, include_in_schema=False)

    async def refresh() -> None:
        rt = getattr(app.state, "runtime", None)
        if rt is None:
            return
        head = await rt.store.head()
        metrics.head.set(head)
        if rt.relay is not None:
            metrics.relay_lag.set(head - await rt.store.published_through(rt.relay.name))
        broker_up.set(1 if await broker_reachable(rt.settings.kafka_bootstrap_servers) else 0)

    def consumed() -> dict[str, int]:
        rt = getattr(app.state, "runtime", None)
        c = rt.consumer if rt is not None else None
        return {} if c is None else {"seen": c.records_seen, "handled": c.handled,
                                     "duplicate": c.duplicates, "dead_lettered": c.dead_lettered}

    def answers() -> dict[str, int]:
        rt = getattr(app.state, "runtime", None)
        return dict(rt.relay.answers) if rt is not None and rt.relay is not None else {}

    app.state.refresh_metrics = refresh
    metrics.registry.register(CountersCollector(
        answers, "trial_write_answers", "Write answers that waited for their events to reach "
        "the broker: published in time, or sent before (D56)", "outcome"))
    metrics.registry.register(CountersCollector(
        consumed, "trial_consumer_records", "Records this service's consumer took from Kafka",
        "outcome"))
