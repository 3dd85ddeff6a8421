"""Benchmark: rebuilding projections: safety's state from its store, the audit ledger from Kafka.

    .venv/bin/python -m bench.replay --backend embedded          # SQLite + Tansu
    .venv/bin/python -m bench.replay --backend real --events 200000   # PostgreSQL + Kafka
    .venv/bin/python -m bench.replay --events 1000000 --no-breakdown --kafka-events 0

Issue 13, target 6: rebuilding a projection (safety's state; the audit ledger from Kafka) from
1,000,000 events at 50,000 events/s or more.

Fills a safety store with `bench.scale`'s patients' lives kept to the safety service's own event
types (`SAFETY_TYPES`: the patient facts safety learns from enrolment and dosing, adverse events
and their follow-ups, lab results; 25 a patient, so 1,000,000 events are 40,000 patients),
each filed under its stream (`services.safety.projection.stream_for`), 5,000 a transaction
through `EventStore`. Then:

- project: `Projection(trial_id).load(store)` on a fresh projection, what a safety process does
  at its first decision after a start; events/s, and the growth of this process's peak memory;
- where its time goes, the same steps one at a time, page after page as the load takes them:
  the read (`EventStore.scan`, pages of undecoded `RawEvent` rows of every type: the load keeps
  safety's itself), the parse (`RawEvent.payload()`, the pydantic models from the JSON text),
  the fold (`Draft.apply` of services/safety/state.py, then `freeze`), each step's time summed
  over the pages;
- peer: the same rows read by one plain SQL query (sqlite3 or asyncpg) and their data
  JSON-decoded: the floor of any rebuild.

Then the audit ledger from Kafka (`--kafka-events`, 0 to skip): the lives as CloudEvents on their
topics of a broker of its own (Tansu, or Apache Kafka with `--backend real`), filed into a fresh
ledger by the audit service's consumer as its process makes it (`ServiceSpec.consumer`: the
audit handlers, `record`, a fetch a transaction, D40; its linger, none after a full fetch, D92;
a JSON log line a record, as the service writes it, D60), from its first fetch to the last
record stored;
peer: a bare aiokafka consumer reading the same records, from its start to the last record;
floor (D91): the same records filed with only the work no rebuild of the ledger can skip (the
envelope and data validated, the entry, its canonical JSON and chained hash, the row inserted by
plain sqlite3 into the project's table), in one process; as one ledger over every core (D94:
forked parsers, one chain in this process, the inserts on a thread); and split between the
machine's cores (each part a ledger of its own: an upper bound for any rebuild of one ledger).
With `--consumer efficacy|dosing|safety`, that service's consumer reads the same records
instead (its topics, its handlers, into a fresh store of its own), to the last record it reads:
how fast a service digests a backlog (D78).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing
import os
import resource
import shutil
import sqlite3
import tempfile
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from sqlalchemy.dialects import sqlite as sqlite_dialect

from bench.databases import bench_database
from bench.safety_latency import until
from bench.scale import (
    LIFE,
    PER_PATIENT,
    PlainSql,
    Timing,
    clocked,
    cloud_events,
    fill,
    lives,
    per_patient,
    rss_mb,
)
from deploy import infra
from services.audit.commands import ledger_entry
from services.safety.projection import SAFETY_TYPES, Projection, stream_for
from services.safety.state import Draft, SafetyState
from shared.consumer import Delivery
from shared.db import SQLITE_PRAGMAS
from shared.decider import Identified
from shared.events import LEDGER_TOPICS, CloudEvent, canonical_json
from shared.heap import settle
from shared.kafka import client_options, ensure_topics, logical, make_producer, physical
from shared.logs import configure_logging
from shared.migrate import upgrade
from shared.protocol import load_protocol
from shared.runtime import ServiceSpec
from shared.settings import Settings
from shared.store import (
    _INSERT_SQLITE,
    GENESIS_HASH,
    EventStore,
    Metadata,
    NewEvent,
    _stamp,
    chained_hash,
)
from tooling.cli import EMBEDDED_SESSION_TIMEOUT_MS

TARGET_PER_S = 50_000.0
SAFETY_LIFE = per_patient(SAFETY_TYPES)
PEER_SQL = ("SELECT position, event_id, type, data FROM events WHERE type IN ("
            + ", ".join(f"'{t}'" for t in sorted(SAFETY_TYPES)) + ") ORDER BY position")
BY = Metadata(actor="inv-1", role="investigator", site="S1")


async def safety_events(patients: int) -> AsyncIterator[tuple[str, NewEvent]]:
    for payload, _ in lives(patients, SAFETY_TYPES):
        yield stream_for(payload), NewEvent.of(payload, BY)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000


async def plain(peer: PlainSql) -> int:
    rows = 0
    async for _, _, _, data in peer.stream(PEER_SQL):
        json.loads(data)
        rows += 1
    return rows


async def steps(store: EventStore, trial_id: str) -> tuple[dict[str, Timing], SafetyState]:
    """Projection.load's work, one step at a time on each page (each step's time summed)."""
    found = {step: Timing() for step in ("read", "parse", "fold")}

    def add(step: str, timing: Timing) -> None:
        found[step].wall += timing.wall
        found[step].cpu += timing.cpu

    draft = Draft(SafetyState(trial_id))
    pages = store.scan()
    while True:
        with clocked() as read:
            page = await anext(pages, None)
        add("read", read)
        if page is None:
            break
        with clocked() as parse:
            payloads = [Identified(e.event_id, e.payload()) for e in page
                        if e.type in SAFETY_TYPES]
        add("parse", parse)
        with clocked() as folded:
            draft.apply(payloads)
        add("fold", folded)
    with clocked() as frozen:
        state = draft.freeze()
    add("fold", frozen)
    return found, state


def show(way: str, events: int, timing: Timing, note: str = "") -> None:
    print(f"  {way:<25} {timing.wall:7.1f} s  {events / timing.wall:9,.0f} events/s "
          f"({events / timing.cpu:9,.0f} a CPU second){note}")


async def run(url: str, events: int, breakdown: bool) -> None:
    await upgrade(url)
    store = EventStore(url)
    peer = await PlainSql.connect(url)
    trial_id = Settings().trial_id
    try:
        patients = max(1, events // SAFETY_LIFE)
        with clocked() as built:
            total = await fill(store, safety_events(patients))
        print(f"filled: {total:,} safety events of {patients:,} patients in {built.wall:.0f} s")
        print(f"replay of safety's state from {total:,} events:")
        with clocked() as floor:
            assert await plain(peer) == total
        show("plain SQL + json", total, floor)
        before = rss_mb()
        with clocked() as timing:
            state = await Projection(trial_id).load(store)
        show("project (load)", total, timing,
             f"   peak memory +{max(peak_rss_mb() - before, 0):,.0f} MB")
        labs = patients * dict(LIFE)["LabResultReported"]
        assert len(state.patients) == patients and len(state.labs) == labs
        if breakdown:
            found, again = await steps(store, trial_id)
            assert again == state
            for step, step_timing in found.items():
                show(f"  of which {step}", total, step_timing)
        rate = total / timing.wall
        print(f"  target >= {TARGET_PER_S:,.0f} events/s: "
              f"{'met' if rate >= TARGET_PER_S else 'NOT met'} "
              f"(project / plain SQL = {floor.wall / timing.wall:.2g})")
    finally:
        await peer.close()
        await store.close()


@contextmanager
def own_broker(backend: str) -> Iterator[str]:
    """A broker of this run's own on a free port: Tansu, or Apache Kafka for `real`."""
    folder = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    port = infra.free_port()
    kafka = backend == "real"
    bootstrap = (infra.start_kafka(port, state_dir=folder) if kafka
                 else infra.start_tansu(port, state_dir=folder))
    try:
        yield bootstrap
    finally:
        (infra.stop_kafka if kafka else infra.stop_tansu)(port, state_dir=folder)
        shutil.rmtree(folder, ignore_errors=True)


