"""The accounting after a run under faults: what the sites were told against what the system holds.

Each check reads the system itself (the services' event stores, directly, with
`shared.store.EventStore`; every trial topic from the beginning, with a fresh group-less Kafka
consumer) and returns numbers, never only a verdict, so a test can assert them and print them:

- `lost_writes`: every acknowledged write has its event in the owning service's store (a
  screening its PatientScreened, an enrolment its PatientEnrolled, a randomization its
  ArmAssigned with the number the site was told, a dose its InfusionGiven or
  MethotrexateDoseGiven for (patient, week 0), an adverse event its AdverseEventReported, an
  assessment its AssessmentRecorded). A write the API acknowledged and the store lacks is lost.
- `duplicated_effects`: nothing took effect twice: one screening per screening number, one
  enrolment per screening, one assignment per patient, one dose per (patient, week), one adverse
  event per id and per report (patient, term, onset), one assessment per (patient, week); and no
  consumed event caused two effect transactions in a store (events whose `causation_id` names an
  event of another store, grouped by that cause: committed at more than one instant means a
  redelivered record was applied again).
- `kafka_check`: every event of every publishing store is on Kafka, and how many event ids are
  on Kafka more than once (the relay's republication; consumers drop those by id, so they are
  counted apart from duplicated effects).
- `ledger_check`: the audit ledger holds every Kafka record's event id exactly once, nothing
  that never was on Kafka (but its own records of reads, D50), and its hash chain verifies.
- `processed_check`: each consumer's processed marks are exactly the ids, on the topics it
  consumes, of the event types it has a handler for: nothing skipped, nothing marked that it
  never read.
- `randomization_numbers`: the numbers assigned are 1..n, each once.

`wait_quiet` waits (a condition, polled, with a deadline) until the system has nothing left to do:
every relay has published its store to its head, and every consumer and the ledger have taken
in every record on the topics they read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer

from services.audit.domain import AUDIT_SOURCE
from shared.consumer import ANY_TYPE, marks_by_event_id
from shared.events import LEDGER_TOPICS, dlq_topic
from shared.kafka import broker_view, client_options, known_partitions
from shared.protocol import ProtocolConfig
from shared.runtime import ServiceSpec
from shared.schema import processed_events
from shared.settings import Settings
from shared.store import EventFilter, EventStore, RecordedEvent
from tests.faults.driver import Ack

PUBLISHERS = ("randomization", "dosing", "safety", "efficacy")  # services with a relay
RELAY = "kafka"  # the relay's name: its checkpoint is `kafka@<cluster id>` (D45)


def consumer_specs() -> dict[str, ServiceSpec]:
    """Each consuming service's spec, as its process runs it (services/*/app.py)."""
    from services.audit.app import spec as audit
    from services.dosing.app import spec as dosing
    from services.efficacy.app import spec as efficacy
    from services.randomization.app import spec as randomization
    from services.safety.app import spec as safety
    return {s.name: s for s in (randomization, dosing, safety, efficacy, audit)}


@asynccontextmanager
async def open_stores(urls: Mapping[str, str]) -> AsyncIterator[dict[str, EventStore]]:
    """Every service's store, opened for reading, closed after."""
    stores = {name: EventStore(url) for name, url in urls.items()}
    try:
        yield stores
    finally:
        for store in stores.values():
            await store.close()


async def events_of(store: EventStore, *types: str) -> list[RecordedEvent]:
    """Every event of these types (all, if none named), in position order."""
    where = EventFilter(types=types) if types else EventFilter()
    return await store.read_all(limit=None, where=where)


# --- lost -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lost:
    """An acknowledged write whose event the owning store does not hold (or holds otherwise
    than the site was told)."""

    step: str
    key: str
    path: str
    body: dict[str, Any]
    why: str
    acked_at: float


