"""Kafka as a trust boundary (D48), on a SASL/SCRAM Apache Kafka with ACLs (`make test-real`):
a service's principal writes only its own topics, a pharmacy reads only trial.dosing, and a
forged record is refused by the broker itself. The grants are deploy/kafka_acls.py's table (what
compose grants, and operators for the chart); under an environment's topic prefix (D52) the
services create, publish and consume with the table's prefixed grants; the operators' CLI lists
and replays a DLQ with the environment's SASL settings. (The embedded broker has no
authentication: there the consumers' check of each record's source, D42, is the line, tested in
test_consumer.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from typer.testing import CliRunner, Result

from deploy import infra
from deploy.kafka_acls import grants
from shared.consumer import ConsumerRunner
from shared.events import DOSING, ENROLLMENT, SAFETY, CloudEvent, PatientWithdrawn, dlq_topic
from shared.kafka import client_options, ensure_topics, make_producer
from shared.migrate import upgrade
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore, Metadata, NewEvent, utcnow
from tests.conftest import REAL
from tests.integration.test_consumer import count_down
from tests.support import eventually
from tooling.cli import app

USERS = {name: f"{name}-{uuid.uuid4().hex[:12]}" for name in
         ("admin", "randomization", "dosing", "safety", "pharmacy")}
# The one table of who may do what (compose grants it; operators grant it for the chart): each
# service writes its own topics and reads what it consumes; the pharmacy reads trial.dosing.
# And the same under an environment's prefix, for the test of a prefixed environment.
PREFIX = f"t{uuid.uuid4().hex[:8]}."
GRANTS = [*grants(), *grants(topic_prefix=PREFIX)]


def as_user(bootstrap: str, name: str, prefix: str = "") -> Settings:
    return Settings(service_name=name, kafka_bootstrap_servers=bootstrap,
                    kafka_security_protocol="SASL_PLAINTEXT",
                    kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username=name,
                    kafka_sasl_password=USERS[name], kafka_request_timeout_ms=5000,
                    kafka_topic_prefix=prefix)


if REAL:

    @pytest.fixture(scope="module")
    async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
        state = tmp_path_factory.mktemp("secured-kafka")
        port = infra.free_port()
        bootstrap = infra.start_kafka(port, state_dir=state, users=USERS)
        try:
            admin = await _admin_when_ready(as_user(bootstrap, "admin"))
            try:
                await admin.create_topics([NewTopic(t, 1, 1) for t in (ENROLLMENT, DOSING, SAFETY)])
            finally:
                await admin.close()
            infra.grant_kafka_acls(bootstrap, USERS["admin"], GRANTS, Path(state))
            yield bootstrap
        finally:
            infra.stop_kafka(port, state_dir=state)

    async def test_a_service_writes_its_own_topic_and_a_forged_record_is_refused(
            secured: str) -> None:
        # Safety's own producer, as the services make it, writes trial.safety.
        producer = make_producer(as_user(secured, "safety"))
        await producer.start()
        try:
            await producer.send_and_wait(SAFETY, b"a hold lifted, by safety")
        finally:
            await producer.stop()
        # Dosing's principal cannot forge one (the SafetyHoldLifted dosing would apply).
        assert await _send(as_user(secured, "dosing"), SAFETY) == "TopicAuthorizationFailedError"
        # Nor can a pharmacy write the dosing topic it reads.
        assert await _send(as_user(secured, "pharmacy"), DOSING) == (
            "TopicAuthorizationFailedError")
        # Without credentials there is no session at all.
        anonymous = AIOKafkaProducer(bootstrap_servers=secured, request_timeout_ms=3000)
        with pytest.raises(KafkaError):
            await asyncio.wait_for(anonymous.start(), 30)
        await anonymous.stop()

    async def test_a_pharmacy_reads_trial_dosing_and_nothing_else(secured: str) -> None:
        for service, topic, value in (("dosing", DOSING, b"an infusion given"),
                                      ("randomization", ENROLLMENT, b"a screening")):
            producer = make_producer(as_user(secured, service))
            await producer.start()
            try:
                await producer.send_and_wait(topic, value)
            finally:
                await producer.stop()
        pharmacy = as_user(secured, "pharmacy")
        reader = AIOKafkaConsumer(**client_options(pharmacy), group_id="pharmacy",
                                  auto_offset_reset="earliest", enable_auto_commit=False)
        await reader.start()
        try:
            reader.assign([TopicPartition(DOSING, 0)])
            batch = await reader.getmany(timeout_ms=10_000)
            assert [r.value for records in batch.values() for r in records] == [
                b"an infusion given"]
            # Screening data on trial.enrollment is not the pharmacy's to read: the broker
            # refuses (aiokafka notes the topic unauthorized and hands over nothing).
            reader.assign([TopicPartition(ENROLLMENT, 0)])
            batch = await reader.getmany(timeout_ms=5_000)
            assert not any(batch.values())
            assert ENROLLMENT in reader._client.cluster.unauthorized_topics
        finally:
            await reader.stop()


    async def test_a_prefixed_environment_creates_publishes_and_consumes_with_its_grants(
            secured: str, store: EventStore, make_database_url: Callable[[str], str]) -> None:
        # Randomization creates the topics it writes (its CREATE grants, under the prefix), and
        # may create none of the others: dosing's is dosing's to make.
        randomization = as_user(secured, "randomization", PREFIX)
        await ensure_topics(randomization)
        admin = await _admin_when_ready(as_user(secured, "admin"))
        try:
            made = set(await admin.list_topics())
        finally:
            await admin.close()
        assert {PREFIX + ENROLLMENT, PREFIX + dlq_topic(SAFETY)} <= made
        assert PREFIX + DOSING not in made
        await ensure_topics(as_user(secured, "dosing", PREFIX))  # trial.dosing and its DLQs

        patient = f"P-{uuid.uuid4().hex[:6]}"
        [event] = await store.append(f"patient-{patient}", [NewEvent.of(
            PatientWithdrawn(patient_id=patient, site_id="S1", reason="moved away",
                             withdrawn_at=utcnow()),
            Metadata(actor="tester", role="investigator", site="S1"))], None)
        relay = Relay(store, randomization)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        try:
            await eventually(lambda: relay.published_position >= event.position, timeout=120,
                             what="the relay to publish under the prefix")
        finally:
            stop.set()
            await task

        # Dosing consumes it in its own group (the prefixed one its grant names).
        url = make_database_url("dosing")
        await upgrade(url)
        dosing_store = EventStore(url)
        runner = ConsumerRunner(dosing_store, as_user(secured, "dosing", PREFIX), [ENROLLMENT],
                                {"PatientWithdrawn": count_down})
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        try:
            await eventually(lambda: runner.handled >= 1, timeout=120, what="dosing to apply it")
            seen = await dosing_store.read_stream(f"seen-{patient}")
            assert [e.data["event_id"] for e in seen] == [event.event_id]
        finally:
            stop.set()
            await task
            await dosing_store.close()
        # Under the prefix as without it: dosing may read the safety records, never forge one.
        await ensure_topics(as_user(secured, "safety", PREFIX))
        assert await _send(as_user(secured, "dosing", PREFIX), PREFIX + SAFETY) == (
            "TopicAuthorizationFailedError")

    async def test_the_operators_cli_lists_and_replays_a_dlq_on_the_secured_broker(
            secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
        admin = await _admin_when_ready(as_user(secured, "admin"))
        try:
            await admin.create_topics([NewTopic(dlq_topic(SAFETY), 1, 1)])
        finally:
            await admin.close()
        # What dosing's consumer dead-letters: it may write trial.safety.dlq, nothing more.
        poison = CloudEvent(id=str(uuid.uuid4()), source="/services/safety", type="Unreadable",
                            subject="P-dlq", time=utcnow(), data={}, sequence=1)
        producer = make_producer(as_user(secured, "dosing"))
        await producer.start()
        try:
            await producer.send_and_wait(dlq_topic(SAFETY), poison.to_bytes(), key=b"P-dlq",
                                         headers=[("dlq_topic", SAFETY.encode()),
                                                  ("dlq_consumer", b"dosing"),
                                                  ("dlq_partition", b"0"), ("dlq_offset", b"0"),
                                                  ("dlq_error", b"a test's poison")])
        finally:
            await producer.stop()

        def trial(*args: str) -> Result:
            return CliRunner().invoke(app, [*args, "--bootstrap", secured])

        # Without credentials the broker gives the CLI no session: an error, not a listing.
        for key in ("TRIAL_KAFKA_SECURITY_PROTOCOL", "TRIAL_KAFKA_SASL_USERNAME",
                    "TRIAL_KAFKA_SASL_PASSWORD", "TRIAL_KAFKA_TOPIC_PREFIX"):
            monkeypatch.delenv(key, raising=False)
        anonymous = await asyncio.wait_for(asyncio.to_thread(trial, "dlq", "list", SAFETY), 180)
        assert anonymous.exit_code != 0
        # With the operator's SASL settings, as the services take them (here: admin).
        monkeypatch.setenv("TRIAL_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
        monkeypatch.setenv("TRIAL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
        monkeypatch.setenv("TRIAL_KAFKA_SASL_USERNAME", "admin")
        monkeypatch.setenv("TRIAL_KAFKA_SASL_PASSWORD", USERS["admin"])
        listed = await asyncio.to_thread(trial, "dlq", "list", SAFETY)
        assert listed.exit_code == 0, listed.output
        assert poison.id in listed.stdout
        replayed = await asyncio.to_thread(trial, "dlq", "replay", SAFETY, "--all")
        assert replayed.exit_code == 0, replayed.output
        assert f"-> {SAFETY}:" in replayed.stdout


async def _admin_when_ready(settings: Settings) -> AIOKafkaAdminClient:
    for _ in range(60):
        admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=5000)
        try:
            await admin.start()
            return admin
        except KafkaError:
            await admin.close()
            await asyncio.sleep(1)
    raise AssertionError("the secured broker never answered its admin")


async def _send(settings: Settings, topic: str) -> str:
    producer = make_producer(settings)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"forged"), 30)
        return "sent"
    except (KafkaError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        await producer.stop()
