"""Kafka as a trust boundary (D48), on a SASL/SCRAM Apache Kafka with ACLs (`make test-real`):
a service's principal writes only its own topics, a pharmacy reads only trial.dosing, and a
forged record is refused by the broker itself. (The embedded broker has no authentication: there
the consumers' check of each record's source, D42, is the line, tested in test_consumer.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from deploy import infra
from shared.events import DOSING, ENROLLMENT, SAFETY
from shared.kafka import client_options, make_producer
from shared.settings import Settings
from tests.conftest import REAL

USERS = {name: f"{name}-{uuid.uuid4().hex[:12]}" for name in
         ("admin", "randomization", "dosing", "safety", "pharmacy")}
# What the chart's operators grant: each service writes its own topic; the pharmacy reads one.
GRANTS = [
    *(f"{service}:{op}:TOPIC:{topic}" for service, topic in (
        ("randomization", ENROLLMENT), ("dosing", DOSING), ("safety", SAFETY))
      for op in ("WRITE", "DESCRIBE")),
    f"pharmacy:READ:TOPIC:{DOSING}", f"pharmacy:DESCRIBE:TOPIC:{DOSING}",
    "pharmacy:READ:GROUP:pharmacy",
]


def as_user(bootstrap: str, name: str) -> Settings:
    return Settings(service_name=name, kafka_bootstrap_servers=bootstrap,
                    kafka_security_protocol="SASL_PLAINTEXT",
                    kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username=name,
                    kafka_sasl_password=USERS[name], kafka_request_timeout_ms=5000)


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