async def lost_writes(stores: Mapping[str, EventStore], acks: Sequence[Ack]) -> list[Lost]:
    """Every acknowledged write checked against the owning store; the ones missing."""
    rnd, dosing = stores["randomization"], stores["dosing"]
    screened = {e.data["screening_id"]: e for e in await events_of(rnd, "PatientScreened")}
    enrolled = {e.data["patient_id"]: e for e in await events_of(rnd, "PatientEnrolled")}
    assigned = {e.data["patient_id"]: e for e in await events_of(rnd, "ArmAssigned")}
    doses: dict[tuple[str, int], list[RecordedEvent]] = defaultdict(list)
    for e in await events_of(dosing, "InfusionGiven", "MethotrexateDoseGiven"):
        doses[e.data["patient_id"], e.data["week"]].append(e)
    reported = {e.data["adverse_event_id"]: e
                for e in await events_of(stores["safety"], "AdverseEventReported")}
    assessed = {e.data["assessment_id"]: e
                for e in await events_of(stores["efficacy"], "AssessmentRecorded")}
    lost: list[Lost] = []
    for ack in acks:
        b = ack.body
        why: str | None = None
        match ack.step:
            case "screen":
                why = (None if b["screening_id"] in screened
                       else "no PatientScreened with this screening_id")
            case "enrol":
                why = None if b["patient_id"] in enrolled else "no PatientEnrolled for this patient"
            case "randomize":
                arm = assigned.get(b["patient_id"])
                if arm is None:
                    why = "no ArmAssigned for this patient"
                elif (arm.data["randomization_number"], arm.data["arm"]) != (
                        b["randomization_number"], b["arm"]):
                    why = (f"ArmAssigned says {arm.data['arm']} "
                           f"#{arm.data['randomization_number']}, the site was told {b['arm']} "
                           f"#{b['randomization_number']}")
            case "dose":
                dose_id = b.get("infusion_id") or b.get("dose_id")
                found = doses.get((b["patient_id"], b["week"]), [])
                if not any(d.data.get("infusion_id", d.data.get("dose_id")) == dose_id
                           for d in found):
                    why = f"no dose {dose_id} for (patient, week {b['week']})"
            case "adverse_event":
                why = (None if b["adverse_event_id"] in reported
                       else "no AdverseEventReported with this id")
            case "assessment":
                why = (None if b["assessment_id"] in assessed
                       else "no AssessmentRecorded with this id")
        if why is not None:
            lost.append(Lost(ack.step, ack.key, ack.path, ack.body, why, ack.acked_at))
    return lost


# --- duplicated effects ---------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicate:
    """One thing that took effect more than once: what, in which store, the event ids, and
    when the later effect was recorded."""

    store: str
    what: str
    event_ids: tuple[str, ...]
    last_recorded_at: datetime


def _repeated(store: str, what: str, events: Iterable[RecordedEvent],
              key: Any) -> list[Duplicate]:
    groups: dict[Any, list[RecordedEvent]] = defaultdict(list)
    for e in events:
        groups[key(e)].append(e)
    return [Duplicate(store, f"{what} {k}", tuple(e.event_id for e in group),
                      max(e.recorded_at for e in group))
            for k, group in groups.items() if len(group) > 1]


async def duplicated_effects(stores: Mapping[str, EventStore]) -> list[Duplicate]:
    """Every effect recorded twice, in the services' stores (the ledger is `ledger_check`'s)."""
    rnd, dosing, safety, efficacy = (stores[s] for s in PUBLISHERS)
    found: list[Duplicate] = []
    found += _repeated("randomization", "screening number",
                       await events_of(rnd, "PatientScreened"),
                       lambda e: e.data["screening_number"])
    enrolments = await events_of(rnd, "PatientEnrolled")
    found += _repeated("randomization", "enrolment of screening", enrolments,
                       lambda e: e.data["screening_id"])
    found += _repeated("randomization", "enrolment of patient", enrolments,
                       lambda e: e.data["patient_id"])
    found += _repeated("randomization", "assignment of patient",
                       await events_of(rnd, "ArmAssigned"), lambda e: e.data["patient_id"])
    found += _repeated("dosing", "dose of (patient, week)",
                       await events_of(dosing, "InfusionGiven", "MethotrexateDoseGiven"),
                       lambda e: (e.data["patient_id"], e.data["week"]))
    reports = await events_of(safety, "AdverseEventReported")
    found += _repeated("safety", "adverse event id", reports,
                       lambda e: e.data["adverse_event_id"])
    found += _repeated("safety", "adverse event report (patient, term, onset)", reports,
                       lambda e: (e.data["patient_id"], e.data["term"], e.data["onset_at"]))
    assessments = await events_of(efficacy, "AssessmentRecorded")
    found += _repeated("efficacy", "assessment id", assessments,
                       lambda e: e.data["assessment_id"])
    found += _repeated("efficacy", "assessment of (patient, week)",
                       [e for e in assessments if e.data["week"] is not None],
                       lambda e: (e.data["patient_id"], e.data["week"]))
    for name in PUBLISHERS:
        found += await effects_of_consumed_events(name, stores[name])
    return found


