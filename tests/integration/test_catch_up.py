"""Never "unknown" because a consumer lags, even when the service is slow (D33), on the real
broker: safety's own consumer and store, a patient published as randomization would."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.safety.domain import known_patient
from services.safety.handlers import handlers
from services.safety.projection import current_state
from services.safety.state import PatientFile
from shared.catchup import PUBLISH_GRACE_S, SETTLING_S, unless_lagging
from shared.consumer import ConsumerRunner
from shared.errors import Refused
from shared.events import ENROLLMENT, dlq_topic
from shared.kafka import ensure_topics
from shared.migrate import upgrade
from shared.protocol import default_protocol
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import REAL, Broker
from tests.integration.test_consumer import count_down, produce, withdrawal
from tests.integration.test_safety_replay import publish_patients
from tests.integration.test_safety_support import ae_body, running_safety
from tests.support import eventually


def safety_settings(broker: Broker, database_url: str, relay_poll_interval_s: float = 0.2
                    ) -> Settings:
    """Safety's settings against `broker`: short timeouts, a session Kafka accepts."""
    return Settings(service_name="safety", database_url=database_url,
                    kafka_bootstrap_servers=broker.bootstrap, kafka_request_timeout_ms=5000,
                    kafka_session_timeout_ms=10_000 if REAL else 2000,
                    relay_poll_interval_s=relay_poll_interval_s)


async def test_a_first_look_slower_than_the_grace_still_asks_the_consumer(
        own_broker: Broker, make_database_url: object) -> None:
    """Under load a service's first look can take longer than the publish grace on its own. It
    must not be the last: the consumer is asked, and the patient it then holds is found (found
    by the load test: 404 for patients that existed, at 10 workflows/s)."""
    assert callable(make_database_url)
    settings = safety_settings(own_broker, make_database_url("safety"), relay_poll_interval_s=0.1)
    await ensure_topics(settings)
    async with running_safety(settings) as safety:
        rt = safety.runtime
        assert rt.consumer is not None
        consumer = rt.consumer

        async def reading() -> bool:  # in its group, partitions assigned
            return await consumer.caught_up(ENROLLMENT, "warm-up", 0.2)

        await eventually(reading, timeout=60, what="safety's consumer to read")
        (patient,) = await publish_patients(settings, ["msc_low"])
        looks = 0

        async def look() -> PatientFile:
            nonlocal looks
            looks += 1
            if looks == 1:  # a look that began before the record was handled, and ran long
                await asyncio.sleep(2 * PUBLISH_GRACE_S)
                raise Refused("patient_not_found", "No such patient")
            return known_patient(await current_state(rt.store, rt.protocol.trial_id), patient)

        found = await unless_lagging(rt, ENROLLMENT, patient, look)
    assert found.patient_id == patient and looks >= 2


async def test_after_a_rebalance_an_unknown_patient_is_not_caught_up_not_404(
        own_broker: Broker, make_database_url: object) -> None:
    """When the group hands a service its partitions again (a broker restart, a replica joining
    or dying), the services that make patients may still be publishing what they wrote
    meanwhile: for SETTLING_S a patient not found is 503 `not_caught_up`, never a 404 the site
    would believe (issue 15, found by the broker-restart fault test). The first assignment of a
    process is no such moment: there, unknown is 404 as before."""
    assert callable(make_database_url)
    settings = safety_settings(own_broker, make_database_url("safety"))
    await ensure_topics(settings)
    async with running_safety(settings) as safety:
        consumer = safety.runtime.consumer
        assert consumer is not None

        async def reading() -> bool:
            return await consumer.caught_up(ENROLLMENT, "warm-up", 0.2)

        await eventually(reading, timeout=60, what="safety's consumer to read")
        async with safety.client() as site:
            r = await site.post("/v1/patients/PT-NOBODY/adverse-events", json=ae_body())
            assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
            assert consumer.reassigned_at is None
            # a second member joins the group: the first is handed its partitions again
            twin_store = make_database_url("safety_twin")
            await upgrade(twin_store)
            twin = ConsumerRunner(EventStore(twin_store), settings, consumer.topics,
                                  handlers(default_protocol()))
            stop = asyncio.Event()
            task = asyncio.create_task(twin.run(stop))
            try:
                await eventually(lambda: consumer.reassigned_at is not None, timeout=60,
                                 what="the group to rebalance")
                await eventually(reading, timeout=60, what="safety's consumer to read again")
                r = await site.post("/v1/patients/PT-NOBODY/adverse-events", json=ae_body())
                assert (r.status_code, r.json()["code"]) == (503, "not_caught_up")
                assert r.headers["Retry-After"] == "1"
                assert consumer.settling(SETTLING_S)
            finally:
                stop.set()
                await task
                await twin.store.close()


