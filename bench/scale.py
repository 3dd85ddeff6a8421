"""What the scale benches share (`bench.audit_scale`, `bench.replay`): many patients' years in the
trial as the events each service publishes, a store filled with them fast, the peer's plain SQL
on the same table, and the process's memory.

Every event is one of the catalogue's samples (`tests/unit/test_events.py`, one valid instance of
each type) with ids of its own: the patient's, its screening's, each adverse event's (which its
follow-up names), lab result's, assessment's... `LIFE` is one patient's year (screening to study
completion, 70 events: the README's "some 60 events each over a year" and a few more).

Patients are enrolled in cohorts of `COHORT` whose events interleave (event 1 of each, then event
2 of each...), so a patient's events lie spread over the store as they would after a year of
arrivals, not side by side.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa

from shared.db import is_sqlite
from shared.events import ACCESS, DOSING, EFFICACY, ENROLLMENT, SAFETY, CloudEvent, EventData
from shared.store import EventStore, NewEvent
from tests.unit.test_events import SAMPLES

LIFE: tuple[tuple[str, int], ...] = (
    ("PatientScreened", 1), ("PatientEnrolled", 1), ("ArmAssigned", 1),
    ("DosingScheduleCreated", 1), ("PatientSafetyFactRecorded", 1), ("InfusionGiven", 6),
    ("PatientSafetyFactRecorded", 6), ("LabResultReported", 12), ("AdverseEventReported", 3),
    ("AdverseEventFollowedUp", 3), ("VisitMissed", 2), ("AssessmentRecorded", 12),
    ("AssessmentVisitNoted", 12), ("FollowUpFactRecorded", 4), ("AccessDenied", 4),
    ("StudyCompleted", 1))
PER_PATIENT = sum(n for _, n in LIFE)
COHORT = 1000
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# Each of these fields names something of its own: a fresh value per event (an adverse event's
# follow-up k names adverse event k, as the life has as many of each).
OWN_IDS = ("infusion_id", "adverse_event_id", "follow_up_id", "lab_result_id", "assessment_id",
           "access_id")
SOURCES = {ENROLLMENT: "randomization", DOSING: "dosing", SAFETY: "safety",
           EFFICACY: "efficacy", ACCESS: "audit"}  # a record read: the service that served it


def patient_id(n: int) -> str:
    return f"PT-{n:08d}"


def screening_id(n: int) -> str:
    return f"scr-{patient_id(n)}"


def _steps(types: frozenset[str] | None) -> list[tuple[str, int]]:
    """The life as (type, k: the k-th of its type), kept to `types` when given."""
    seen: dict[str, int] = {}
    steps = []
    for name, count in LIFE:
        for _ in range(count):
            k = seen[name] = seen.get(name, -1) + 1
            if types is None or name in types:
                steps.append((name, k))
    return steps


def _event(name: str, k: int, n: int) -> EventData:
    sample = SAMPLES[name][0]
    fields = type(sample).model_fields
    pid = patient_id(n)
    update: dict[str, Any] = {f: f"{f[:-3]}-{pid}-{k}" for f in OWN_IDS if f in fields}
    update.update({f: v for f, v in (("patient_id", pid), ("screening_id", screening_id(n)))
                   if f in fields})
    if name == "PatientSafetyFactRecorded" and k == 0:
        update["fact"] = "assigned"
    return sample.model_copy(update=update)


def lives(patients: int, types: frozenset[str] | None = None
          ) -> Iterator[tuple[EventData, datetime]]:
    """Each event of `patients` patients' lives (only `types`, when given) with its time."""
    steps = _steps(types)
    for first in range(0, patients, COHORT):
        cohort = range(first, min(first + COHORT, patients))
        for i, (name, k) in enumerate(steps):
            for n in cohort:
                yield _event(name, k, n), START + timedelta(days=i * 5, seconds=n)


def per_patient(types: frozenset[str] | None = None) -> int:
    return len(_steps(types))