async def effects_of_consumed_events(name: str, store: EventStore) -> list[Duplicate]:
    """A consumed event applied twice: the events a store wrote in answer to another store's
    event carry its id as `causation_id` (`Delivery.caused_by`, safety's facts); those of one
    handling commit together, at one instant. Two instants for one cause are two effect
    transactions: a redelivered record applied again."""
    events = await events_of(store)
    own = {e.event_id for e in events}
    by_cause: dict[str, list[RecordedEvent]] = defaultdict(list)
    for e in events:
        cause = e.metadata.get("causation_id")
        if cause and cause not in own:
            by_cause[cause].append(e)
    return [Duplicate(name, f"effects of consumed event {cause} "
                            f"({', '.join(sorted({e.type for e in group}))})",
                      tuple(e.event_id for e in group), max(e.recorded_at for e in group))
            for cause, group in by_cause.items() if len({e.recorded_at for e in group}) > 1]


# --- Kafka ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    event_id: str | None
    type: str | None
    source: str | None


def kafka_settings(bootstrap: str) -> Settings:
    return Settings(service_name="faults-accounting", kafka_bootstrap_servers=bootstrap)


@dataclass
class KafkaLog:
    """Every record read, and per partition how many lay past the end offset the broker
    reported (Tansu 0.6.0 reports the base offset of a partition's last batch + 1, so the
    records after a batch's first are past its "end": reading only to it would miss them)."""

    records: list[KafkaRecord] = field(default_factory=list)
    beyond_end: dict[str, int] = field(default_factory=dict)


async def read_topics(bootstrap: str, topics: Sequence[str], timeout: float = 60.0) -> KafkaLog:
    """Every record of `topics`, from the beginning to their ends, by a fresh consumer of no
    group (so it changes no one's offsets): to the end offsets the broker reports, then on until
    a fetch of every partition finds nothing more (the system is quiet when this is called)."""
    consumer = AIOKafkaConsumer(**client_options(kafka_settings(bootstrap)),
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                metadata_max_age_ms=1000, fetch_max_wait_ms=100)
    await consumer.start()
    log = KafkaLog()
    try:
        partitions = [tp for topic in topics for tp in await known_partitions(consumer, topic)]
        if not partitions:
            return log
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        pending = {tp for tp in partitions if ends[tp] > 0}
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {len(pending)} partitions to their end")
            batch = await consumer.getmany(*partitions, timeout_ms=500 if not pending else 200)
            for tp, records in batch.items():
                for r in records:
                    log.records.append(_record(r.topic, r.partition, r.offset, r.value))
                    if r.offset >= ends[tp]:
                        where = f"{tp.topic}/{tp.partition}"
                        log.beyond_end[where] = log.beyond_end.get(where, 0) + 1
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
            if not pending and not batch:  # at the reported ends, and nothing after them
                return log
    finally:
        await consumer.stop()


def _record(topic: str, partition: int, offset: int, value: bytes | None) -> KafkaRecord:
    try:
        envelope = json.loads(value or b"")
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        return KafkaRecord(topic, partition, offset, None, None, None)
    return KafkaRecord(topic, partition, offset, envelope.get("id"), envelope.get("type"),
                       envelope.get("source"))


