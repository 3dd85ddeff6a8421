"""Kafka clients configured one way for the whole system, and topic creation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiokafka import (
    AIOKafkaClient,
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from shared.events import AUDIT_ANCHORS, TOPICS, dlq_topic
from shared.retry import Stopped, retry
from shared.settings import Settings

log = logging.getLogger(__name__)


def all_topics() -> list[str]:
    """Every topic of the trial, by its logical name (the topics and their DLQs)."""
    return [*TOPICS, *(dlq_topic(t) for t in TOPICS)]


# The code names topics by their logical names (shared.events: trial.enrollment, its DLQ
# trial.enrollment.dlq...), which are the public contract. On the broker each has this
# deployment's prefix before it (TRIAL_KAFKA_TOPIC_PREFIX: "prod." gives prod.trial.enrollment),
# so environments can share a cluster; consumer groups get it too (two environments' dosing
# never share a group). These two functions are the only place the prefix is applied or taken
# off: at the broker boundary (topic creation, the relay's send, subscriptions and the topic of
# a record received, DLQs, partitions read, the operators' CLI, ACL grants).


def physical(settings: Settings, topic: str) -> str:
    """The name the logical `topic` (or consumer group) has on the broker."""
    return settings.kafka_topic_prefix + topic


def logical(settings: Settings, name: str) -> str:
    """The logical topic of `name`, a topic on the broker (a record's): the prefix taken off.
    A name without the prefix is no topic of this deployment's and is returned as it is."""
    prefix = settings.kafka_topic_prefix
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def client_options(settings: Settings) -> dict[str, Any]:
    """How every Kafka client of a service connects: the bootstrap servers and, where the
    broker asks for it, SASL as the service's own principal (D48)."""
    options: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap_servers}
    if settings.kafka_security_protocol != "PLAINTEXT":
        password = settings.kafka_sasl_password
        options.update(
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password else None)
        if settings.kafka_security_protocol == "SASL_SSL":
            options["ssl_context"] = create_ssl_context()
    return options


def make_producer(settings: Settings) -> AIOKafkaProducer:
    # acks=all and no idempotent producer: the embedded broker lacks it, and delivery is
    # at-least-once by design, made exactly-once in effect by idempotent consumers.
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=False,
        linger_ms=2,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        client_id=f"{settings.service_name}-producer",
    )


