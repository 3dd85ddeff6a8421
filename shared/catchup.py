"""Never "unknown" because a consumer lags: a service that learns of patients from Kafka waits,
briefly, until it has read what was published about one before it says it does not know them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import Refused
from shared.runtime import Runtime
from shared.web import Problem

T = TypeVar("T")
# How long a request may wait for the consumer; the answer after it is 503, never 404.
CATCH_UP_S = 2.0
# How long a patient may stay unknown after the consumer has caught up before "unknown" is the
# answer: the service that created the patient publishes a moment after its answer (its relay
# runs after the commit), so what the broker holds at the first look can lack it.
PUBLISH_GRACE_S = 0.3
MIN_CATCH_UP_S = 0.5  # the least a look that ran long still gives the consumer
# How long after this service met the broker away or its group moved (a broker restart, a
# rebalance: `settling`) a patient not found is 503 `not_caught_up`, not 404: the service that
# made the patient may still be publishing what it wrote meanwhile (issue 15).
SETTLING_S = 15.0
UNKNOWN = frozenset({"patient_not_found"})


async def unless_lagging(rt: Runtime, topic: str, patient_id: str,
                         command: Callable[[], Awaitable[T]],
                         unknown: frozenset[str] = UNKNOWN) -> T:
    """Run `command`; while it finds no such patient, wait until this service's consumer has
    read the patient's partition of `topic` to its end as of now, and run it again. Still not
    found `PUBLISH_GRACE_S` after the consumer first caught up, the patient is unknown (404). If
    the consumer cannot catch up within `CATCH_UP_S`, the answer is 503 `not_caught_up` with
    Retry-After: the patient may well exist (D33). `unknown` names the refusals that mean "not
    heard of yet"."""
    started = time.monotonic()
    caught_up_at: float | None = None  # when the consumer was first found caught up
    while True:
        try:
            return await command()
        except Refused as refused:
            consumer = rt.consumer
            if (refused.code not in unknown or consumer is None
                    or not rt.settings.consumers_enabled):  # nothing consumed: nothing to wait for
                raise
            if caught_up_at is not None and time.monotonic() - caught_up_at >= PUBLISH_GRACE_S:
                if not settling(rt):
                    raise  # caught up, and nothing about the patient arrived since: unknown
                if time.monotonic() - started >= CATCH_UP_S:  # the broker was away just now
                    raise _not_caught_up() from refused
            # The consumer is always asked before "unknown", however long the look took (a
            # busy service's first look can outlast the grace on its own).
            budget = max(CATCH_UP_S - (time.monotonic() - started), MIN_CATCH_UP_S)
            if not await consumer.caught_up(topic, patient_id, budget):
                raise _not_caught_up() from refused
            if caught_up_at is None:
                caught_up_at = time.monotonic()
            else:
                await asyncio.sleep(0.05)  # a publish may still be on its way: look again


def settling(rt: Runtime) -> bool:
    """Whether this service met the broker away, or its group moved, less than SETTLING_S ago
    (its consumer could not reach it, was handed its partitions again, or its relay failed)."""
    consumer, relay = rt.consumer, rt.relay
    failed_at = relay.failed_at if relay is not None else None
    return ((consumer is not None and consumer.settling(SETTLING_S))
            or (failed_at is not None and time.monotonic() - failed_at < SETTLING_S))


async def having_read(rt: Runtime, topic: str, patient_id: str | None = None) -> None:
    """Before a write that a fact on `topic` may forbid (a withdrawal refuses an assessment, a
    treatment discontinuation or a safety hold a dose): wait until this service has handled
    every record of the patient's partition (of every partition, without a patient: a hold on
    an arm or the whole trial is keyed by neither) that the broker holds now, or answer 503
    `not_caught_up`. What a service published a moment ago is then known here; only a fact
    still on its way from the other service's relay (milliseconds) can be missed (D37, D73)."""
    consumer = rt.consumer
    if consumer is None or not rt.settings.consumers_enabled:
        return
    if not await consumer.caught_up(topic, patient_id, CATCH_UP_S):
        raise _not_caught_up()


def _not_caught_up() -> Problem:
    problem = Problem(503, "not_caught_up", "This service has not yet read every event about "
                      "this patient; retry shortly", retry_after_s=1)
    problem.headers = {"Retry-After": "1"}
    return problem
