"""Issue 15, fault 3: the broker restarted under load (Apache Kafka, and the embedded broker).

While site systems run the patient workflow through the gateway (`tests.faults.driver`), the
system's broker (one of its own) is stopped, the load meets it down for a few seconds, and it is
started again. Writes only need their database, so the randomization's (screening, enrolment,
randomization) are still acknowledged while it is down; a write that needs a consumer to have
read the patient's events (a dose, an adverse event, an assessment) may be answered 503
`not_caught_up` with Retry-After, which the site retries. Once the system has caught up (every
relay has published its store as it was at the broker's start, a write needing each consumer was
acknowledged again, the ledger files again) the load stops and the accounting runs.

Catching up under load is a matter of headroom: the embedded broker's restart has every consumer
read the whole history again while new workflows keep coming, on the same two cores. On a busy
machine that can take longer than the load is kept on (`CAUGHT_UP_UNDER_LOAD_S`; seen once in CI:
every service's handling 3x slower than on a quiet machine, still behind 30 s after the start).
So the load stops then, the workflows already started carry on with their retries as a site's
would, and the system must catch up within `CAUGHT_UP_TIMEOUT_S` of the broker's start either
way: a relay or consumer that never recovers still fails the test; how long it took, and whether
under load, is reported.

Apache Kafka keeps its data (the same state_dir) and its cluster id: nothing is published again.
The embedded broker comes back empty, with a new cluster id, and is restarted the way `trial run`
restarts it, with every service (D58, `WHOLE`): each relay publishes its whole history to it
again (D45) and the consumers drop what they have seen by event id. The accounting
reads Kafka after the restart, so "every event on Kafka exactly once" is about the new broker's
content there; and the audit ledger must hold every event once, not twice after the
republication.

Time to recover: from the broker's start to it answering, to the first acknowledged write that
needed a consumer, to caught up, and to quiet.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.store import EventStore
from tests.conftest import REAL
from tests.e2e.conftest import SECRET, system_and_broker
from tests.faults.accounting import PUBLISHERS, RELAY, cluster_id, open_stores, relay_lag
from tests.faults.report import Row, publish
from tests.faults.scenario import (
    ObservedDriver,
    failures,
    fault_env,
    settle,
    unhandled_errors,
)
from tests.support import eventually

# Apache Kafka is restarted alone under the running services. The embedded broker is restarted
# as `trial run` restarts it when it dies (D58): with every service, since restarted alone under
# clients connected before it, Tansu misplaces records and leaves offsets no fetch returns, where
# consumers stop (docs/faults.md, defect 1). Meanwhile the gateway is down too: the site's
# retries wait it out, and no write is acknowledged while the broker is down.
WHOLE = not REAL
RATE_PER_S = 2.0  # new patient workflows a second
WARM_UP_WORKFLOWS = 3  # whole workflows through before the broker is stopped
DOWN_S = 5.0  # how long the broker stays down, the load running against it
CAUGHT_UP_UNDER_LOAD_S = 30.0  # the load kept on this long after the broker answers, at most
CAUGHT_UP_TIMEOUT_S = 60.0  # the system not caught up this long after the broker's start failed
QUIET_TIMEOUT_S = 30.0  # quiet after the load, once caught up
# How long the site retries one write (the load's wind-down waits): longer than the outage and
# the recovery allowed after it, or a slow recovery within its allowance fails a site's write.
REQUEST_DEADLINE_S = 90.0
BUDGET_S = 240.0  # the test body's, from its start: the accounting is cut off after it
MIN_ACKNOWLEDGED = 80  # writes the run must have had acknowledged
# The writes that need a consumer to have read the patient's events first (D33, D37).
NEEDS_CONSUMER = {"dose": "dosing", "adverse_event": "safety", "assessment": "efficacy"}
RANDOMIZATION_PATHS = ("/v1/screenings", "/v1/patients")  # and .../randomization

pytestmark = pytest.mark.timeout(300)


@dataclass
class Restart:
    """The broker's restart (monotonic times) and what the system did after it."""

    cluster_before: str | None = None
    cluster_after: str | None = None
    stop_at: float = 0.0  # stop() called
    stopped_at: float = 0.0  # stop() returned: the broker is gone
    start_at: float = 0.0  # start() called
    up_at: float = 0.0  # start() returned: the broker answers
    heads_at_start: dict[str, int] = field(default_factory=dict)
    ledger_head: int | None = None  # the ledger's head when the broker answered again
    load_stopped_at: float | None = None
    first_write_at: dict[str, float] = field(default_factory=dict)  # service: first ack after
    ledger_filing_at: float | None = None
    caught_up_at: float | None = None
    pending: list[str] = field(default_factory=list)  # what was still not caught up

    def since_start(self, at: float | None) -> float | None:
        return None if at is None else round(at - self.start_at, 2)