async def cluster_id(bootstrap: str) -> str | None:
    """The broker cluster's id, as the relays see it (their checkpoint's name, D45)."""
    consumer = AIOKafkaConsumer(**client_options(kafka_settings(bootstrap)))
    await consumer.start()
    try:
        cluster, _ = await broker_view(consumer._client, [])
        return cluster
    finally:
        await consumer.stop()


@dataclass
class KafkaCheck:
    """Store events against the records on Kafka."""

    records: int = 0
    store_events: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # service: its events not on Kafka
    duplicates: dict[str, int] = field(default_factory=dict)  # event id: times on Kafka (> 1)
    duplicates_by_service: Counter[str] = field(default_factory=Counter)  # such ids, by source
    # where the first few such ids are: "type id: topic/partition@offset, ..."
    duplicate_places: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # ids on Kafka that no store holds
    unreadable: int = 0  # records that are not CloudEvents

    @property
    def missing_count(self) -> int:
        return sum(len(ids) for ids in self.missing.values())

    @property
    def duplicate_ids(self) -> int:
        return len(self.duplicates)


async def kafka_check(stores: Mapping[str, EventStore], log: Sequence[KafkaRecord]) -> KafkaCheck:
    """Every event of every publishing store on Kafka; ids published more than once."""
    counts = Counter(r.event_id for r in log if r.event_id is not None)
    check = KafkaCheck(records=len(log), unreadable=sum(r.event_id is None for r in log))
    held: set[str] = set()
    for name in PUBLISHERS:
        events = await events_of(stores[name])
        held.update(e.event_id for e in events)
        check.store_events += len(events)
        missing = [f"{e.event_id} ({e.type} at {e.position})" for e in events
                   if e.event_id not in counts]
        if missing:
            check.missing[name] = missing
    check.duplicates = {i: n for i, n in counts.items() if n > 1}
    sources = {r.event_id: r.source for r in log if r.event_id in check.duplicates}
    for event_id in check.duplicates:
        check.duplicates_by_service[(sources.get(event_id) or "?").rsplit("/", 1)[-1]] += 1
    for event_id in list(check.duplicates)[:10]:
        places = [r for r in log if r.event_id == event_id]
        check.duplicate_places.append(f"{places[0].type} {event_id}: " + ", ".join(
            f"{r.topic}/{r.partition}@{r.offset}" for r in places))
    if "audit" in stores:  # the reads made through the audit service, which it publishes (D93)
        held.update((await ledger_ids(stores["audit"]))[1])
    check.unknown = [i for i in counts if i not in held]
    return check


# --- the audit ledger -----------------------------------------------------------------------


@dataclass
class LedgerCheck:
    entries: int = 0
    missing: list[str] = field(default_factory=list)  # on Kafka, not in the ledger
    repeated: dict[str, int] = field(default_factory=dict)  # in the ledger more than once
    not_on_kafka: list[str] = field(default_factory=list)  # in the ledger, never on Kafka
    chain_ok: bool = False
    events_checked: int = 0
    first_broken_position: int | None = None


async def ledger_ids(ledger: EventStore) -> tuple[Counter[str], set[str]]:
    """Each event id in the ledger with its count, and the ids of the ledger's own entries,
    which no other store holds: the protocol version it applies (appended at its start, with no
    topic, never on Kafka) and its own records of reads of the ledger (D50, source
    /services/audit), which it publishes to trial.access itself (D93)."""
    counts: Counter[str] = Counter()
    own: set[str] = set()
    async for rows in ledger.scan():
        for row in rows:
            counts[row.event_id] += 1
            meta = json.loads(row.metadata)
            if "topic" not in meta or meta.get("source") == AUDIT_SOURCE:
                own.add(row.event_id)
    return counts, own


async def ledger_check(ledger: EventStore, log: Sequence[KafkaRecord]) -> LedgerCheck:
    """The ledger against the records of the ledger's topics on Kafka; its chain verified."""
    on_kafka = {r.event_id for r in log if r.topic in LEDGER_TOPICS and r.event_id}
    counts, own = await ledger_ids(ledger)
    verified = await ledger.verify()
    return LedgerCheck(
        entries=sum(counts.values()), missing=sorted(on_kafka - set(counts)),
        repeated={i: n for i, n in counts.items() if n > 1},
        not_on_kafka=sorted(set(counts) - on_kafka - own), chain_ok=verified.ok,
        events_checked=verified.events_checked,
        first_broken_position=verified.first_broken_position)


