"""OpenTelemetry traces across HTTP and Kafka, off unless the standard OTEL_* variables ask for them.

On: `OTEL_TRACES_EXPORTER` (otlp, console; `none` is off) or an `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` makes `configure_tracing` set an SDK tracer provider with a
batch exporter (its endpoint, headers, protocol, sampler and batching from the same standard
variables). Off, nothing is instrumented and every hook here returns after one test: no
middleware, no span, no header, beyond the API's no-op.

Where the context travels (one trace from the caller to the last consumer):

* HTTP: every app's FastAPI instrumentation takes the caller's `traceparent`; the gateway opens
  a CLIENT span for each forwarded call and sends its traceparent to the service
  (`client_span`), so gateway -> service is one trace.
* Into the store: `NewEvent.of` (shared/store.py) puts the current `traceparent` (the request's
  server span, or a consumer's span) in the event's metadata. The relay publishes after the
  commit, in a background task, so the context must travel with the event.
* Onto Kafka: the relay starts one PRODUCER span a record, a child of the stored traceparent,
  and writes *its* traceparent in the record's headers (W3C Trace Context, as other Kafka
  instrumentations do); with tracing off the stored one is passed on as it is.
* Out of Kafka: a consumer handling one record opens a CONSUMER span, a child of the record's
  traceparent: the handler's own writes carry it on. An audit-ledger batch (many records, one
  transaction) cannot be the child of each: its span links to every record's context instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import logs

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord
    from fastapi import FastAPI

TRACEPARENT = "traceparent"
INSTRUMENTATION = "nct03424629.trial"
# Requests not traced: probes and scrapes, every few seconds, would bury the real traces.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"
_PROPAGATOR = TraceContextTextMapPropagator()
_state: dict[str, Any] = {"provider": None, "configured": False}


def exporter_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported somewhere."""
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
    if exporters:
        return exporters != {"none"}
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service: str) -> None:
    """Once a process: an SDK tracer provider exporting as the OTEL_* variables say, set as the
    global one too (so any other instrumentation joins the same traces); nothing when they ask
    for no exporter. The SDK is imported only then."""
    if _state["configured"]:
        return
    _state["configured"] = True
    if _state["provider"] is not None or not exporter_requested():
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    provider = SdkTracerProvider(resource=Resource.create({} if named else {"service.name": service}))
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        name = name.strip().lower()
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider


def _otlp_exporter() -> Any:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )
    return HttpSpanExporter()


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on (a test's, with an in-memory exporter), or not at all
    (None). Apps and clients created before keep what they were created with."""
    _state.update(provider=provider, configured=True)


def enabled() -> bool:
    return _state["provider"] is not None


def tracer() -> trace.Tracer:
    provider: TracerProvider | None = _state["provider"]
    return provider.get_tracer(INSTRUMENTATION) if provider is not None else trace.NoOpTracer()


# --- HTTP ------------------------------------------------------------------------------------

def instrument_app(app: FastAPI, service: str) -> None:
    """Server spans for every request of `app` (a child of the caller's traceparent), named by
    route template; nothing when tracing is off."""
    if not enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    def hook(span: trace.Span, scope: dict[str, Any]) -> None:
        if span.is_recording():
            span.set_attribute("trial.service", service)

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_state["provider"],
                                       server_request_hook=hook, excluded_urls=EXCLUDED_URLS,
                                       exclude_spans=["receive", "send"])


class ClientCall:
    """The CLIENT span of one call to a service (or nothing, with tracing off)."""

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span

    def answered(self, status: int) -> None:
        if self._span is not None and self._span.is_recording():
            self._span.set_attribute("http.response.status_code", status)
            if status >= 400:  # OpenTelemetry's HTTP conventions: a client's 4xx is an error
                self._span.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def client_span(method: str, url: str, headers: dict[str, str]) -> Iterator[ClientCall]:
    """A CLIENT span around a call to a service, its traceparent written into `headers`: the
    gateway's half of one trace from the caller to the service (OpenTelemetry's HTTP client
    conventions: named by the method, the URL and the status as attributes). Nothing, not even
    a header, when tracing is off."""
    if not enabled():
        yield ClientCall(None)
        return
    attributes = {"http.request.method": method, "url.full": url}
    with tracer().start_as_current_span(method, kind=SpanKind.CLIENT,
                                        attributes=attributes) as span:
        _PROPAGATOR.inject(headers)
        yield ClientCall(span)


# --- into the store --------------------------------------------------------------------------

def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, if tracing is on and a span is current."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def with_traceparent(metadata: dict[str, Any]) -> dict[str, Any]:
    """An event's metadata with the current traceparent (unless it has one already)."""
    if TRACEPARENT in metadata:
        return metadata
    found = current_traceparent()
    return metadata if found is None else {**metadata, TRACEPARENT: found}


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids as hex, for a log line; None outside any span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _context_of(traceparent: str | bytes | None) -> Context | None:
    if not traceparent:
        return None
    text = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
    context = _PROPAGATOR.extract({TRACEPARENT: text})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


# --- onto Kafka (the relay) ------------------------------------------------------------------

@contextlib.contextmanager
def publishing(events: Sequence[Any], records: Sequence[dict[str, Any]],
               service: str) -> Iterator[None]:
    """Around the relay's sending of `records` (one a stored event of `events`) until the broker
    has them all: with tracing on, one PRODUCER span a record, the child of the request that
    wrote the event, its traceparent in the record's headers; off, the stored traceparent goes
    in the headers as it is."""
    if not enabled():
        for event, record in zip(events, records, strict=True):
            if (stored := event.metadata.get(TRACEPARENT)) is not None:
                record["headers"].append((TRACEPARENT, str(stored).encode()))
        yield
        return
    spans = []
    for event, record in zip(events, records, strict=True):
        span = tracer().start_span(
            f"{record['topic']} publish",
            context=_context_of(event.metadata.get(TRACEPARENT)) or Context(),
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                        "messaging.destination.name": record["topic"],
                        "messaging.message.id": event.event_id, "trial.service": service})
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        if TRACEPARENT in carrier:
            record["headers"].append((TRACEPARENT, carrier[TRACEPARENT].encode()))
        spans.append(span)
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for span in spans:
            span.end()


