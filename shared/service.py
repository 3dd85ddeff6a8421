"""Wiring every service shares: settings, store, relay, consumers, auth and health in one app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Request

from shared.auth import AuthError, JWTVerifier, Principal
from shared.consumer import ConsumerRunner, Handler
from shared.kafka import broker_reachable, ensure_topics_forever
from shared.migrate import upgrade
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore, Metadata
from shared.web import Problem, RequestIdMiddleware, current_request_id, install_problem_handlers

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    """What makes a service itself: its name, routes, and the events it consumes."""

    name: str
    router: APIRouter
    consumes: list[str] = field(default_factory=list)
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    publishes: bool = True


class Runtime:
    """The running parts of one service process; `app.state.runtime` in request handlers."""

    def __init__(self, spec: ServiceSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.store = EventStore(settings.resolved_database_url())
        self.verifier = JWTVerifier(settings)
        self.relay = Relay(self.store, settings) if spec.publishes else None
        self.consumer = (ConsumerRunner(self.store, settings, spec.consumes, spec.handlers)
                         if spec.consumes else None)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await upgrade(self.settings.resolved_database_url())
        if self.relay is not None and self.settings.relay_enabled:
            self._tasks.append(asyncio.create_task(self.relay.run(self._stop)))
        if self.consumer is not None and self.settings.consumers_enabled:
            self._tasks.append(asyncio.create_task(self._consume()))

    async def _consume(self) -> None:
        assert self.consumer is not None
        await ensure_topics_forever(self.settings, self._stop)
        await self.consumer.run(self._stop)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception as exc:
                log.warning("background task ended with %r", exc)
        await self.store.close()

    async def ready(self) -> dict[str, bool]:
        checks = {"database": False, "broker": False}
        with contextlib.suppress(Exception):
            async with self.store.read_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                checks["database"] = True
        checks["broker"] = await broker_reachable(self.settings.kafka_bootstrap_servers)
        return checks


def health_router(ready: Callable[[Request], Awaitable[dict[str, bool]]]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> dict[str, object]:
        checks = await ready(request)
        if not all(checks.values()):
            raise Problem(503, "not_ready", "Not ready", checks=checks)
        return {"status": "ready", "checks": checks}

    return router


def create_app(spec: ServiceSpec, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings(service_name=spec.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(spec, settings)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    async def ready(request: Request) -> dict[str, bool]:
        return await request.app.state.runtime.ready()

    app = FastAPI(title=f"NCT03424629 {spec.name} service", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    install_problem_handlers(app)
    app.include_router(health_router(ready))
    app.include_router(spec.router)
    return app


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def principal(request: Request) -> Principal:
    """The caller, from its bearer token; every service checks it, not only the gateway."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthorized", "A bearer token is required")
    verifier: JWTVerifier = request.app.state.runtime.verifier
    try:
        return verifier.verify(token.strip())
    except AuthError as exc:
        raise Problem(401, "unauthorized", "The bearer token is not valid", detail=str(exc)) \
            from exc


CurrentPrincipal = Annotated[Principal, Depends(principal)]
CurrentRuntime = Annotated[Runtime, Depends(runtime)]


def metadata_for(who: Principal, reason: str | None = None) -> Metadata:
    request_id = current_request_id()
    return Metadata(actor=who.sub, role=who.role, site=who.site, request_id=request_id,
                    correlation_id=request_id, reason=reason)