class LazyProducer:
    """The one way a process holds a producer: made and started on first use, dropped after a
    failure (so the next use reconnects), stopped at the end. Relay, DLQ and anchorer use it."""

    def __init__(self, settings: Settings,
                 before_start: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self._before_start = before_start
        self._producer: AIOKafkaProducer | None = None

    async def get(self) -> AIOKafkaProducer:
        if self._producer is None:
            if self._before_start is not None:
                await self._before_start()
            producer = make_producer(self.settings)
            try:
                await producer.start()
            except BaseException:
                await quietly(producer.stop())
                raise
            self._producer = producer
        return self._producer

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[AIOKafkaProducer]:
        """The producer, dropped if the block fails (so a retry starts on a fresh connection)."""
        producer = await self.get()
        try:
            yield producer
        except Exception:
            await self.drop()
            raise

    async def send_and_wait(self, topic: str, value: bytes | None, key: bytes | None = None,
                            headers: list[tuple[str, bytes]] | None = None) -> None:
        """Publish one record and wait until the broker has it, for up to 3 request timeouts
        (a send can otherwise wait for ever on a broker that went away under the client, D72);
        the producer is dropped on any failure, so a retry connects afresh."""
        async with self.using() as producer:
            await asyncio.wait_for(
                producer.send_and_wait(topic, value, key=key, headers=headers),
                3 * self.settings.kafka_request_timeout_ms / 1000)

    async def drop(self) -> None:
        """Stop and forget the producer (after a failure, or at the end); never raises, and
        never waits longer than the client's request timeout."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_within(producer.stop(), self.settings.kafka_request_timeout_ms / 1000)


async def stop_within(closing: Awaitable[object], seconds: float) -> None:
    """Await a client's close for up to `seconds`, quietly: a client wedged on a broker that
    went away (D72) is left to the garbage collector rather than holding its owner up."""
    try:
        await asyncio.wait_for(quietly(closing), seconds)
    except TimeoutError:
        log.warning("a Kafka client did not close in %g s; left behind", seconds)


async def quietly(awaitable: Awaitable[object]) -> None:
    """Await a client's close; one that already failed may fail again, which changes nothing."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("close failed: %r", exc)


def new_topic(name: str, settings: Settings) -> NewTopic:
    """How the trial's topics are made (`name` as on the broker): they are history (replays,
    pharmacies reading from the start, the ledger rebuilt), so kept forever; replicated as
    configured (3 in the chart, 1 on one development broker), a write acknowledged by at least
    two replicas where there are 3."""
    replicas = settings.kafka_replication_factor
    configs = {"retention.ms": "-1", "retention.bytes": "-1"}
    if replicas >= 3:
        configs["min.insync.replicas"] = "2"
    # The ledger's witnesses (D27): one ordered partition.
    partitions = (1 if logical(settings, name) == AUDIT_ANCHORS
                  else settings.kafka_topic_partitions)
    return NewTopic(name, partitions, replicas, topic_configs=configs)


# A topic's creation answered with these leaves nothing to do: made, made by someone else, or
# (its ACLs, D48) not this principal's to make, so left to whoever may.
_CREATED, _THERE_ALREADY, _NOT_OURS = 0, TopicAlreadyExistsError.errno, TopicAuthorizationFailedError.errno


async def ensure_topics(settings: Settings, topics: Iterable[str] | None = None) -> None:
    """Create topics if missing, so consumers never subscribe to nothing: `topics` by their
    names on the broker (`physical`), or every topic of the trial under the settings' prefix.

    One request for all of them; it answers each topic apart, so any answer but made, there
    already or not this principal's (D48) raises (`ensure_topics_forever` retries). Kafka's
    controller answers before every broker's metadata has the topic: return only once the
    broker lists each topic made, within the request timeout."""
    admin = AIOKafkaAdminClient(**client_options(settings),
                                request_timeout_ms=settings.kafka_request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = topics or [physical(settings, t) for t in all_topics()]
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        response = await admin.create_topics([new_topic(name, settings) for name in missing])
        answers = {topic: code for topic, code, *_ in response.topic_errors}
        failed = {t: c for t, c in answers.items() if c not in (_CREATED, _THERE_ALREADY, _NOT_OURS)}
        if failed:
            raise KafkaError(f"topics not created (Kafka error codes): {failed}")
        made = {t for t, c in answers.items() if c == _CREATED}
        deadline = asyncio.get_running_loop().time() + settings.kafka_request_timeout_ms / 1000
        while unlisted := made - set(await admin.list_topics()):
            if asyncio.get_running_loop().time() > deadline:
                raise KafkaTimeoutError(f"topics made but not listed by the broker: {sorted(unlisted)}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def broker_view(client: AIOKafkaClient, topics: Iterable[str]
                      ) -> tuple[str | None, set[str]]:
    """The id of the broker cluster the client talks to now, and which of `topics` it has: one
    metadata request, never creating a topic (Kafka would, on a metadata request for one)."""
    request = MetadataRequest(sorted(topics), allow_auto_topic_creation=False)
    response = await client.send(client.get_random_node(), request)
    present = {topic[1] for topic in response.topics if topic[0] == 0}
    return getattr(response, "cluster_id", None), present


def connections(client: AIOKafkaClient) -> dict[Any, Any]:
    """The client's open connections, by node and group. A broker that restarted, or another one
    behind the same address, can only be reached over a new connection: while these are the very
    connections a `broker_view` went over, the broker answering is the process that view saw
    (D86). aiokafka keeps them in `_conns`; no public call lists them."""
    return {key: conn for key, conn in client._conns.items() if conn.connected()}


async def known_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of `topic` (its name on the broker, `physical`) as the broker knows them
    now ([] if it has no such topic).

    aiokafka's public calls either answer from the client's cached metadata or fetch fresh
    metadata without keeping it, so a group-less reader of a topic the client has not heard of
    yet would see no partitions: refresh the client's own copy first (no public call does).

    The refresh is bounded by the client's request timeout: aiokafka's metadata task can stay
    unresolved for ever when the broker goes away during it (aio-libs/aiokafka#712), and a relay
    resuming then hung without an error and never published again (TimeoutError: its caller
    retries with a fresh client)."""
    client = consumer._client
    await asyncio.wait_for(client.force_metadata_update(), client._request_timeout_ms / 1000)
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


async def drain(consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition],
                timeout: float, stalled_s: float = 3.0,
                stalled_fetches: int = 10) -> AsyncIterator[list[ConsumerRecord]]:
    """The records of the assigned `partitions` from where the consumer stands to each one's
    end, a fetch's worth at a time. The end is the high watermark the fetches report, not
    ListOffsets: the embedded broker answers that with its last batch's base offset + 1, short
    of the end when a batch held several records (D53). TimeoutError after `timeout` seconds.

    Where a partition's position has not moved for `stalled_s` seconds and `stalled_fetches`
    fetches, short of its watermark, the offset is stepped over (then after a tenth of that
    wait, while it goes on): the embedded broker, restarted under producers connected before,
    leaves offsets below its watermark that no fetch returns (issue 15), and a client stepping
    over an empty fetch below the watermark is what Kafka clients do for such gaps. A drain
    reads what is on the broker (a relay's resume, an accounting); it never consumes."""
    loop = asyncio.get_running_loop()
    pending = set(partitions)
    deadline = loop.time() + timeout
    # per partition: position, since when, fetches since, whether it got there by a step
    last: dict[TopicPartition, tuple[int, float, int, bool]] = {}
    while pending:
        if loop.time() > deadline:
            raise TimeoutError(f"could not read {sorted(pending)} to the end in {timeout:g} s")
        for records in (await consumer.getmany(*pending, timeout_ms=200)).values():
            yield records
        for tp in list(pending):
            end, position = consumer.highwater(tp), await consumer.position(tp)
            if end is not None and position >= end:
                pending.discard(tp)
                continue
            at, since, fetches, stepped = last.get(tp, (-1, loop.time(), 0, False))
            if position != at:
                last[tp] = (position, loop.time(), 0, False)  # a record moved it
                continue
            scale = 0.1 if stepped else 1.0
            if (end is not None and fetches + 1 >= max(2, int(stalled_fetches * scale))
                    and loop.time() - since >= stalled_s * scale):
                log.warning("%s: no fetch returns offset %d below the watermark %d: stepping "
                            "over it", tp, position, end)
                consumer.seek(tp, position + 1)
                last[tp] = (position + 1, loop.time(), 0, True)
            else:
                last[tp] = (at, since, fetches + 1, stepped)


async def broker_reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when some bootstrap address accepts a TCP connection (for /readyz)."""
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        except (OSError, TimeoutError):
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


async def ensure_topics_forever(settings: Settings, stop: asyncio.Event) -> None:
    """Retry topic creation until the broker answers (it may start after the service)."""
    with contextlib.suppress(Stopped):
        await retry(lambda: ensure_topics(settings), what="topic creation", stop=stop,
                    initial=0.2)
