"""An environment's topic prefix on the real broker (D52): a relay publishes to the prefixed topic
(never the bare one), a consumer with the same prefix applies what it reads, its DLQ is the
prefixed one with the logical name in its header, and the operators' CLI finds it there."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from shared.consumer import ConsumerRunner
from shared.events import ENROLLMENT, CloudEvent, PatientWithdrawn, dlq_topic
from shared.kafka import all_topics, client_options, ensure_topics
from shared.migrate import upgrade
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore, Metadata, NewEvent, utcnow
from tests.integration.test_consumer import count_down
from tests.support import eventually, read_to_end, read_topic
from tooling.cli import app


def prefixed(settings: Settings, service: str) -> Settings:
    return settings.model_copy(update={"kafka_topic_prefix": f"t{uuid.uuid4().hex[:8]}.",
                                       "service_name": service})


async def read_all(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Every record `topic` (a name on the broker) holds now; none if there is no such topic."""
    return await read_to_end(settings, topic, timeout=30.0)


def ids(records: list[ConsumerRecord]) -> set[str]:
    found = set()
    for record in records:
        try:
            found.add(CloudEvent.from_bytes(record.value or b"").id)
        except ValueError:
            continue
    return found


async def run_until(runner: ConsumerRunner, condition: Callable[[], bool], what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(condition, timeout=120, what=what)
    finally:
        stop.set()
        await task


async def test_a_prefixed_environment_publishes_consumes_and_dead_letters_under_its_prefix(
        settings: Settings, store: EventStore, make_database_url: Callable[[str], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The relay publishes as randomization: trial.enrollment's owner (D42).
    env = prefixed(settings, "randomization")
    prefix = env.kafka_topic_prefix
    await ensure_topics(env)  # every topic of the trial, under the prefix
    admin = AIOKafkaAdminClient(**client_options(env))
    await admin.start()
    try:
        on_broker = set(await admin.list_topics())
    finally:
        await admin.close()
    assert {prefix + t for t in all_topics()} <= on_broker

    patient = f"P-{uuid.uuid4().hex[:6]}"
    withdrawn = PatientWithdrawn(patient_id=patient, site_id="S1", reason="moved away",
                                 withdrawn_at=utcnow())
    [event] = await store.append(f"patient-{patient}", [NewEvent.of(
        withdrawn, Metadata(actor="tester", role="investigator", site="S1"))], None)
    relay = Relay(store, env)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: relay.published_position >= event.position, timeout=120,
                         what="the relay to publish")
    finally:
        stop.set()
        await task

    # On the environment's topic, never on the bare one (another environment's, or none).
    mine = await read_topic(env.kafka_bootstrap_servers, prefix + ENROLLMENT,
                            until=lambda rs: event.event_id in ids(rs))
    assert event.event_id in ids(mine)
    assert event.event_id not in ids(await read_all(env, ENROLLMENT))

    # A consumer of the same environment applies it, reading the topic by its logical name.
    consumer_url = make_database_url("consumer")
    await upgrade(consumer_url)
    consumer_store = EventStore(consumer_url)
    group = f"g-{uuid.uuid4().hex[:8]}"
    same_environment = settings.model_copy(update={"kafka_topic_prefix": prefix,
                                                   "service_name": "dosing"})
    runner = ConsumerRunner(consumer_store, same_environment, [ENROLLMENT],
                            {"PatientWithdrawn": count_down}, group_id=group)
    # A forgery on the same topic (another service's name as its source): poison, to the
    # environment's DLQ, as the source check sees the logical topic.
    forged = CloudEvent(id=str(uuid.uuid4()), source="/services/dosing", type="PatientWithdrawn",
                        subject=patient, time=utcnow(),
                        data=withdrawn.model_dump(mode="json"), sequence=1)
    producer = AIOKafkaProducer(**client_options(env))
    await producer.start()
    try:
        await producer.send_and_wait(prefix + ENROLLMENT, forged.to_bytes(), key=patient.encode())
    finally:
        await producer.stop()
    try:
        await run_until(runner, lambda: runner.handled >= 1 and runner.dead_lettered >= 1,
                        "the event applied and the forgery dead-lettered")
        seen = await consumer_store.read_stream(f"seen-{patient}")
        assert [e.data["event_id"] for e in seen] == [event.event_id]
        assert {tp.topic for tp in runner.committed_here} == {prefix + ENROLLMENT}
        # Caught up on the patient's partition, asked by the logical name (D33).
        again = asyncio.Event()
        task = asyncio.create_task(runner.run(again))
        try:
            assert await runner.caught_up(ENROLLMENT, patient, 60)
        finally:
            again.set()
            await task
    finally:
        await consumer_store.close()

    dead = await read_topic(env.kafka_bootstrap_servers, prefix + dlq_topic(ENROLLMENT),
                            until=lambda rs: forged.id in ids(rs))
    headers = dict(next(r for r in dead if forged.id in ids([r])).headers)
    assert headers["dlq_topic"] == ENROLLMENT.encode()  # the logical name, as the contract's
    assert b"may not publish to trial.enrollment" in headers["dlq_error"]

    # The operators' CLI, in the same environment, names the topic as the code does.
    monkeypatch.setenv("TRIAL_KAFKA_TOPIC_PREFIX", prefix)
    listed = await asyncio.to_thread(CliRunner().invoke, app, [
        "dlq", "list", ENROLLMENT, "--bootstrap", env.kafka_bootstrap_servers, "--json"])
    assert listed.exit_code == 0, listed.output
    assert forged.id in listed.stdout and f"{prefix}{dlq_topic(ENROLLMENT)}" in listed.output
