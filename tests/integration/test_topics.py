"""The trial's topics as the services create them on the real broker: history kept forever."""

from __future__ import annotations

import uuid

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.kafka import ensure_topics, new_topic
from shared.settings import Settings
from tests.conftest import REAL


def test_topics_are_made_as_configured() -> None:
    one = new_topic("trial.dosing", Settings())
    assert (one.num_partitions, one.replication_factor) == (3, 1)
    assert one.topic_configs == {"retention.ms": "-1", "retention.bytes": "-1"}
    three = new_topic("trial.audit.anchors", Settings(kafka_replication_factor=3))
    assert (three.num_partitions, three.replication_factor) == (1, 3)
    assert three.topic_configs["min.insync.replicas"] == "2"


async def test_a_created_topic_keeps_its_records_forever(settings: Settings) -> None:
    topic = f"test.history.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        assert len(described["partitions"]) == settings.kafka_topic_partitions
        if REAL:  # the embedded broker keeps everything in memory, with no retention to describe
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)])
            configs = {entry[0]: entry[1] for resource in response.resources
                       for entry in resource[4]}
            assert (configs["retention.ms"], configs["retention.bytes"]) == ("-1", "-1")
    finally:
        await admin.close()
