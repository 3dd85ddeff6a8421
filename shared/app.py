"""The app factory every service is made by: its runtime, middlewares, problems, health, metrics,
access logging and routes; `run_beside` adds a loop of its own (a sweep, an anchorer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import Depends, FastAPI, Request, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import Gauge

from shared.access import PatientReadAudit, access_router, append_view, refused_writes_logger
from shared.heap import settle
from shared.idempotency import IdempotencyMiddleware
from shared.logs import RequestLogMiddleware, configure_logging
from shared.metrics import install_service_metrics
from shared.protocol import load_protocol
from shared.relay import AnswerWhenPublished
from shared.runtime import Loop, Runtime, ServiceSpec
from shared.settings import Settings, check_production
from shared.store import UNAVAILABLE_ERRORS, database_unavailable
from shared.timing import ServerTimingMiddleware
from shared.tracing import configure_tracing, instrument_app
from shared.web import (
    BodyLimitMiddleware,
    RequestIdMiddleware,
    database_unavailable_problem,
    health_router,
    install_problem_handlers,
    problem_response,
    strict_input,
)

log = logging.getLogger(__name__)


def create_app(spec: ServiceSpec, settings: Settings | None = None) -> FastAPI:
    """The service's app. Its protocol version is read and validated here, once: a folder that
    is not a valid protocol stops the process before it serves anything."""
    settings = settings or Settings(service_name=spec.name)
    check_production(settings)
    configure_logging(settings)  # JSON (or console) lines for every logger of the process
    configure_tracing(spec.name)  # off unless the OTEL_* variables ask for an exporter
    protocol = load_protocol(settings.protocol_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(spec, settings, protocol)
        app.state.runtime = runtime
        await runtime.start()
        settle(settings)  # the collector, once everything the process keeps is built (D65)
        try:
            yield
        finally:
            await runtime.stop()

    async def ready(request: Request) -> dict[str, bool]:
        return await request.app.state.runtime.ready()

    app = FastAPIOffline(title=f"NCT03424629 {spec.name} service", lifespan=lifespan,
                         dependencies=[Depends(strict_input)])
    app.state.protocol = protocol
    # A monitor's or the DSMB's read of a patient, recorded before the answer leaves (D50).
    app.add_middleware(PatientReadAudit, service=spec.name,
                       record=spec.record_view or append_view)
    # A write's answer once its events are on the broker (D56); inside the idempotency key's.
    app.add_middleware(AnswerWhenPublished)
    # Added first, so it runs inside the request id middleware: replays carry the new id.
    app.add_middleware(IdempotencyMiddleware)
    # Where the answer's time went (D90); outside the key's middleware: a replay has its own.
    app.add_middleware(ServerTimingMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    install_service_metrics(app)
    app.add_middleware(RequestLogMiddleware, service=spec.name)  # one line a request, outermost
    instrument_app(app, spec.name)  # server spans (only when tracing is on)
    if (unapplied := spec.unapplied) is not None:
        gauge_at_scrape(app, "trial_safety_records_unapplied", "trial.safety records this service "
                        "could not apply and no operator has resolved: what they may concern is "
                        "refused (D32)", lambda rt: _count(unapplied(rt.store)))
    install_problem_handlers(app, on_problem=refused_writes_logger(spec.name))
    install_database_unavailable_handler(app)
    async def health(request: Request) -> dict[str, object]:
        return await request.app.state.runtime.health()

    app.include_router(health_router(ready, detail=health))
    app.include_router(access_router())
    app.include_router(spec.router)
    return app


def install_database_unavailable_handler(app: FastAPI) -> None:
    """A request that meets its database down or restarting is answered 503 with Retry-After,
    never 500: the caller retries with the same Idempotency-Key (issue 15). Any other database
    error stays what it is, a 500 for a defect."""

    async def unavailable(request: Request, exc: Exception) -> Response:
        if not database_unavailable(exc):
            raise exc
        log.warning("database unavailable: %s %s: %r", request.method, request.url.path, exc)
        problem = database_unavailable_problem()
        return problem_response(problem, problem.headers)

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, unavailable)


def run_beside(app: FastAPI, start: Callable[[FastAPI], Loop]) -> None:
    """Run a service's own loop (a sweep, an anchorer) for the app's whole life: `start(app)` is
    called once the runtime is up and returns the loop; the loop is stopped before the runtime."""
    service_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_lifespan(app):
            stop = asyncio.Event()
            task = asyncio.create_task(start(app)(stop))
            try:
                yield
            finally:
                stop.set()
                await task

    app.router.lifespan_context = lifespan


async def _count(records: Awaitable[Sequence[object]]) -> float:
    return float(len(await records))


def gauge_at_scrape(app: FastAPI, name: str, documentation: str,
                    read: Callable[[Runtime], Awaitable[float]]) -> None:
    """A service's own gauge on `GET /metrics`, read from its running runtime at each scrape."""
    gauge = Gauge(name, documentation, registry=app.state.metrics.registry)
    refresh_before = app.state.refresh_metrics

    async def refresh() -> None:
        await refresh_before()
        rt: Runtime | None = getattr(app.state, "runtime", None)
        if rt is not None:
            gauge.set(await read(rt))

    app.state.refresh_metrics = refresh


__all__ = ["Runtime", "ServiceSpec", "create_app", "gauge_at_scrape", "run_beside"]
