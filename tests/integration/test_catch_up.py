"""Never "unknown" because a consumer lags, even when the service is slow (D33), on the real
broker: safety's own consumer and store, a patient published as randomization would."""

from __future__ import annotations

import asyncio

from services.safety.domain import known_patient
from services.safety.handlers import handlers
from services.safety.projection import current_state
from services.safety.state import PatientFile
from shared.catchup import PUBLISH_GRACE_S, SETTLING_S, unless_lagging
from shared.consumer import ConsumerRunner
from shared.errors import Refused
from shared.events import ENROLLMENT
from shared.kafka import ensure_topics
from shared.migrate import upgrade
from shared.protocol import default_protocol
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import REAL, Broker
from tests.integration.test_safety_replay import publish_patients
from tests.integration.test_safety_support import ae_body, running_safety
from tests.support import eventually


async def test_a_first_look_slower_than_the_grace_still_asks_the_consumer(
        own_broker: Broker, make_database_url: object) -> None:
    """Under load a service's first look can take longer than the publish grace on its own. It
    must not be the last: the consumer is asked, and the patient it then holds is found (found
    by the load test: 404 for patients that existed, at 10 workflows/s)."""
    assert callable(make_database_url)
    settings = Settings(service_name="safety", database_url=make_database_url("safety"),
                        kafka_bootstrap_servers=own_broker.bootstrap, relay_poll_interval_s=0.1,
                        kafka_request_timeout_ms=5000,
                        kafka_session_timeout_ms=10_000 if REAL else 2000)
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
    settings = Settings(service_name="safety", database_url=make_database_url("safety"),
                        kafka_bootstrap_servers=own_broker.bootstrap,
                        kafka_request_timeout_ms=5000,
                        kafka_session_timeout_ms=10_000 if REAL else 2000)
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
