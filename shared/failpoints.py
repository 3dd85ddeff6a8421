"""Failpoints: named places where a fault test makes a process die, exactly there (issue 15).

`TRIAL_FAILPOINT=consumer.before_offset_commit:3` kills the process with SIGKILL, as `kill -9`
would, the third time it reaches `reach("consumer.before_offset_commit")`: after the records of a
fetch are in its database, before their offsets are committed to Kafka. A timed `kill -9` could
land there only by chance; the test needs it every time. Production mode refuses to start with
one set (shared.settings.production_refusals); unset, `reach` costs a comparison.
"""

from __future__ import annotations

import logging
import os
import signal

from shared.settings import Settings

log = logging.getLogger(__name__)

BEFORE_OFFSET_COMMIT = "consumer.before_offset_commit"
NAMES = frozenset({BEFORE_OFFSET_COMMIT})


class Failpoints:
    def __init__(self, settings: Settings) -> None:
        self.name: str | None = None
        self.at = 0
        self.reached = 0
        if settings.failpoint is not None:
            name, _, count = settings.failpoint.partition(":")
            if name not in NAMES:
                raise ValueError(f"TRIAL_FAILPOINT: no failpoint {name!r} "
                                 f"(there are: {', '.join(sorted(NAMES))})")
            self.name, self.at = name, int(count)

    def reach(self, name: str) -> None:
        if name != self.name:
            return
        self.reached += 1
        if self.reached == self.at:
            log.warning("failpoint %s reached (%d): killing this process", name, self.reached)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