# --- out of Kafka (the consumer) ---------------------------------------------------------------

def _header(record: ConsumerRecord, name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None


At = tuple[str, int, int]  # a record's topic, partition and offset: a batch spans partitions


def _at(record: ConsumerRecord) -> At:
    return record.topic, record.partition, record.offset


@dataclass
class _Consuming:
    """What a record's (or a batch's) handling learnt on the way: each record's event, and each
    event's outcome in a batch."""

    events: dict[At, tuple[str, str, str | None]] = field(default_factory=dict)  # record ->
    applied: list[bool] = field(default_factory=list)  # each record's: handled (not a duplicate)
    # record -> the trace and span ids of its last try in a batch (`record_in_batch`)
    ids: dict[At, tuple[str, str]] = field(default_factory=dict)
    fell_back: bool = False  # the batch went back to one record at a time


_consuming: ContextVar[_Consuming | None] = ContextVar("trial_consuming", default=None)
R = TypeVar("R")


def _record_attributes(record: ConsumerRecord, group: str) -> dict[str, Any]:
    return {"messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": group}


def traced_record(handle: Callable[[Any, ConsumerRecord], Awaitable[None]]
                  ) -> Callable[[Any, ConsumerRecord], Awaitable[None]]:
    """ConsumerRunner.handle_record: a CONSUMER span, child of the record's traceparent, and the
    record's log line (its outcome read from the runner's counters)."""

    @functools.wraps(handle)
    async def wrapper(runner: Any, record: ConsumerRecord) -> None:
        outer = _consuming.get()
        if outer is not None:
            outer.fell_back = True
        seen = _Consuming()
        token = _consuming.set(seen)
        before = (runner.handled, runner.duplicates, runner.dead_lettered)
        started = time.perf_counter()
        span_cm: Any = contextlib.nullcontext()
        if enabled():
            span_cm = tracer().start_as_current_span(
                f"{record.topic} process", context=_context_of(_header(record, TRACEPARENT)),
                kind=SpanKind.CONSUMER, attributes=_record_attributes(record, runner.group_id))
        try:
            with span_cm as span:
                await handle(runner, record)
                event_id, event_type, correlation = seen.events.get(_at(record), (None, None, None))
                after = (runner.handled, runner.duplicates, runner.dead_lettered)
                outcome = ("handled" if after[0] > before[0] else "duplicate" if after[1] > before[1]
                           else "dead-lettered" if after[2] > before[2] else "skipped")
                if span is not None:
                    span.set_attribute("trial.outcome", outcome)
                    if event_id is not None:
                        span.set_attribute("messaging.message.id", event_id)
                if event_type is None and (header := _header(record, "ce_type")) is not None:
                    event_type = header.decode("latin-1")
                # inside the span: the line carries its trace and span ids
                logs.consumed(service=runner.settings.service_name, group=runner.group_id,
                              topic=record.topic, partition=record.partition, offset=record.offset,
                              event_id=event_id, event_type=event_type, correlation_id=correlation,
                              outcome=outcome, duration_ms=(time.perf_counter() - started) * 1000)
        finally:
            _consuming.reset(token)

    return wrapper


def traced_batch(handle: Callable[[Any, list[ConsumerRecord]], Awaitable[None]]
                 ) -> Callable[[Any, list[ConsumerRecord]], Awaitable[None]]:
    """ConsumerRunner.handle_batch: one CONSUMER span for the batch's one transaction, linked to
    every record's context (a batch has no one parent), and a log line a record (in the
    record's own trace where its handling had a span, `record_in_batch`)."""

    @functools.wraps(handle)
    async def wrapper(runner: Any, records: list[ConsumerRecord]) -> None:
        seen = _Consuming()
        token = _consuming.set(seen)
        started = time.perf_counter()
        span_cm: Any = contextlib.nullcontext()
        if enabled():
            links = [Link(trace.get_current_span(c).get_span_context())
                     for r in records if (c := _context_of(_header(r, TRACEPARENT))) is not None]
            span_cm = tracer().start_as_current_span(
                f"{records[0].topic} process", kind=SpanKind.CONSUMER, links=links,
                attributes={**_record_attributes(records[0], runner.group_id),
                            "messaging.batch.message_count": len(records)})
        try:
            with span_cm:
                await handle(runner, records)
                if seen.fell_back:
                    return  # each record wrote its own line
                took = (time.perf_counter() - started) * 1000
                # In the order of the records that had a handler (an event id may come twice in
                # a batch: a resend, then a duplicate).
                outcomes = iter(seen.applied)
                lines = []
                for record in records:
                    at = _at(record)
                    event_id, event_type, correlation = seen.events.get(at, (None, None, None))
                    applied = next(outcomes, None) if at in seen.events else None
                    lines.append(dict(
                        service=runner.settings.service_name, group=runner.group_id,
                        topic=record.topic, partition=record.partition, offset=record.offset,
                        event_id=event_id, event_type=event_type, correlation_id=correlation,
                        outcome=("skipped" if applied is None else
                                 "handled" if applied else "duplicate"),
                        duration_ms=took, batch=len(records), ids=seen.ids.get(at)))
                logs.consumed_lines(lines)  # one write for the batch's lines
        finally:
            _consuming.reset(token)

    return wrapper


def noted_parse(parse: Callable[[Any, ConsumerRecord], R]) -> Callable[[Any, ConsumerRecord], R]:
    """ConsumerRunner._parse: which event the record holds, for its log line and span."""

    @functools.wraps(parse)
    def wrapper(runner: Any, record: ConsumerRecord) -> R:
        parsed = parse(runner, record)
        seen = _consuming.get()
        if seen is not None and parsed is not None:
            event = parsed[1].event  # type: ignore[index]
            seen.events[_at(record)] = (event.id, event.type, event.correlationid)
        return parsed

    return wrapper


@contextlib.contextmanager
def record_in_batch(record: ConsumerRecord, group: str, event_id: str) -> Iterator[None]:
    """One record's handling inside a batch's transaction (D78): a CONSUMER span, the child of
    the record's own traceparent as a record handled alone gets (`traced_record`), so what its
    handler appends carries the record's trace on. A try that is taken back (`StagedRead`) or
    run again ends with the error; the try that committed is the last span of the record."""
    if not enabled():
        yield
        return
    with tracer().start_as_current_span(
            f"{record.topic} process", context=_context_of(_header(record, TRACEPARENT)),
            kind=SpanKind.CONSUMER,
            attributes={**_record_attributes(record, group), "messaging.message.id": event_id}):
        seen, ids = _consuming.get(), current_ids()
        if seen is not None and ids is not None:  # the record's log line joins its trace
            seen.ids[_at(record)] = ids
        yield


def noted_outcomes(outcomes: list[bool]) -> None:
    """ConsumerRunner.handle_batch: each applied record's outcome once its transaction committed
    (handled, or a duplicate), in the order of the records that had a handler."""
    seen = _consuming.get()
    if seen is not None:
        seen.applied = list(outcomes)


__all__ = ["ClientCall", "client_span", "configure_tracing", "current_traceparent", "enabled",
           "instrument_app", "noted_outcomes", "noted_parse", "publishing", "record_in_batch",
           "traced_batch", "traced_record", "use_provider", "with_traceparent"]