# --- processed marks ------------------------------------------------------------------------


@dataclass
class ProcessedCheck:
    expected: int = 0
    marked: int = 0
    missing: list[str] = field(default_factory=list)  # on its topics, with a handler, not marked
    extra: list[str] = field(default_factory=list)  # marked, but not on its topics


async def processed_marks(store: EventStore, consumer: str, by_event_id: bool = False
                          ) -> set[str]:
    """The ids `consumer` marked processed; of a consumer whose handler files each record under
    its event id (the ledger, D89), the ids it filed from Kafka (not its own entries)."""
    if by_event_id:
        counts, own = await ledger_ids(store)
        return set(counts) - own
    q = sa.select(processed_events.c.event_id).where(processed_events.c.consumer == consumer)
    async with store.read_engine.connect() as conn:
        return {str(r[0]) for r in await conn.execute(q)}


async def processed_check(stores: Mapping[str, EventStore], log: Sequence[KafkaRecord],
                          protocol: ProtocolConfig) -> dict[str, ProcessedCheck]:
    """Each consumer's marks against what it should have handled: the ids on the topics it
    consumes whose type it has a handler for (a record no handler wants is passed over
    unmarked, `ConsumerRunner._parse`)."""
    found: dict[str, ProcessedCheck] = {}
    for name, spec in consumer_specs().items():
        types = set(spec.handlers(protocol))
        expected = {r.event_id for r in log if r.topic in spec.consumes and r.event_id
                    and (ANY_TYPE in types or r.type in types)}
        marked = await processed_marks(stores[name], name, by_event_id=any(
            marks_by_event_id(h) for h in spec.handlers(protocol).values()))
        found[name] = ProcessedCheck(len(expected), len(marked), sorted(expected - marked),
                                     sorted(marked - expected))
    return found


# --- randomization numbers ------------------------------------------------------------------


@dataclass
class NumbersCheck:
    assigned: int = 0
    highest: int = 0
    gaps: list[int] = field(default_factory=list)
    repeated: list[int] = field(default_factory=list)

    @property
    def gapless(self) -> bool:
        return not self.gaps and not self.repeated


async def randomization_numbers(store: EventStore) -> NumbersCheck:
    """The randomization numbers of every assignment: 1..n, each once."""
    numbers = [int(e.data["randomization_number"]) for e in await events_of(store, "ArmAssigned")]
    counts = Counter(numbers)
    highest = max(numbers, default=0)
    return NumbersCheck(len(numbers), highest,
                        sorted(set(range(1, highest + 1)) - set(numbers)),
                        sorted(n for n, c in counts.items() if c > 1))


# --- quiet ----------------------------------------------------------------------------------


@dataclass
class Quiet:
    """Whether the system went quiet in time, how long it took, and what was still pending."""

    quiet: bool
    seconds: float
    pending: list[str]


async def relay_lag(stores: Mapping[str, EventStore], cluster: str | None) -> dict[str, int]:
    """Per publishing store, how far its relay's checkpoint is behind its head."""
    name = f"{RELAY}@{cluster}" if cluster else RELAY
    return {s: await stores[s].head() - await stores[s].checkpoint(name) for s in PUBLISHERS}


async def _pending(stores: Mapping[str, EventStore], bootstrap: str, cluster: str | None,
                   protocol: ProtocolConfig) -> list[str]:
    pending = [f"{s}'s relay {lag} behind its head"
               for s, lag in (await relay_lag(stores, cluster)).items() if lag]
    if pending:
        return pending
    heads = {s: await stores[s].head() for s in PUBLISHERS}
    log = (await read_topics(bootstrap, LEDGER_TOPICS)).records
    missing = (await ledger_check(stores["audit"], log)).missing
    if missing:
        pending.append(f"the ledger lacks {len(missing)} records")
    for name, check in (await processed_check(stores, log, protocol)).items():
        if check.missing:
            pending.append(f"{name} has not handled {len(check.missing)} records")
    moved = [s for s in PUBLISHERS if await stores[s].head() != heads[s]]
    pending += [f"{s} wrote while we looked" for s in moved]
    return pending


