"""An injectable clock, so domain time (visit windows, missed visits) can be moved in tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class FixedClock:
    """A clock that stands still until a test moves it."""

    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self.at

    def advance(self, by: timedelta) -> None:
        self.at += by


class FileClock:
    """A clock that reads the time from a file (one RFC 3339 instant) at every call, so a test
    can move the clock of a service running in another process. For tests and demonstrations
    only (`TRIAL_CLOCK_FILE`); a file it cannot read leaves the last time it read in place, and
    the wall clock before any."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: datetime | None = None

    def now(self) -> datetime:
        try:
            at = datetime.fromisoformat(self.path.read_text().strip())
            if at.tzinfo is not None:
                self._last = at.astimezone(UTC)
        except (OSError, ValueError):
            pass
        return self._last or datetime.now(UTC)

    def set(self, at: datetime) -> None:
        """Move the clock (atomically: a reader never sees half a time)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(at.astimezone(UTC).isoformat())
        tmp.replace(self.path)


def clock_for(clock_file: Path | None) -> Clock:
    """The service's clock: the wall clock, unless `TRIAL_CLOCK_FILE` names a file clock."""
    return FileClock(clock_file) if clock_file is not None else SystemClock()