def cloud_events(patients: int) -> Iterator[tuple[str, CloudEvent]]:
    """The lives as the services' relays publish them: (topic, CloudEvent)."""
    for sequence, (payload, at) in enumerate(lives(patients), start=1):
        service = SOURCES[payload.topic]
        yield payload.topic, CloudEvent(
            id=str(uuid.uuid4()), source=f"/services/{service}", type=payload.event_type(),
            subject=payload.subject(), time=at, data=payload.model_dump(mode="json"),
            sequence=sequence, correlationid=str(uuid.uuid4()), actor="inv-1",
            actorrole="site_coordinator" if service != "safety" else "investigator",
            actorsite="S1")


async def fill(store: EventStore, appends: AsyncIterable[tuple[str, NewEvent]],
               per_transaction: int = 5000) -> int:
    """Append (stream, event) pairs through the store, `per_transaction` events a transaction
    (positions, versions and the hash chain as any append makes them); returns how many."""
    batch: list[tuple[str, NewEvent]] = []
    count = 0

    async def commit() -> None:
        async with store.transaction() as tx:
            for stream, new in batch:
                await tx.append(stream, [new], None)
        batch.clear()

    async for pair in appends:
        batch.append(pair)
        count += 1
        if len(batch) >= per_transaction:
            await commit()
    if batch:
        await commit()
    return count


class PlainSql:
    """The peer: the same table read by plain SQL, through sqlite3 or asyncpg directly (no
    SQLAlchemy, no row objects). Statements are written with `$1` parameters (asyncpg's)."""

    def __init__(self, sqlite: sqlite3.Connection | None, pg: asyncpg.Connection | None) -> None:
        self._sqlite, self._pg = sqlite, pg

    @classmethod
    async def connect(cls, url: str) -> PlainSql:
        if is_sqlite(url):
            return cls(sqlite3.connect(str(sa.engine.make_url(url).database)), None)
        return cls(None, await asyncpg.connect(url.replace("postgresql+asyncpg://",
                                                           "postgresql://")))

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()

    async def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if self._pg is not None:
            return [tuple(r) for r in await self._pg.fetch(sql, *params)]
        assert self._sqlite is not None
        return self._sqlite.execute(re.sub(r"\$\d+", "?", sql), params).fetchall()

    async def stream(self, sql: str, prefetch: int = 2000) -> AsyncIterator[tuple[Any, ...]]:
        """Every row of `sql`, read through a cursor (a server-side one on PostgreSQL)."""
        if self._pg is not None:
            async with self._pg.transaction():
                async for record in self._pg.cursor(sql, prefetch=prefetch):
                    yield tuple(record)
            return
        assert self._sqlite is not None
        for row in self._sqlite.execute(sql):
            yield row


@dataclass
class Timing:
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # this process's CPU seconds, every thread (aiosqlite's too): what the
    # work costs whatever else the machine runs, where `wall` waits for a core as well


@contextmanager
def clocked() -> Iterator[Timing]:
    """Wall and CPU time of the block."""
    timing = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    yield timing
    timing.wall, timing.cpu = time.perf_counter() - wall, time.process_time() - cpu


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 1e6


class Memory:
    """Resident memory while something streams `total` items: at the start, once a tenth has
    gone by, and the highest seen. Flat: no growth from the first tenth to the end."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, rss_mb()
        self.peak, self.at_tenth = self.start, self.start
        self._tenth_seen = False

    def sample(self, done: int) -> None:
        now = rss_mb()
        self.peak = max(self.peak, now)
        if not self._tenth_seen and done * 10 >= self.total:
            self.at_tenth, self._tenth_seen = now, True

    def figures(self) -> str:
        return (f"rss growth {self.peak - self.start:+.0f} MB (peak {self.peak:.0f} MB), "
                f"after the first tenth {self.peak - self.at_tenth:+.0f} MB")
