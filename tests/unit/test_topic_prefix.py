"""The topic prefix of an environment (D52): the code keeps the logical names, the broker has them
with TRIAL_KAFKA_TOPIC_PREFIX before them, mapped in one place (`shared.kafka.physical` and
`logical`); and the operators' CLI connects as the services do (SASL settings, D48)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import aiokafka
import pytest
from aiokafka import ConsumerRecord
from pydantic import ValidationError

from shared.consumer import ConsumerRunner, PoisonRecord
from shared.events import AUDIT_ANCHORS, DOSING, ENROLLMENT, SAFETY, TOPICS, CloudEvent, dlq_topic
from shared.kafka import all_topics, client_options, logical, new_topic, physical
from shared.settings import Settings
from shared.store import EventStore, utcnow
from tooling import operations

PROD = Settings(kafka_topic_prefix="prod.")


def test_no_prefix_is_the_identity() -> None:
    plain = Settings()
    assert plain.kafka_topic_prefix == ""
    for name in [*all_topics(), "test.something", "prod.trial.dosing"]:
        assert physical(plain, name) == name
        assert logical(plain, name) == name


def test_a_prefix_goes_before_every_name_on_the_broker_and_comes_off_again() -> None:
    assert physical(PROD, ENROLLMENT) == "prod.trial.enrollment"
    assert physical(PROD, dlq_topic(SAFETY)) == "prod.trial.safety.dlq"
    for name in all_topics():
        assert logical(PROD, physical(PROD, name)) == name
    # A name without the prefix is no topic of this environment's: left as it is.
    assert logical(PROD, "staging.trial.dosing") == "staging.trial.dosing"
    # A prefix that is a logical name's own beginning still maps one way and back.
    odd = Settings(kafka_topic_prefix="trial.")
    assert logical(odd, physical(odd, DOSING)) == DOSING


def test_topics_are_made_with_their_broker_names_and_the_anchors_keep_one_partition() -> None:
    assert new_topic(physical(PROD, AUDIT_ANCHORS), PROD).num_partitions == 1
    assert new_topic(physical(PROD, DOSING), PROD).num_partitions == PROD.kafka_topic_partitions


def test_a_prefix_is_only_what_kafka_accepts_in_a_topic_name() -> None:
    for bad in ("prod/", "pr od.", "prød."):
        with pytest.raises(ValidationError):
            Settings(kafka_topic_prefix=bad)
    assert Settings(kafka_topic_prefix="eu-west_1.staging.").kafka_topic_prefix


def _record(topic: str, source: str) -> ConsumerRecord[bytes, bytes]:
    cloud = CloudEvent(id=str(uuid.uuid4()), source=source, type="Anything", subject="P1",
                       time=utcnow(), data={}, sequence=1)
    return ConsumerRecord(topic=topic, partition=0, offset=0, timestamp=0, timestamp_type=0,
                          key=b"P1", value=cloud.to_bytes(), checksum=None, serialized_key_size=2,
                          serialized_value_size=1, headers=())


async def _runner(settings: Settings) -> ConsumerRunner:
    async def handler(*_: object) -> None:
        return None

    return ConsumerRunner(cast(EventStore, None), settings, [SAFETY], {"*": handler},
                          group_id="dosing")


async def test_a_consumer_dispatches_and_checks_sources_on_the_logical_topic() -> None:
    runner = await _runner(PROD)
    parsed = runner._parse(_record("prod.trial.safety", "/services/safety"))
    assert parsed is not None and parsed[1].topic == SAFETY
    # Forged on the prefixed topic: the owner check sees trial.safety, and refuses it (D42).
    with pytest.raises(PoisonRecord, match=r"may not publish to trial\.safety$"):
        runner._parse(_record("prod.trial.safety", "/services/dosing"))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The options the CLI's Kafka clients are made with (they stop right there)."""
    made: dict[str, dict[str, Any]] = {}

    def stand_in(kind: str) -> Any:
        def make(*topics: str, **options: Any) -> Any:
            made[kind] = {"topics": topics, **options}
            raise ConnectionError("stand-in")
        return make

    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", stand_in("consumer"))
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", stand_in("producer"))
    return made


SASL_ENV = {"TRIAL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "TRIAL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "TRIAL_KAFKA_SASL_USERNAME": "operator", "TRIAL_KAFKA_SASL_PASSWORD": "s3cret",
            "TRIAL_KAFKA_TOPIC_PREFIX": "prod."}


def test_the_operators_cli_connects_with_the_environments_sasl_settings(
        monkeypatch: pytest.MonkeyPatch, captured: dict[str, dict[str, Any]]) -> None:
    for key, value in SASL_ENV.items():
        monkeypatch.setenv(key, value)
    settings = operations.kafka_settings("broker:9092")
    assert settings.kafka_bootstrap_servers == "broker:9092"
    expected = client_options(settings)
    assert expected["sasl_plain_username"] == "operator"
    assert expected["sasl_plain_password"] == "s3cret"
    assert expected["security_protocol"] == "SASL_PLAINTEXT"

    with pytest.raises(ConnectionError):
        asyncio.run(operations.read_dlq(settings, SAFETY))
    assert {k: captured["consumer"][k] for k in expected} == expected

    dead = operations.DeadLetter(dlq="prod.trial.safety.dlq", partition=0, offset=0,
                                 timestamp_ms=0, key=b"k", value=b"{}",
                                 headers={"dlq_topic": SAFETY})
    with pytest.raises(ConnectionError):
        asyncio.run(operations.replay(settings, SAFETY, [dead]))
    assert {k: captured["producer"][k] for k in expected} == expected

    with pytest.raises(ConnectionError):
        asyncio.run(operations._end_offsets(settings, list(TOPICS), "audit-rebuild-x"))
    assert {k: captured["consumer"][k] for k in expected} == expected
    assert captured["consumer"]["group_id"] == "prod.audit-rebuild-x"  # as its ConsumerRunner's
