"""A write's answer leaves once its events are on the broker (D56), on the real database and
broker: the randomization service's own app, relay and store.

The defect it closes (issue 15, fault tests): a site randomized a patient, got 201, and dosing
answered the dose `404 patient_not_found` because the randomization's relay had not published
yet (a replica that does not publish, a relay resuming after a restart): dosing had read all the
broker held, and the broker did not hold the patient."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from deploy import infra
from services.randomization.app import spec as randomization_spec
from shared.app import create_app
from shared.auth import issue_dev_token
from shared.events import ENROLLMENT
from shared.kafka import ensure_topics
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore
from shared.timing import entries
from tests.conftest import REAL, Broker
from tests.e2e.conftest import screening
from tests.support import eventually, read_to_end


def service_settings(broker: str, database_url: str, answer_after_publish_s: float = 2.0
                     ) -> Settings:
    return Settings(service_name="randomization", database_url=database_url,
                    kafka_bootstrap_servers=broker, kafka_request_timeout_ms=5000,
                    kafka_session_timeout_ms=10_000 if REAL else 2000,
                    consumers_enabled=False, answer_after_publish_s=answer_after_publish_s)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(randomization_spec, settings)
    async with app.router.lifespan_context(app):
        yield app


def site(app: FastAPI, settings: Settings) -> httpx.AsyncClient:
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r",
                             timeout=30, headers={"Authorization": f"Bearer {token}"})


def relay_of(app: FastAPI) -> Relay:
    relay = app.state.runtime.relay
    assert isinstance(relay, Relay)
    return relay


async def screen(app: FastAPI, settings: Settings) -> int:
    """Screen one patient; the position of the event it wrote, read as the answer arrives."""
    store: EventStore = app.state.runtime.store
    async with site(app, settings) as client:
        r = await client.post("/v1/screenings", json=screening(),
                              headers={"Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 201, r.text
        return await store.head()  # nothing else writes to this store meanwhile


async def test_the_answer_leaves_once_the_event_is_on_the_broker(
        own_broker: Broker, make_database_url: Callable[[str], str]) -> None:
    settings = service_settings(own_broker.bootstrap, make_database_url("randomization"))
    await ensure_topics(settings)
    async with running(settings) as app:
        relay = relay_of(app)
        first = await screen(app, settings)
        # as the answer arrived, the relay had published it: nothing was left to wait for
        assert relay.published_position >= first > 0
        assert relay.answers == {"published": 1, "before_published": 0}
        second = await screen(app, settings)
        assert relay.published_position >= second > first
        screened = [e.event_id for e in await app.state.runtime.store.read_all(after=0)
                    if e.type == "PatientScreened"]
    assert len(screened) == 2
    on_broker = b"".join(r.value or b"" for r in await read_to_end(settings, ENROLLMENT))
    assert all(event_id.encode() in on_broker for event_id in screened)


async def test_a_replica_that_does_not_publish_answers_once_the_leader_has(
        own_broker: Broker, make_database_url: Callable[[str], str]) -> None:
    url = make_database_url("randomization")
    settings = service_settings(own_broker.bootstrap, url)
    await ensure_topics(settings)
    async with running(settings) as leader:
        await eventually(lambda: relay_of(leader).leading, timeout=60,
                         what="the first replica to hold the relay's leadership")
        async with running(settings) as replica:
            position = await screen(replica, settings)
            follower = relay_of(replica)
            assert not follower.leading  # the leader published it, not this replica
            assert await replica.state.runtime.store.published_through("kafka") >= position
            assert relay_of(leader).published_position >= position
            assert follower.answers == {"published": 1, "before_published": 0}


async def test_with_the_broker_away_the_write_is_answered_anyway(
        make_database_url: Callable[[str], str]) -> None:
    nowhere = f"127.0.0.1:{infra.free_port()}"  # nothing listens there
    settings = service_settings(nowhere, make_database_url("randomization"),
                                answer_after_publish_s=0.5)
    async with running(settings) as app:
        position = await screen(app, settings)  # 201: the write is committed
        relay = relay_of(app)
        assert relay.published_position < position
        assert relay.answers == {"published": 0, "before_published": 1}
        async with site(app, settings) as client:  # and the operators see it counted
            metrics = (await client.get("/metrics")).text
        assert 'trial_write_answers_total{outcome="before_published"} 1.0' in metrics


async def test_no_wait_when_turned_off(own_broker: Broker,
                                       make_database_url: Callable[[str], str]) -> None:
    settings = service_settings(own_broker.bootstrap, make_database_url("randomization"),
                                answer_after_publish_s=0)
    await ensure_topics(settings)
    async with running(settings) as app:
        await screen(app, settings)
        assert relay_of(app).answers == {"published": 0, "before_published": 0}


async def test_the_answer_says_where_its_time_went(
        own_broker: Broker, make_database_url: Callable[[str], str]) -> None:
    """D90: every answer carries `Server-Timing`. A write's names its wait for the group commit
    and for the broker (D56) inside the service's whole time; a replay under its key and a read
    time only themselves (the first answer's timings are not kept with it)."""
    settings = service_settings(own_broker.bootstrap, make_database_url("randomization"))
    await ensure_topics(settings)
    async with running(settings) as app, site(app, settings) as client:
        key, body = str(uuid.uuid4()), screening()
        first = await client.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        parts = entries(first.headers["server-timing"])
        assert set(parts) == {"commit", "publish", "app"}, first.headers["server-timing"]
        assert min(parts.values()) >= 0
        assert parts["app"] + 0.2 >= parts["commit"] + parts["publish"]  # each rounded to 0.1
        assert relay_of(app).answers["published"] == 1  # the publish part is that wait

        again = await client.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        assert again.headers.get("idempotent-replayed") == "true"
        assert set(entries(again.headers["server-timing"])) == {"app"}

        missing = await client.get("/v1/patients/P-0000-none")
        assert missing.status_code == 404
        assert set(entries(missing.headers["server-timing"])) == {"app"}
