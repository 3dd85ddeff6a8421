"""Never "unknown" because a consumer lags, even when the service is slow (D33), on the real
broker: safety's own consumer and store, a patient published as randomization would."""

from __future__ import annotations

import asyncio

from services.safety.domain import known_patient
from services.safety.projection import current_state
from services.safety.state import PatientFile
from shared.catchup import PUBLISH_GRACE_S, unless_lagging
from shared.errors import Refused
from shared.events import ENROLLMENT
from shared.kafka import ensure_topics
from shared.settings import Settings
from tests.conftest import REAL, Broker
from tests.integration.test_safety_replay import publish_patients
from tests.integration.test_safety_support import running_safety
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
