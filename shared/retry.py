"""The one retry policy of every loop that waits out a broker or a database: exponential backoff
with jitter (tenacity), interruptible by the loop's stop event."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from shared.errors import ConcurrencyError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stopped(Exception):
    """The stop event was set while the operation was still failing."""


class _StopWhenSet(stop_base):
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.event.is_set()


def _sleeper(stop: asyncio.Event | None,
             wake: Callable[[], Awaitable[object]] | None = None
             ) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        waits: list[asyncio.Future[object]] = (
            [] if stop is None else [asyncio.ensure_future(stop.wait())])
        if wake is not None:
            waits.append(asyncio.ensure_future(wake()))
        if not waits:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    return sleep


async def retry(operation: Callable[[], Awaitable[T]], *, what: str,
                stop: asyncio.Event | None = None,
                retry_if: Callable[[BaseException], bool] = lambda _: True,
                attempts: int | None = None, initial: float = 0.1,
                maximum: float = 5.0, wake: Callable[[], Awaitable[object]] | None = None) -> T:
    """Run `operation` until it returns. A failure that `retry_if` accepts is retried after
    `initial`, then twice as long each time up to `maximum` seconds, each wait with up to
    `initial` of jitter, so replicas that failed together do not retry in step. `wake`, when
    given, is awaited beside each wait: its return cuts the wait short (the relay: a commit
    here says the database is back, and a write waits for its events, D56).

    Gives up with the last error after `attempts` (if given), or with `Stopped` once `stop` is
    set; any other error goes straight to the caller.
    """
    give_up: stop_base = stop_never if attempts is None else stop_after_attempt(attempts)
    if stop is not None:
        give_up = give_up | _StopWhenSet(stop)

    def note(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed (attempt %d), retrying in %.2fs: %r", what, state.attempt_number,
                    wait, error)

    try:
        async for attempt in AsyncRetrying(
                # Only errors: a cancellation (a BaseException) is never swallowed as a failure.
                retry=retry_if_exception(lambda e: isinstance(e, Exception) and retry_if(e)),
                stop=give_up,
                wait=wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial),
                sleep=_sleeper(stop, wake), before_sleep=note, reraise=True):
            with attempt:
                return await operation()
    except Exception as exc:
        if stop is not None and stop.is_set():
            raise Stopped(what) from exc
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")


CONFLICT_ATTEMPTS = 25


async def on_conflict_again(operation: Callable[[], Awaitable[T]],
                            attempts: int = CONFLICT_ATTEMPTS) -> T:
    """Run `operation` (a whole transaction: its reads, its decision, its commit) again while its
    commit finds that what it read has moved (`ConcurrencyError`, D39), after a short random pause
    that grows, so that racers fall out of step. After `attempts` the last one goes to the caller
    (an HTTP 409 `conflict`; a consumer's handler failure)."""
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except ConcurrencyError:
            if attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    raise AssertionError("unreachable")