async def wait_quiet(stores: Mapping[str, EventStore], bootstrap: str, protocol: ProtocolConfig,
                     timeout: float = 120.0) -> Quiet:
    """Poll until every relay has published its store to its head, and the ledger and every
    consumer have taken in every record on their topics (and no store wrote meanwhile), or
    `timeout` passes. A cascade (an assignment, then dosing's calendar, then efficacy's facts)
    settles when a whole round finds nothing left."""
    started = time.monotonic()
    cluster = await cluster_id(bootstrap)
    while True:
        pending = await _pending(stores, bootstrap, cluster, protocol)
        elapsed = time.monotonic() - started
        if not pending or elapsed > timeout:
            return Quiet(not pending, elapsed, pending)
        await asyncio.sleep(0.25)  # the poll's interval; the condition is `_pending`


# --- everything -----------------------------------------------------------------------------


@dataclass
class Accounting:
    """Every check's numbers after one run."""

    lost: list[Lost]
    duplicated: list[Duplicate]
    kafka: KafkaCheck
    ledger: LedgerCheck
    processed: dict[str, ProcessedCheck]
    numbers: NumbersCheck
    dead_lettered: dict[str, int]  # records on each <topic>.dlq
    chains: dict[str, bool]  # each service's own hash chain verifies
    beyond_end: dict[str, int]  # records past the end offset the broker reported (KafkaLog)

    def summary(self) -> dict[str, Any]:
        """The figures, for a report line or an assertion message."""
        return {
            "lost": len(self.lost), "duplicated_effects": len(self.duplicated),
            "kafka_records": self.kafka.records, "store_events": self.kafka.store_events,
            "kafka_missing": self.kafka.missing_count,
            "kafka_duplicate_ids": self.kafka.duplicate_ids,
            "kafka_duplicates_by_service": dict(self.kafka.duplicates_by_service),
            "kafka_duplicate_places": self.kafka.duplicate_places,
            "kafka_unknown_ids": len(self.kafka.unknown),
            "ledger_entries": self.ledger.entries, "ledger_missing": len(self.ledger.missing),
            "ledger_repeated": len(self.ledger.repeated),
            "ledger_not_on_kafka": len(self.ledger.not_on_kafka),
            "ledger_chain_ok": self.ledger.chain_ok,
            "processed": {n: {"expected": c.expected, "marked": c.marked,
                              "missing": len(c.missing), "extra": len(c.extra)}
                          for n, c in self.processed.items()},
            "randomization_numbers": {"assigned": self.numbers.assigned,
                                      "highest": self.numbers.highest,
                                      "gaps": self.numbers.gaps[:20],
                                      "repeated": self.numbers.repeated[:20]},
            "dead_lettered": self.dead_lettered, "chains_ok": self.chains,
            "records_past_reported_end": self.beyond_end,
        }


async def account(stores: Mapping[str, EventStore], bootstrap: str, acks: Sequence[Ack],
                  protocol: ProtocolConfig) -> Accounting:
    """Run every check once (after `wait_quiet`)."""
    read = await read_topics(bootstrap, LEDGER_TOPICS)
    log = read.records
    dlq = (await read_topics(bootstrap, [dlq_topic(t) for t in LEDGER_TOPICS])).records
    return Accounting(
        lost=await lost_writes(stores, acks),
        duplicated=await duplicated_effects(stores),
        kafka=await kafka_check(stores, log),
        ledger=await ledger_check(stores["audit"], log),
        processed=await processed_check(stores, log, protocol),
        numbers=await randomization_numbers(stores["randomization"]),
        dead_lettered=dict(Counter(r.topic for r in dlq)),
        chains={name: (await stores[name].verify()).ok for name in PUBLISHERS},
        beyond_end=read.beyond_end,
    )
