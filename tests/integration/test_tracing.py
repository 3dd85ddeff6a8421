"""One trace from the gateway to dosing's consumer (shared/tracing.py), on the real database and
broker: a randomize request through the gateway (served by uvicorn, over real HTTP) to the
randomization service (served by uvicorn), its ArmAssigned event committed, then published by the
service's own relay in the background, then handled by dosing's own consumer, which writes the
patient's dosing schedule. Spans go to an in-memory exporter.

The chain checked, each a child of the one before:
test span -> gateway SERVER -> gateway httpx CLIENT -> randomization SERVER (whose traceparent the
stored ArmAssigned carries) -> relay PRODUCER (trial.enrollment publish) -> dosing CONSUMER
(whose traceparent the stored DosingScheduleCreated carries).
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deploy import infra
from services.dosing.app import create_dosing_app
from services.gateway.app import create_gateway
from services.randomization.app import spec as randomization_spec
from shared import tracing
from shared.app import create_app
from shared.auth import issue_dev_token
from shared.consumer import ConsumerRunner, Delivery
from shared.events import ENROLLMENT
from shared.kafka import ensure_topics
from shared.logs import configure_logging
from shared.settings import Settings
from shared.store import EventStore, NewEvent, RecordedEvent, Transaction
from tests.integration.test_consumer import withdrawal
from tests.support import eventually


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(Settings(service_name="test", log_format="json"), stream=stream)
    yield stream
    configure_logging(Settings(service_name="test", log_format="json"))  # back to stderr


def logged(stream: io.StringIO, logger: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in found if line.get("logger") == logger]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """`app` served by uvicorn on a free port of this loop, its lifespan run; yields its URL."""
    port = infra.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on", access_log=False))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), what="uvicorn to start")
    if task.done():
        task.result()
        raise AssertionError("uvicorn stopped at start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def screening() -> dict[str, object]:
    return {
        "site_id": "S1", "screening_number": f"S1-{uuid.uuid4().hex[:6]}",
        "birth_date": "1980-05-01", "sex": "female", "weight_kg": 70.0,
        "diagnosis_date": "2020-01-15", "psoriasis_type": "plaque", "pasi": 14.2,
        "bsa_percent": 12.0, "dlqi": 11, "conventional_therapy_failed": True,
        "drug_induced": False, "ongoing_psoriasis_treatment": False, "prior_biologic_targets": [],
        "active_infection": False, "recurrent_infections": False, "malignancy_history": False,
        "hiv": False, "hbv": False, "hcv": False, "pregnant_or_lactating": False,
        "planning_pregnancy": False, "can_attend_follow_up": True,
        "consent_signed_at": "2026-11-20T09:30:00Z"}


def span_id_of(traceparent: str) -> tuple[int, int]:
    """(trace id, span id) of a W3C traceparent."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def stored(store: EventStore, type: str, patient: str) -> RecordedEvent | None:
    found = [e for e in await store.read_all(limit=100_000)
             if e.type == type and e.data.get("patient_id") == patient]
    return found[0] if found else None


def one(spans: list[ReadableSpan], what: str, where: Callable[[ReadableSpan], bool]) -> ReadableSpan:
    found = [s for s in spans if where(s)]
    assert len(found) == 1, f"{what}: {[(s.name, s.kind, dict(s.attributes or {})) for s in found]}"
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


