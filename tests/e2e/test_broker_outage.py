"""Broker outage: the API keeps accepting writes; every event reaches Kafka once it is back."""

from __future__ import annotations

from pathlib import Path

import httpx
from aiokafka import ConsumerRecord

from shared.events import ENROLLMENT, CloudEvent
from tests.conftest import Broker
from tests.e2e.conftest import client, screening, start_system
from tests.support import read_topic


async def test_writes_through_the_api_survive_a_broker_outage(
        own_broker: Broker, pg_dsn: str | None, tmp_path: Path) -> None:
    system, _ = start_system(own_broker, pg_dsn, tmp_path, services=("randomization", "gateway"))
    try:
        service = f"http://127.0.0.1:{system.ports['randomization']}"
        async with client(system) as site, httpx.AsyncClient(base_url=service) as direct:
            own_broker.stop()
            ids = []
            for n in range(10):
                r = await site.post("/v1/screenings", json=screening(number=f"S1-OUT-{n}"))
                assert r.status_code == 201, r.text  # nothing waits for the broker
                ids.append(r.json()["screening_id"])
            # Still ready (writes need only the database); the outage shows in the detail and
            # the metrics, for an operator, not as a service taken out of rotation.
            ready = await direct.get("/readyz")
            assert ready.status_code == 200 and "broker" not in ready.json()["checks"]
            assert ready.json()["checks"]["database"] is True
            health = (await direct.get("/healthz")).json()
            assert health["status"] == "ok" and health["detail"]["broker"] is False
            assert "trial_broker_reachable 0.0" in (await direct.get("/metrics")).text
            own_broker.start()
            health = (await direct.get("/healthz")).json()
            assert health["detail"]["broker"] is True

            def all_there(records: list[ConsumerRecord]) -> bool:
                subjects = {CloudEvent.from_bytes(r.value).subject for r in records}
                return set(ids) <= subjects

            records = await read_topic(own_broker.bootstrap, ENROLLMENT, until=all_there,
                                       timeout=120)
    finally:
        system.stop()
    events = [CloudEvent.from_bytes(r.value) for r in records]
    first_seen: list[str] = []
    for e in events:
        if e.subject in ids and e.subject not in first_seen:
            first_seen.append(e.subject)
    # One key per screening spreads them over partitions, so order is checked by sequence.
    sequences = {e.subject: e.sequence for e in events if e.subject in ids}
    assert [sequences[i] for i in ids] == sorted(sequences[i] for i in ids)
    assert sorted(first_seen) == sorted(ids)
    assert all(e.type == "PatientScreened" for e in events if e.subject in ids)
