"""Never "unknown" because a consumer lags: a service that learns of patients from Kafka waits,
briefly, until it has read what was published about one before it says it does not know them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import Refused
from shared.runtime import Runtime
from shared.web import Problem

T = TypeVar("T")
# How long a request may wait for the consumer; the answer after it is 503, never 404.
CATCH_UP_S = 2.0
UNKNOWN = frozenset({"patient_not_found"})


async def unless_lagging(rt: Runtime, topic: str, patient_id: str,
                         command: Callable[[], Awaitable[T]]) -> T:
    """Run `command`; if it finds no such patient, wait until this service's consumer has read
    the patient's partition of `topic` to the end it had now, and run it again. If the consumer
    cannot get there in `CATCH_UP_S`, the answer is 503 `not_caught_up` with Retry-After: the
    patient may well exist (D33)."""
    try:
        return await command()
    except Refused as refused:
        if (refused.code not in UNKNOWN or rt.consumer is None
                or not rt.settings.consumers_enabled):  # nothing consumed, nothing to wait for
            raise
        if not await rt.consumer.caught_up(topic, patient_id, CATCH_UP_S):
            problem = Problem(503, "not_caught_up", "This service has not yet read every event "
                              "about this patient; retry shortly", retry_after_s=1)
            problem.headers = {"Retry-After": "1"}
            raise problem from refused
    return await command()  # caught up: now it knows, or the patient truly is unknown here
