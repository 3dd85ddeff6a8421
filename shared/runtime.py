"""A service's running parts: its protocol, store, token verifier, relay and consumer, started and
stopped together (`app.state.runtime` while the app runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter

from shared.auth import JWTVerifier
from shared.consumer import ConsumerRunner, FailClosed, Handler
from shared.errors import ConcurrencyError
from shared.events import ProtocolVersionActivated
from shared.kafka import broker_reachable, ensure_topics_forever
from shared.leader import Leadership, held_elsewhere
from shared.migrate import upgrade
from shared.protocol import ProtocolConfig, load_protocol
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore, Metadata, NewEvent, utcnow

log = logging.getLogger(__name__)
Handlers = Callable[[ProtocolConfig], Mapping[str, Handler]]


def no_handlers(_: ProtocolConfig) -> Mapping[str, Handler]:
    return {}


@dataclass
class ServiceSpec:
    """What makes a service itself: its name, routes, and the events it consumes (its handlers,
    given the protocol version the process runs)."""

    name: str
    router: APIRouter
    consumes: list[str] = field(default_factory=list)
    handlers: Handlers = no_handlers
    publishes: bool = True
    # Topics whose records must never just be skipped: what the service does when one cannot
    # be applied, and how it lists those still unresolved; while any is, the service is not
    # ready and `trial_safety_records_unapplied` counts them (D32).
    fail_closed: Mapping[str, FailClosed] = field(default_factory=dict)
    unapplied: Callable[[EventStore], Awaitable[Sequence[object]]] | None = None
    # How a monitor's or the DSMB's read of a patient is filed (D50); None: in the service's own
    # store, relayed to trial.access (`shared.access.append_view`).
    record_view: Callable[..., Awaitable[None]] | None = None
    # How long its consumer lets records gather under traffic (D84, `ConsumerRunner.linger_s`):
    # only where every answer given on consumed records first waits for the consumer
    # (`shared.catchup`), which cuts the wait short, or where a moment's delay decides nothing.
    consumer_linger_ms: int = 0

    def consumer(self, store: EventStore, settings: Settings, protocol: ProtocolConfig,
                 group_id: str | None = None) -> ConsumerRunner:
        """The service's consumer of its topics into `store`, as its process runs it (its
        handlers, fail-closed records and linger); benchmarks make theirs here too."""
        linger_ms = (settings.kafka_consumer_linger_ms
                     if settings.kafka_consumer_linger_ms is not None else self.consumer_linger_ms)
        return ConsumerRunner(store, settings, self.consumes, self.handlers(protocol),
                              group_id=group_id, fail_closed=self.fail_closed,
                              linger_ms=linger_ms)


class Runtime:
    """The running parts of one service process. The protocol is read once, here (or handed in
    by the app factory, which read it before anything started)."""

    def __init__(self, spec: ServiceSpec, settings: Settings,
                 protocol: ProtocolConfig | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.protocol = protocol or load_protocol(settings.protocol_dir)
        self.store = EventStore(settings.resolved_database_url())
        self.verifier = JWTVerifier(settings)
        self.relay = Relay(self.store, settings) if spec.publishes else None
        self.consumer = (spec.consumer(self.store, settings, self.protocol)
                         if spec.consumes else None)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # This process, as the owner of the idempotency keys it claims: a lock held for its
        # life, so another replica, or this service started again, can tell a request still
        # running from one whose process died (D57).
        self.instance_id = uuid.uuid4().hex
        self._instance = Leadership(self.store, instance_lock(self.instance_id))

    async def start(self) -> None:
        await upgrade(self.settings.resolved_database_url())
        if not await self._instance.hold():
            raise RuntimeError(f"instance lock {self.instance_id} is held elsewhere")
        await activate_protocol(self.store, self.spec.name, self.protocol)
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
        await self._instance.release(forget=True)
        await self.store.close()

    async def instance_alive(self, instance_id: str) -> bool:
        """Whether the process `instance_id` (an owner of idempotency keys) still runs."""
        return instance_id == self.instance_id or await held_elsewhere(
            self.store, instance_lock(instance_id))

    async def ready(self) -> dict[str, bool]:
        """What `/readyz` decides on: the database (every write and read needs it) and, where
        the service fails closed, no trial.safety record left unapplied (D32). Not the broker:
        writes only need the database, and the relay catches up when the broker is back."""
        checks = {"database": False}
        with contextlib.suppress(Exception):
            async with self.store.read_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                checks["database"] = True
        if self.spec.unapplied is not None and checks["database"]:
            checks["safety_records_applied"] = not await self.spec.unapplied(self.store)
        return checks

    async def health(self) -> dict[str, object]:
        """What `/healthz` shows beside "ok", deciding nothing: the broker, and whether the
        relay's last publish and the consumer are going (a broker outage shows here and in the
        metrics, never as unready)."""
        broker = await broker_reachable(self.settings.kafka_bootstrap_servers)
        detail: dict[str, object] = {"broker": broker}
        if self.relay is not None:
            detail["relay"] = {"publishing": self.relay.healthy,
                               "published_position": self.relay.published_position,
                               "leading": self.relay.leading}  # the replica that publishes
        if self.consumer is not None:
            detail["consumer"] = {"reading": self.consumer.reading.is_set()}
        return detail


def instance_lock(instance_id: str) -> str:
    return f"instance-{instance_id}"


Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def activate_protocol(store: EventStore, service: str, protocol: ProtocolConfig,
                            attempts: int = 3) -> ProtocolVersionActivated | None:
    """Record in the service's own store that it now applies `protocol`, unless the last
    version it recorded is this one (same content). Replicas starting together record it once:
    the loser of the version race finds the winner's record and stops."""
    stream = f"protocol-{service}"
    for _ in range(attempts):
        try:
            async with store.transaction() as tx:
                recorded = await tx.read_stream(stream)
                last = recorded[-1].payload() if recorded else None
                if isinstance(last, ProtocolVersionActivated) and (
                        last.content_hash == protocol.content_hash()):
                    return None
                activated = ProtocolVersionActivated(
                    service=service, trial_id=protocol.trial_id, version=protocol.version,
                    content_hash=protocol.content_hash(), activated_by=f"service:{service}",
                    activated_at=utcnow())
                meta = Metadata(actor=f"service:{service}",
                                reason=f"started applying protocol version {protocol.version}")
                await tx.append(stream, [NewEvent.of(activated, meta)], len(recorded))
                return activated
        except ConcurrencyError:
            continue  # another replica recorded first: look again
    return None
