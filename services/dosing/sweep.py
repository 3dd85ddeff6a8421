"""The missed-visit sweep's loop: every dosing visit whose window closed without a dose becomes
`VisitMissed`, once, however often and however concurrently the sweep runs (the decision is
`commands.sweep_missed_visits`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.dosing.commands import sweep_missed_visits
from shared.clock import Clock
from shared.protocol import ProtocolConfig
from shared.store import EventStore

log = logging.getLogger(__name__)


class Sweeper:
    """The app's background sweep: a pass, then `interval_s` of waiting (or until asked to stop).

    It reads the clock on every pass, so a test that moves a `FixedClock` moves the sweep too.
    """

    def __init__(self, store: EventStore, clock: Clock, protocol: ProtocolConfig,
                 interval_s: float) -> None:
        self.store, self.clock, self.protocol, self.interval_s = store, clock, protocol, interval_s
        self.passes = 0
        self.found = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.found += await sweep_missed_visits(self.store, self.clock, self.protocol)
            except Exception as exc:  # the database may be away; the next pass catches up
                log.warning("missed-visit sweep failed: %r", exc)
            self.passes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