async def test_one_trace_from_the_gateway_through_the_relay_to_dosings_consumer(
        spans: InMemorySpanExporter, lines: io.StringIO, settings: Settings,
        make_database_url: Callable[[str], str]) -> None:
    # Each app's logging set-up is the `lines` fixture's (JSON): it keeps its stream.
    # Randomization publishes (its relay on, as "randomization": the source trial.enrollment
    # accepts), and consumes nothing here; dosing consumes in a group of its own and publishes
    # nothing (its records would be a forged source on the session's shared trial.dosing).
    randomization = create_app(randomization_spec, settings.model_copy(update={
        "service_name": "randomization", "database_url": make_database_url("rand"),
        "consumers_enabled": False, "log_format": "json"}))
    group = f"dosing-trace-{uuid.uuid4().hex[:8]}"
    dosing = create_dosing_app(settings.model_copy(update={
        "service_name": group, "database_url": make_database_url("dose"),
        "relay_enabled": False, "log_format": "json"}))
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1", sub="coordinator-trace")

    async with serving(randomization) as randomization_url, \
            dosing.router.lifespan_context(dosing):
        gateway = create_gateway(Settings(service_name="gateway", randomization_url=randomization_url,
                                          log_format="json"))
        async with serving(gateway) as gateway_url, httpx.AsyncClient(
                base_url=gateway_url, timeout=30,
                headers={"Authorization": f"Bearer {token}"}) as site:
            r = await site.post("/v1/screenings", json=screening())
            assert r.status_code == 201, r.text
            r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
            assert r.status_code == 201, r.text
            patient = r.json()["patient_id"]

            # The randomize request, inside a span of the test's own: the trace's root.
            with tracing.tracer().start_as_current_span("test: randomize") as root:
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                request_id = f"req-trace-{uuid.uuid4().hex[:8]}"
                r = await site.post(f"/v1/patients/{patient}/randomization",
                                    headers={**carrier, "X-Request-ID": request_id})
            assert r.status_code == 201, r.text
        trace_id = root.get_span_context().trace_id

        rand_store: EventStore = randomization.state.runtime.store
        dose_store: EventStore = dosing.state.runtime.store
        assigned = await stored(rand_store, "ArmAssigned", patient)
        assert assigned is not None
        schedule = await eventually(lambda: stored(dose_store, "DosingScheduleCreated", patient),
                                    timeout=120, what="dosing's consumer to schedule the patient")

        def consumer_span() -> list[ReadableSpan]:
            return [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER
                    and attr(s, "messaging.message.id") == assigned.event_id]

        await eventually(consumer_span, timeout=30, what="the consumer's span to end")

    finished = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    gateway_server = one(finished, "gateway server span", lambda s: s.kind == SpanKind.SERVER
                         and attr(s, "trial.service") == "gateway")
    client = one(finished, "gateway client span", lambda s: s.kind == SpanKind.CLIENT)
    service_server = one(finished, "randomization server span", lambda s: s.kind == SpanKind.SERVER
                         and attr(s, "trial.service") == "randomization")
    producer = one(finished, "relay's span for ArmAssigned", lambda s: s.kind == SpanKind.PRODUCER
                   and attr(s, "messaging.message.id") == assigned.event_id)
    consumer = one(finished, "dosing's span for ArmAssigned", lambda s: s.kind == SpanKind.CONSUMER
                   and attr(s, "messaging.message.id") == assigned.event_id)

    # One trace, each hop the child of the one before.
    assert parent_of(gateway_server) == root.get_span_context().span_id
    assert parent_of(client) == gateway_server.context.span_id
    assert parent_of(service_server) == client.context.span_id
    assert parent_of(producer) == service_server.context.span_id
    assert parent_of(consumer) == producer.context.span_id
    assert producer.name == f"{ENROLLMENT} publish" and consumer.name == f"{ENROLLMENT} process"
    assert attr(consumer, "messaging.consumer.group.name") == group
    assert attr(service_server, "http.route") == "/v1/patients/{patient_id}/randomization"

    # The context rode with the events: the request's in ArmAssigned's metadata (the relay read
    # it there, after the request had ended), the consumer's in what dosing wrote in answer.
    assert span_id_of(assigned.metadata["traceparent"]) == (trace_id,
                                                            service_server.context.span_id)
    assert span_id_of(schedule.metadata["traceparent"]) == (trace_id, consumer.context.span_id)

    # The log lines name the same trace: the request's line in the gateway and in the service,
    # and the consumed record's line in dosing (its correlation id the request's id).
    requests = [x for x in logged(lines, "trial.request") if x.get("request_id") == request_id]
    assert sorted((x["service"], x["route"], x["status"]) for x in requests) == [
        ("gateway", "/v1/patients/{patient_id}/randomization", 201),
        ("randomization", "/v1/patients/{patient_id}/randomization", 201)]
    assert {x["trace_id"] for x in requests} == {format(trace_id, "032x")}
    (record,) = [x for x in logged(lines, "trial.consumer")
                 if x.get("event_id") == assigned.event_id]
    assert record["outcome"] == "handled" and record["type"] == "ArmAssigned"
    assert (record["topic"], record["group"], record["service"]) == (ENROLLMENT, group, group)
    assert isinstance(record["partition"], int) and isinstance(record["offset"], int)
    assert record["correlation_id"] == request_id and record["duration_ms"] > 0
    assert (record["trace_id"], record["span_id"]) == (format(trace_id, "032x"),
                                                       format(consumer.context.span_id, "016x"))


