"""The missed-visit sweep: every dosing visit whose window closed without a dose becomes
`VisitMissed`, once, however often and however concurrently the sweep runs."""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa

from services.dosing import domain
from services.dosing.handlers import load_record
from shared.clock import Clock
from shared.schema import events
from shared.store import EventStore, Metadata, NewEvent

log = logging.getLogger(__name__)
SWEEP_ACTOR = Metadata(actor="dosing-sweep", reason="visit window closed without a dose")


async def patients_with_calendars(store: EventStore) -> list[str]:
    prefix = domain.schedule_stream("")
    q = sa.select(events.c.stream_id).where(events.c.type == "DosingScheduleCreated").distinct()
    async with store.read_engine.connect() as conn:
        streams = [r[0] for r in await conn.execute(q)]
    return sorted(s.removeprefix(prefix) for s in streams if s.startswith(prefix))


async def sweep_missed_visits(store: EventStore, clock: Clock) -> int:
    """One pass over every calendar; returns how many visits it found missed.

    Each patient is decided inside its own store transaction, from the stream as it stands
    there, so a second pass (or a concurrent one) sees the first one's VisitMissed and adds none.
    """
    found = 0
    for patient_id in await patients_with_calendars(store):
        async with store.transaction() as tx:
            record, version = await load_record(tx, patient_id)
            missed = domain.decide_missed(record, clock.now())
            if missed:
                await tx.append(domain.schedule_stream(patient_id),
                                [NewEvent.of(e, SWEEP_ACTOR) for e in missed], version)
                found += len(missed)
    return found


class Sweeper:
    """The app's background sweep: a pass, then `interval_s` of waiting (or until asked to stop).

    It reads the clock on every pass, so a test that moves a `FixedClock` moves the sweep too.
    """

    def __init__(self, store: EventStore, clock: Clock, interval_s: float) -> None:
        self.store, self.clock, self.interval_s = store, clock, interval_s
        self.passes = 0
        self.found = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.found += await sweep_missed_visits(self.store, self.clock)
            except Exception as exc:  # the database may be away; the next pass catches up
                log.warning("missed-visit sweep failed: %r", exc)
            self.passes += 1
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