def say(began: float, what: str) -> None:
    """A line of progress, for the log of a run that hangs or fails."""
    print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)


def is_randomization_write(path: str) -> bool:
    return path in RANDOMIZATION_PATHS or path.endswith("/randomization")


async def wait_caught_up(r: Restart, driver: ObservedDriver, stores: Mapping[str, EventStore],
                         timeout: float) -> None:
    """Until the system has caught up after the broker's start: every relay has published its
    store to (at least) its head at the broker's start, under the cluster the broker now is; a
    write needing each consumer, sent after the broker answered, was acknowledged; the ledger
    has filed a record again. Fills `r` (`caught_up_at` None and `pending` when it did not); a
    second call waits on from where the first left off."""
    checkpoint = f"{RELAY}@{r.cluster_after}" if r.cluster_after else RELAY
    if r.ledger_head is None:
        r.ledger_head = await stores["audit"].head()
    ledger_head = r.ledger_head

    async def pending() -> list[str]:
        left = []
        for service in PUBLISHERS:
            at = await stores[service].checkpoint(checkpoint)
            if at < r.heads_at_start[service]:
                left.append(f"{service}'s relay at {at} of {r.heads_at_start[service]}")
        for step, service in NEEDS_CONSUMER.items():
            if service not in r.first_write_at:
                ack = next((a for a in driver.acks if a.step == step and a.sent_at > r.up_at),
                           None)
                if ack is None:
                    left.append(f"no {step} acknowledged by {service} since")
                else:
                    r.first_write_at[service] = ack.acked_at
        if r.ledger_filing_at is None:
            if await stores["audit"].head() > ledger_head:
                r.ledger_filing_at = time.monotonic()
            else:
                left.append("the ledger has filed nothing since")
        return left

    async def done() -> bool:
        r.pending = await pending()
        return not r.pending

    try:
        await eventually(done, timeout, "the system caught up after the broker's restart")
        r.caught_up_at = time.monotonic()
    except AssertionError:
        pass  # recorded in r.pending; the accounting still runs, the test fails after