async def test_with_tracing_off_nothing_is_traced_and_no_traceparent_is_stored(
        settings: Settings) -> None:
    tracing.use_provider(None)
    randomization = create_app(randomization_spec, settings.model_copy(update={
        "service_name": "randomization", "relay_enabled": False, "consumers_enabled": False}))
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1")
    # No OpenTelemetry middleware was put in front of the app.
    assert not getattr(randomization, "_is_instrumented_by_opentelemetry", False)
    async with randomization.router.lifespan_context(randomization), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=randomization), base_url="http://randomization",
            headers={"Authorization": f"Bearer {token}"}) as client:
        r = await client.post("/v1/screenings", json=screening())
        assert r.status_code == 201, r.text
        store: EventStore = randomization.state.runtime.store
        screened = [e for e in await store.read_all(limit=1000) if e.type == "PatientScreened"]
        assert len(screened) == 1 and "traceparent" not in screened[0].metadata


async def seen(tx: Transaction, delivery: Delivery) -> None:
    await tx.append(f"seen-{delivery.event.subject}", [NewEvent("Seen", {"id": delivery.event.id})],
                    None)


async def test_a_batch_links_to_each_records_trace_and_logs_each_records_outcome(
        spans: InMemorySpanExporter, lines: io.StringIO, settings: Settings,
        store: EventStore) -> None:
    """The audit ledger's way: one transaction for a fetch. Its span cannot be the child of three
    traces: it links to each. Each record still gets its line, a resent one as a duplicate."""
    topic = f"test.trace.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    first, second = withdrawal(f"PT-{uuid.uuid4().hex[:6]}"), withdrawal(f"PT-{uuid.uuid4().hex[:6]}")
    sent = []
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for event in (first, first, second):  # the second `first`: a relay's resend
            with tracing.tracer().start_as_current_span("publish", kind=SpanKind.PRODUCER) as span:
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                sent.append(span.get_span_context())
            await producer.send_and_wait(topic, event.to_bytes(), key=b"k", headers=[
                ("traceparent", carrier["traceparent"].encode())])
    finally:
        await producer.stop()

    runner = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": seen},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.handled + runner.duplicates >= 3, what="three records")
    finally:
        stop.set()
        await task

    ours = [x for x in logged(lines, "trial.consumer") if x["topic"] == topic]
    assert [(x["event_id"], x["outcome"]) for x in ours] == [
        (first.id, "handled"), (first.id, "duplicate"), (second.id, "handled")]
    assert [x["offset"] for x in ours] == [0, 1, 2]
    processes = [s for s in spans.get_finished_spans()
                 if s.kind == SpanKind.CONSUMER and attr(s, "messaging.destination.name") == topic]
    batches = [s for s in processes if attr(s, "messaging.batch.message_count") is not None]
    each = [s for s in processes if s not in batches]
    if ours[0].get("batch") == 3:  # one fetch, one transaction (as good as always)
        (batch,) = batches
        assert [link.context.span_id for link in batch.links] == [c.span_id for c in sent]
        assert batch.parent is None
    # Fetched together or one by one, each record's handling is its producer's child (D78),
    # and its log line is in that trace, that span.
    assert sorted(parent_of(s) or 0 for s in each) == sorted(c.span_id for c in sent)
    assert [attr(s, "messaging.message.id") for s in each] == [first.id, first.id, second.id]
    assert [(x["trace_id"], x["span_id"]) for x in ours] == [
        (format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")) for s in each]