async def publish(settings: Settings, patients: int) -> Counter[str]:
    """The lives on their topics, keyed by subject, as the relays publish them: how many on
    each topic."""
    await ensure_topics(settings, [physical(settings, t) for t in LEDGER_TOPICS])
    producer = make_producer(settings)
    await producer.start()
    sent, topics = [], Counter[str]()
    try:
        for topic, cloud in cloud_events(patients):
            topics[topic] += 1
            sent.append(await producer.send(physical(settings, topic), cloud.to_bytes(),
                                            key=cloud.subject.encode()))
            if len(sent) % 5000 == 0:
                await asyncio.gather(*sent[-5000:])
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return topics


def service_spec(service: str) -> ServiceSpec:
    spec: ServiceSpec = importlib.import_module(f"services.{service}.app").spec
    return spec


async def service_consumer(service: str, url: str, settings: Settings, topics: Counter[str]
                           ) -> Timing:
    """`service`'s consumer (its topics, handlers, fail-closed records and linger, as its
    process makes it: `ServiceSpec.consumer`) reading every record of its topics into a fresh
    store: the audit ledger's files each."""
    spec = service_spec(service)
    total = sum(topics[t] for t in spec.consumes)
    await upgrade(url)
    store = EventStore(url)
    runner = spec.consumer(store, settings, load_protocol(), group_id=f"{service}-replay")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    async def read() -> bool:
        return runner.records_seen >= total

    try:
        await runner.reading.wait()
        with clocked() as timing:
            await until(read, timeout=24 * 3600, interval=0.05)
    finally:
        stop.set()
        await task
        written = await store.head()
        await store.close()
    print(f"  {service}: {total:,} records read, {runner.handled:,} handled, "
          f"{runner.duplicates:,} duplicates, {runner.dead_lettered:,} dead-lettered; "
          f"{written:,} events written in {store.group_commits:,} commits")
    if service == "audit":
        assert runner.handled == total, (runner.handled, runner.dead_lettered)
    return timing