async def test_broker_restart_under_load(pg_dsn: str | None, tmp_path: Path) -> None:
    """The broker stopped and started under load: writes acknowledged while it is down, nothing
    lost, nothing applied twice, every event on the broker once (Kafka: kept; the embedded
    broker: published again), the ledger holding every event once."""
    protocol, env = fault_env(tmp_path)
    began = time.monotonic()
    kind = "Apache Kafka" if REAL else "Tansu (embedded, empty after)"
    with system_and_broker(pg_dsn, tmp_path, env=env) as (system, broker):
        async with open_stores(system.database_urls) as stores:
            driver = ObservedDriver([system.url("gateway")], SECRET, protocol, RATE_PER_S,
                                    request_deadline_s=REQUEST_DEADLINE_S)
            stop = asyncio.Event()
            load = asyncio.create_task(driver.run(stop))
            r = Restart()
            try:
                await eventually(lambda: len(driver.acks_of("assessment")) >= WARM_UP_WORKFLOWS,
                                 90, "the first whole workflows")
                r.cluster_before = await cluster_id(system.bootstrap)
                say(began, f"warmed up ({len(driver.acks)} writes); stopping the broker")
                r.stop_at = time.monotonic()
                await asyncio.to_thread(broker.stop)
                if WHOLE:  # as `trial run` does when its broker dies (D58): every service too
                    services = tuple(system.processes)
                    await asyncio.to_thread(system.stop)
                r.stopped_at = time.monotonic()
                say(began, "broker stopped")
                await asyncio.sleep(DOWN_S)  # the outage itself, a duration: the load runs on
                r.heads_at_start = {s: await stores[s].head() for s in PUBLISHERS}
                r.start_at = time.monotonic()
                await asyncio.to_thread(broker.start)
                if WHOLE:
                    system.start(services)
                    await asyncio.to_thread(system.wait_ready)
                r.up_at = time.monotonic()
                r.cluster_after = await cluster_id(system.bootstrap)
                say(began, f"broker up again ({r.cluster_before} -> {r.cluster_after})")
                await wait_caught_up(r, driver, stores, CAUGHT_UP_UNDER_LOAD_S)
                stop.set()  # no new workflows; the ones started carry on, retried
                r.load_stopped_at = time.monotonic()
                if r.caught_up_at is None:
                    say(began, f"not caught up under load: {r.pending}; the load stopped")
                    await wait_caught_up(r, driver, stores,
                                         r.start_at + CAUGHT_UP_TIMEOUT_S - time.monotonic())
            finally:
                stop.set()
                await asyncio.wait_for(load, 3 * driver.request_deadline_s)
            ended_at = time.monotonic()
            say(began, f"load ended; caught up: {r.caught_up_at is not None} {r.pending}")
            try:  # bounded: a relay that never catches up must fail the test, not time it out
                settled = await asyncio.wait_for(
                    settle(system, stores, driver, protocol,
                           quiet_timeout=QUIET_TIMEOUT_S if r.caught_up_at else 10.0),
                    max(15.0, began + BUDGET_S - time.monotonic()))
            except TimeoutError:
                lag = await relay_lag(stores, r.cluster_after)
                raise AssertionError(
                    f"no accounting within the test's budget ({BUDGET_S:g} s): not caught up "
                    f"after the broker's restart ({r.pending}); relays behind their heads on "
                    f"cluster {r.cluster_after}: {lag}; driver {driver.summary()} "
                    f"(logs: {system.log_dir})") from None
            quiet_at = ended_at + settled.quiet.seconds
            say(began, f"settled: quiet {settled.quiet.quiet} after {settled.quiet.seconds:.1f} s")
        result = settled.result

        down = (r.stopped_at, r.start_at)
        acked_down = [a for a in driver.acks if down[0] <= a.sent_at and a.acked_at <= down[1]]
        rnd_acked_down = [a for a in acked_down if a.service == "randomization"]
        rnd_refused_down = Counter(f"{x.status} {x.code}" for x in driver.answers
                                   if down[0] <= x.at <= down[1]
                                   and is_randomization_write(x.path))
        not_caught_up = [x for x in driver.answers if x.code == "not_caught_up"]
        deadlines = [f"{x.step}: {x.status} {x.code}" for x in driver.refusals
                     if x.code.startswith("deadline")]
        first_consumer_write = min(r.first_write_at.values(), default=None)
        # Every workflow of the load is valid: a final refusal is a wrong answer. Each one with
        # when (from the broker's start) its patient's enrolment was acknowledged and it came.
        enrolled = {a.workflow: a.acked_at for a in driver.acks if a.step == "enrol"}
        refused = [{"workflow": x.workflow, "step": x.step, "answer": f"{x.status} {x.code}",
                    "path": x.path, "attempts": x.attempts,
                    "enrolled_s": r.since_start(enrolled.get(x.workflow)),
                    "refused_s": r.since_start(x.at)} for x in driver.refusals]
        republished = sum(r.heads_at_start.values()) if r.cluster_after != r.cluster_before else 0
        figures = {
            "broker": kind, "down_s": DOWN_S, "rate_per_s": RATE_PER_S,
            "stop_s": round(r.stopped_at - r.stop_at, 2),
            "cluster_before": r.cluster_before, "cluster_after": r.cluster_after,
            "republished_events": republished,
            "writes_acknowledged_while_down": dict(Counter(a.step for a in acked_down)),
            "randomization_refusals_while_down": dict(rnd_refused_down),
            "not_caught_up_503": len(not_caught_up),
            "not_caught_up_without_retry_after": sum(x.retry_after is None
                                                     for x in not_caught_up),
            "from_broker_start": {
                "broker_answering_s": r.since_start(r.up_at),
                "first_write_needing_a_consumer_s": r.since_start(first_consumer_write),
                "first_write_by_service_s": {s: r.since_start(t)
                                             for s, t in r.first_write_at.items()},
                "ledger_filing_again_s": r.since_start(r.ledger_filing_at),
                "load_stopped_s": r.since_start(r.load_stopped_at),
                "caught_up_s": r.since_start(r.caught_up_at),
                "quiet_s": r.since_start(quiet_at)},
            "caught_up_under_load": (r.caught_up_at is not None and r.load_stopped_at is not None
                                     and r.caught_up_at < r.load_stopped_at),
            "not_caught_up_after_s": r.pending,
            "refusals": refused,
        }
        after_stop = [a for a in driver.acks if a.acked_at >= r.stop_at]
        rows = [
            Row("restart the broker", kind, len(after_stop),
                sum(x.acked_at >= r.stop_at for x in result.lost), len(result.duplicated),
                result.kafka.duplicate_ids, r.since_start(r.up_at),
                r.since_start(first_consumer_write), figures),
            Row("restart the broker", "all (whole run)", len(driver.acks), len(result.lost),
                len(result.duplicated), result.kafka.duplicate_ids,
                detail={"driver": driver.summary(), "accounting": result.summary()}),
        ]
        publish(rows, "restart the broker under load")
        print(json.dumps({**figures, "driver": driver.summary(),
                          "accounting": result.summary(), "quiet": settled.quiet.__dict__,
                          "verify": settled.verified,
                          "seconds": round(time.monotonic() - began, 1),
                          "logs": str(system.log_dir)}, indent=1, default=str))

        ledger = result.ledger
        same_cluster = r.cluster_after == r.cluster_before
        unhandled = unhandled_errors(system)
        failed = failures(settled, driver, MIN_ACKNOWLEDGED, more=[
            (r.caught_up_at is not None,
             f"not caught up {CAUGHT_UP_TIMEOUT_S:g} s after the broker's start (the load "
             f"stopped {r.since_start(r.load_stopped_at)} s after it): {r.pending}"),
            (same_cluster if REAL else not same_cluster,
             f"cluster id {r.cluster_before} before the restart, {r.cluster_after} after "
             f"({'Kafka keeps its id' if REAL else 'the embedded broker must have a new one'})"),
            (bool(rnd_acked_down) or WHOLE,
             "no randomization write acknowledged while the broker was "
             f"down ({len(acked_down)} writes in all)"),
            (not rnd_refused_down or WHOLE,
             f"randomization writes refused while the broker was down "
             f"(they need only the database): {dict(rnd_refused_down)}"),
            (all(x.retry_after is not None for x in not_caught_up),
             f"{figures['not_caught_up_without_retry_after']} 503 not_caught_up without "
             "Retry-After"),
            (not unhandled, f"requests that failed unhandled (500s, in the services' logs): "
                            f"{ {s: len(v) for s, v in unhandled.items()} }: "
                            f"{ {s: v[:2] for s, v in unhandled.items()} }"),
            (not deadlines, f"workflows stopped at the driver's deadline: {deadlines[:10]}"),
            (not refused, f"{len(refused)} workflows stopped by a final refusal "
                          f"({driver.summary()['refusals']}), times from the broker's start "
                          f"(stopped {r.since_start(r.stopped_at)}, answering "
                          f"{r.since_start(r.up_at)}): {refused[:5]}"),
            (not ledger.repeated, f"the ledger ({ledger.entries} entries) holds "
                                  f"{len(ledger.repeated)} events more than once after the "
                                  f"republication: {list(ledger.repeated.items())[:5]}"),
        ])
        assert not failed, "\n".join(failed) + f"\n(logs: {system.log_dir})"
