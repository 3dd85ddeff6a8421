"""A service's background sweep (dosing's missed doses, efficacy's missed assessments): a pass,
then `interval_s` of waiting or until asked to stop, for as long as the service runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shared.clock import Clock

log = logging.getLogger(__name__)


class Sweeper:
    """Runs `sweep(now)` every `interval_s`. It reads the clock on every pass, so a test that
    moves a `FixedClock` (or the file of a `FileClock`) moves the sweep too. Each pass decides
    each patient in its own transaction, so passes running twice, or concurrently in two
    replicas, record each finding once."""

    def __init__(self, sweep: Callable[[Clock], Awaitable[int]], clock: Clock,
                 interval_s: float, what: str) -> None:
        self.sweep, self.clock, self.interval_s, self.what = sweep, clock, interval_s, what
        self.passes = 0
        self.found = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.found += await self.sweep(self.clock)
            except Exception as exc:  # the database may be away; the next pass catches up
                log.warning("%s sweep failed: %r", self.what, exc)
            self.passes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