class HeldCommit(ConsumerRunner):
    """Holds its first offset commit until released, so that the broker can be stopped while
    that commit is on its way (a real commit, sent late: no fake)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def commit_handled(self, consumer: AIOKafkaConsumer) -> None:
        if self._uncommitted and not self.release.is_set():
            self.holding.set()
            await self.release.wait()
        await super().commit_handled(consumer)


async def test_a_commit_that_waits_out_the_outage_still_marks_the_broker_away(
        own_broker: Broker, make_database_url: object) -> None:
    """D64, found by the broker-restart fault test on Kafka: aiokafka waits out a lost group
    coordinator inside `commit`, so a consume loop whose commit met the broker going away sat
    in it for the whole outage and never saw the coordinator lost. A restarted Kafka keeps the
    group (no rebalance), so nothing marked the service settling, and a dose about a patient
    whose randomization was still being published got 404 instead of 503. The consumer must
    know it met the broker away while its loop waits, and resume afterwards losing nothing."""
    assert callable(make_database_url)
    database_url = make_database_url("held")
    await upgrade(database_url)
    settings = safety_settings(own_broker, database_url)
    topic = f"test.held.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    store = EventStore(database_url)
    runner = HeldCommit(store, settings, [topic], {"PatientWithdrawn": count_down},
                        group_id=f"g-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.reading.is_set(), timeout=60, what="partitions assigned")
        await produce(settings, topic, withdrawal("P-held-1").to_bytes())
        await eventually(lambda: runner.holding.is_set(), timeout=60, what="a commit on its way")
        # Trouble from the broker's own start (a coordinator not yet available, on a slow
        # machine) may still count; what proves the point is trouble after the stop, below.
        assert runner.handled == 1
        await asyncio.to_thread(own_broker.stop)
        stopped_at = time.monotonic()
        runner.release.set()  # the commit now meets the broker away, and waits it out
        await eventually(lambda: (runner.trouble_at or 0) > stopped_at, timeout=60,
                         what="the consumer to know the broker is away, its loop in a commit")
        assert runner.settling(SETTLING_S)
        await asyncio.to_thread(own_broker.start)
        await ensure_topics(settings, [topic, dlq_topic(topic)])  # the embedded one is empty
        await produce(settings, topic, withdrawal("P-held-2").to_bytes())
        await eventually(lambda: runner.handled >= 2, timeout=90,
                         what="the consumer to resume after the broker's restart")
    finally:
        stop.set()
        runner.release.set()
        try:
            await asyncio.wait_for(task, 60)
        finally:
            task.cancel()
            await store.close()
    assert runner.settling(SETTLING_S)  # the last trouble was moments ago


async def test_a_partition_handled_here_to_its_end_is_caught_up_without_asking_the_group(
        own_broker: Broker, make_database_url: object) -> None:
    """A dose asks whether dosing has read trial.safety (every partition) and the patient's
    trial.efficacy partition: where this process has itself handled a partition to the end the
    broker names, the answer is yes without a round trip to the group's coordinator."""
    assert callable(make_database_url)
    settings = safety_settings(own_broker, make_database_url("safety"), relay_poll_interval_s=0.1)
    await ensure_topics(settings)
    async with running_safety(settings) as safety:
        consumer = safety.runtime.consumer
        assert consumer is not None
        (patient,) = await publish_patients(settings, ["msc_low"])

        async def handled() -> bool:
            return await consumer.caught_up(ENROLLMENT, patient, 0.2)

        await eventually(handled, timeout=60, what="safety to handle the patient's records")
        asked: list[object] = []
        ask_the_group = consumer._committed

        async def counted(kafka: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
            asked.append(tp)
            return await ask_the_group(kafka, tp)

        consumer._committed = counted  # type: ignore[method-assign, assignment]
        assert await consumer.caught_up(ENROLLMENT, patient, 2.0)
        assert asked == []