async def bare_consumer(settings: Settings, total: int) -> tuple[Timing, list[tuple[str, bytes]]]:
    """A bare aiokafka consumer reading every record: its time, and each record's topic (the
    logical name) and value, for the floor."""
    consumer = AIOKafkaConsumer(*(physical(settings, t) for t in LEDGER_TOPICS),
                                **client_options(settings),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    read: list[tuple[str, bytes]] = []
    with clocked() as timing:
        await consumer.start()
        try:
            while len(read) < total:
                batches = await consumer.getmany(timeout_ms=200)
                read += [(r.topic, r.value or b"") for records in batches.values()
                         for r in records]
        finally:
            await consumer.stop()
    return timing, [(logical(settings, topic), value) for topic, value in read]


# The floor of the ledger's rebuild: a transaction of this many records, about what one fetch
# gives the audit consumer.
FLOOR_BATCH = 1_000
SQLITE = sqlite_dialect.dialect()
_FLOOR_RECORDS: list[tuple[str, bytes]] = []  # what forked floor processes read their part of
# An entry as the ledger files it, before its place in the chain: its stream, event id, type,
# schema version, and its data and metadata in canonical JSON.
Encoded = tuple[str, str, str, int, str, str]


def encoded(records: list[tuple[str, bytes]]) -> list[Encoded]:
    """The work of the floor that is each record's own, whatever its place in the chain: the
    envelope and its data validated (`CloudEvent`, the catalogue's model: what the consumer
    sends to the dead-letter topic instead), the entry (`ledger_entry`), its data and metadata
    in canonical JSON. What parsers in processes of their own can do."""
    entries: list[Encoded] = []
    for topic, raw in records:
        event = CloudEvent.from_bytes(raw)
        stream, entry = ledger_entry(Delivery(event, event.typed_data(), topic))
        entries.append((stream, entry.event_id, entry.type, entry.schema_version,
                        canonical_json(entry.data), canonical_json(entry.metadata)))
    return entries


class Chain:
    """The ledger's one chain, in the order entries come: each entry's position, its stream's
    next version, its hash chained on the last (`shared.store.chained_hash`), and the row as
    the project's `events` table takes it (`shared.store._COLUMNS`' order), one time a batch."""

    def __init__(self) -> None:
        self.position, self.prev_hash, self.versions = 0, GENESIS_HASH, Counter[str]()

    def rows(self, entries: list[Encoded]) -> list[tuple[Any, ...]]:
        recorded_at, stored = _stamp(SQLITE, datetime.now(UTC))  # as the store writes SQLite's
        rows = []
        for stream, event_id, type_, schema_version, data, metadata in entries:
            self.position += 1
            self.versions[stream] += 1
            row = {"position": self.position, "stream_id": stream, "event_id": event_id,
                   "stream_version": self.versions[stream], "type": type_,
                   "schema_version": schema_version}
            digest = chained_hash(self.prev_hash, row, data, metadata, recorded_at)
            rows.append((self.position, stream, self.versions[stream], event_id, type_,
                         schema_version, data, metadata, stored, self.prev_hash, digest))
            self.prev_hash = digest
        return rows


def _open_floor(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        db.execute(pragma)
    return db


def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany(_INSERT_SQLITE, rows)
    db.execute("COMMIT")


def _batches(records: list[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    return (records[start:start + FLOOR_BATCH] for start in range(0, len(records), FLOOR_BATCH))


def ledger_floor_file(records: list[tuple[str, bytes]], path: str) -> int:
    """The work no rebuild of the ledger can skip, on each record, and nothing else: `encoded`,
    the chain (`Chain`), and the rows inserted into the project's `events` table (its indexes
    and triggers) by plain sqlite3 with the store's pragmas, `FLOOR_BATCH` a transaction. No
    event loop, SQLAlchemy, duplicate check, checkpoint or log line. How many rows it wrote."""
    db, chain = _open_floor(path), Chain()
    try:
        for batch in _batches(records):
            _insert(db, chain.rows(encoded(batch)))
    finally:
        db.close()
    return chain.position


def ledger_pipeline_file(records: list[tuple[str, bytes]], path: str, parsers: int) -> int:
    """The same work, laid out to use every core for one ledger (D94): `parsers` forked
    processes run `encoded` on the batches, handed back in order; this process chains them; a
    thread of its own inserts them (sqlite3 lets go of the GIL while it writes), two batches
    at most waiting. The best a rebuild of one ledger could do with these parts, before the
    Kafka read. How many rows it wrote."""
    chain, waiting = Chain(), deque[Future[None]]()
    with ThreadPoolExecutor(1) as writer, \
            multiprocessing.get_context("fork").Pool(parsers) as pool:
        db = writer.submit(_open_floor, path).result()  # made and used on the writer's thread
        try:
            for entries in pool.imap(encoded, _batches(records)):
                waiting.append(writer.submit(_insert, db, chain.rows(entries)))
                if len(waiting) > 2:
                    waiting.popleft().result()
            while waiting:
                waiting.popleft().result()
        finally:
            writer.submit(db.close).result()
    return chain.position


def _floor_part(part: int, parts: int, path: str) -> None:
    size = -(-len(_FLOOR_RECORDS) // parts)
    ledger_floor_file(_FLOOR_RECORDS[part * size:(part + 1) * size], path)


@contextmanager
def with_children() -> Iterator[Timing]:
    """`clocked`, the CPU of the children the block waited for counted in."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with clocked() as timing:
        yield timing
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing.cpu += (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _fresh(path: Path) -> str:
    asyncio.run(upgrade(f"sqlite+aiosqlite:///{path}"))  # the project's tables, empty
    return str(path)


def ledger_floor(records: list[tuple[str, bytes]], processes: int, folder: Path) -> Timing:
    """`ledger_floor_file` over `records`: in this process, or split between `processes`
    forked ones, each into a ledger of its own (no one chain, no order between them: more
    than any rebuild of one ledger could get from them, so an upper bound)."""
    paths = [_fresh(folder / f"floor-{processes}-{part}.db") for part in range(processes)]
    if processes == 1:
        with clocked() as timing:
            written = ledger_floor_file(records, paths[0])
        assert written == len(records), (written, len(records))
        return timing
    global _FLOOR_RECORDS
    _FLOOR_RECORDS = records
    fork = multiprocessing.get_context("fork")
    try:
        with with_children() as timing:
            workers = [fork.Process(target=_floor_part, args=(part, processes, path))
                       for part, path in enumerate(paths)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
    finally:
        _FLOOR_RECORDS = []
    assert all(worker.exitcode == 0 for worker in workers), [w.exitcode for w in workers]
    return timing


def ledger_pipeline(records: list[tuple[str, bytes]], parsers: int, folder: Path) -> Timing:
    """`ledger_pipeline_file` over `records`, into a fresh ledger."""
    path = _fresh(folder / f"pipeline-{parsers}.db")
    with with_children() as timing:
        written = ledger_pipeline_file(records, path, parsers)
    assert written == len(records), (written, len(records))
    return timing


def ledger_from_kafka(backend: str, events: int, service: str = "audit") -> None:
    patients = max(1, events // PER_PATIENT)
    with own_broker(backend) as bootstrap, bench_database(backend, "replay_ledger") as url:
        settings = Settings(service_name=service, kafka_bootstrap_servers=bootstrap,
                            database_url=url, kafka_session_timeout_ms=(
                                EMBEDDED_SESSION_TIMEOUT_MS if backend != "real" else 10_000))
        topics = asyncio.run(publish(settings, patients))
        total = sum(topics.values())
        read = sum(topics[t] for t in service_spec(service).consumes)  # its app made first
        # Each record's line written as the service writes it (JSON, production's), to nowhere.
        nowhere = open(os.devnull, "w")  # for the process's life
        configure_logging(settings.model_copy(update={"log_format": "json"}), stream=nowhere)
        settle(settings)  # the collector as the service sets it once up (D65)
        what = "the audit ledger" if service == "audit" else f"{service}'s consumer"
        print(f"replay of {what} from Kafka ({total:,} CloudEvents published):")
        bare, records = asyncio.run(bare_consumer(settings, total))
        show("bare aiokafka consumer", total, bare)
        timing = asyncio.run(service_consumer(service, url, settings, topics))
        show("project (consumer)", read, timing)
        if service == "audit":  # what the ledger's own work costs here, without the project
            print("  the ledger's own work, nothing else (a SQLite file whichever the backend):")
            floors = {}
            cores = os.cpu_count() or 1
            parsers = max(1, cores - 1)
            with tempfile.TemporaryDirectory(prefix="bench-floor-") as folder:
                floors[1] = ledger_floor(records, 1, Path(folder))
                show("floor, 1 process", total, floors[1])
                show(f"floor, {parsers} parser{'s' if parsers > 1 else ''} + 1 chain", total,
                     ledger_pipeline(records, parsers, Path(folder)), " (one ledger, D94)")
                if cores > 1:
                    show(f"floor, {cores} processes", total,
                         ledger_floor(records, cores, Path(folder)), " (an upper bound)")
        rate = read / timing.wall
        ratios = f"project / bare consumer = {rate / (total / bare.wall):.2g}"
        if service == "audit":
            ratios += f", project / floor in one process = {floors[1].wall / timing.wall:.2g}"
        print(f"  target >= {TARGET_PER_S:,.0f} events/s: "
              f"{'met' if rate >= TARGET_PER_S else 'NOT met'} ({ratios})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--events", type=int, default=1_000_000, help="safety's state")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip timing load's steps one by one (a second replay)")
    parser.add_argument("--kafka-events", type=int, default=10_000,
                        help="the audit ledger from Kafka (0: not measured)")
    parser.add_argument("--consumer", choices=["audit", "efficacy", "dosing", "safety"],
                        default="audit", help="whose consumer reads them from Kafka")
    args = parser.parse_args()
    print(f"backend={args.backend} events={args.events:,}")
    if args.events:
        with bench_database(args.backend, "replay") as url:
            asyncio.run(run(url, args.events, not args.no_breakdown))
    if args.kafka_events:
        ledger_from_kafka(args.backend, args.kafka_events, args.consumer)


if __name__ == "__main__":
    main()
