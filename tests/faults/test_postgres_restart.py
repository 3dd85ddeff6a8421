"""Issue 15, fault 4: PostgreSQL restarted under load.

Every service's database is on a PostgreSQL cluster of the test's own (the session's is shared
by every other test). While site systems run the patient workflow through the gateway
(`tests.faults.driver`), the cluster is stopped for a few seconds and started again. While it is
down a write is answered 503 `database_unavailable` with Retry-After (the gateway's 503 for a
service it cannot reach carries one too), never a 500 (D54); the site sends the same request
with the same Idempotency-Key again, and once the cluster is back it succeeds, once. Then the
whole accounting holds: nothing acknowledged lost, nothing applied twice, every event on Kafka
once, the ledger whole, every consumer complete.

Time to recover: from the cluster's start to each service ready again and to its first
acknowledged write (the ledger: its first record filed).

`make test-real` only: SQLite has no server to restart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deploy import infra
from shared.store import EventStore
from tests.conftest import REAL
from tests.e2e.conftest import SECRET, system_of_its_own
from tests.faults.accounting import PUBLISHERS, Accounting, open_stores
from tests.faults.driver import OWNER
from tests.faults.report import Row, publish
from tests.faults.scenario import Answer, ObservedDriver, failures, fault_env, settle, unhandled_errors
from tests.support import eventually
from tooling.launcher import System

RATE_PER_S = 2.0  # new patient workflows a second
WARM_UP_WORKFLOWS = 3  # whole workflows through before the cluster is stopped
DOWN_S = 5.0  # how long the cluster stays down, the load running against it
# A busy machine is slow, not wrong: as long as the kill and replica tests give.
RECOVERY_TIMEOUT_S = 60.0  # a service not serving again this long after the cluster's start
# How long the site retries one write (the load's wind-down waits): longer than the outage and
# the recovery allowed after it, or a slow recovery within its allowance fails a site's write.
REQUEST_DEADLINE_S = 90.0
BUDGET_S = 240.0  # the test body's, from its start: the accounting is cut off after it
STEADY_S = 3.0  # load on the recovered system before it stops
MIN_ACKNOWLEDGED = 80  # writes the run must have had acknowledged
SERVICES_WITH_A_STORE = (*PUBLISHERS, "audit")

pytestmark = pytest.mark.timeout(300)


@dataclass
class Outage:
    """The cluster's restart (monotonic times) and each service's recovery after it."""

    stop_at: float = 0.0  # stop_postgres called
    stopped_at: float = 0.0  # it returned: the cluster is down
    start_at: float = 0.0  # start_postgres called
    up_at: float = 0.0  # it returned: the cluster accepts queries
    ready_at: dict[str, float] = field(default_factory=dict)  # service: /readyz 200 again
    first_write_at: dict[str, float] = field(default_factory=dict)  # service: first ack after
    pending: list[str] = field(default_factory=list)  # what had not recovered at the deadline

    def since_start(self, at: float | None) -> float | None:
        return None if at is None else round(at - self.start_at, 2)


def say(began: float, what: str) -> None:
    print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)


async def wait_recovered(o: Outage, system: System, driver: ObservedDriver,
                         stores: Mapping[str, EventStore], timeout: float) -> None:
    """Until every service with a store is ready again and has served a write sent after the
    cluster's start (the ledger: filed a record), or `timeout`; fills `o`."""
    ledger_head: int | None = None

    async def pending(client: httpx.AsyncClient) -> list[str]:
        nonlocal ledger_head
        left = []
        for service in SERVICES_WITH_A_STORE:
            if service not in o.ready_at:
                try:
                    if (await client.get(f"{system.url(service)}/readyz")).status_code == 200:
                        o.ready_at[service] = time.monotonic()
                except httpx.HTTPError:
                    pass
            if service not in o.ready_at:
                left.append(f"{service} not ready")
            if service in o.first_write_at:
                continue
            if service == "audit":
                try:  # the ledger's head, once the database answers again
                    head = await stores["audit"].head()
                except Exception:  # the reader's own connection to the database is down
                    left.append("the ledger unreadable")
                    continue
                if ledger_head is None:
                    ledger_head = head
                elif head > ledger_head:
                    o.first_write_at[service] = time.monotonic()
                    continue
                left.append("the ledger has filed nothing since")
            else:
                ack = driver.first_ack_through(service, o.start_at)
                if ack is None:
                    left.append(f"no write acknowledged by {service} since")
                else:
                    o.first_write_at[service] = ack.acked_at
        return left

    async with httpx.AsyncClient(timeout=2) as client:
        async def done() -> bool:
            o.pending = await pending(client)
            return not o.pending

        try:
            await eventually(done, timeout, "every service recovered after the cluster's start")
        except AssertionError:
            pass  # recorded in o.pending; the accounting still runs, the test fails after


def rows_of(o: Outage, driver: ObservedDriver, result: Accounting, answers_down: list[Answer]
            ) -> list[Row]:
    rows = []
    after_stop = [a for a in driver.acks if a.acked_at >= o.stop_at]
    for service in SERVICES_WITH_A_STORE:
        acks = [a for a in after_stop if a.service == service]
        rows.append(Row(
            "restart PostgreSQL", service, len(acks),
            sum(x.acked_at >= o.stop_at and OWNER[x.step] == service for x in result.lost),
            sum(d.store == service for d in result.duplicated),
            result.kafka.duplicates_by_service.get(service, 0),
            o.since_start(o.ready_at.get(service)), o.since_start(o.first_write_at.get(service)),
            {"measured_from": "the cluster's start", "down_s": DOWN_S, "rate_per_s": RATE_PER_S,
             "cluster_start_s": o.since_start(o.up_at)}))
    rows.append(Row("restart PostgreSQL", "all (whole run)", len(driver.acks), len(result.lost),
                    len(result.duplicated), result.kafka.duplicate_ids,
                    detail={"answers_while_down": dict(Counter(
                        f"{x.status} {x.code}" for x in answers_down)),
                        "driver": driver.summary(), "accounting": result.summary()}))
    return rows


if REAL:
    async def test_postgres_restart_under_load(tmp_path: Path) -> None:
        """The cluster every store is on stopped and started under load: 503 with Retry-After
        while it is down, never a 500; every acknowledged write in its store once after."""
        protocol, env = fault_env(tmp_path)
        began = time.monotonic()
        port, state = infra.free_port(), tmp_path / "pg"
        dsn = await asyncio.to_thread(infra.start_postgres, port, state)
        try:
            with system_of_its_own(dsn, tmp_path, env=env) as system:
                say(began, "system ready")
                async with open_stores(system.database_urls) as stores:
                    driver = ObservedDriver([system.url("gateway")], SECRET, protocol,
                                            RATE_PER_S, request_deadline_s=REQUEST_DEADLINE_S)
                    stop = asyncio.Event()
                    load = asyncio.create_task(driver.run(stop))
                    o = Outage()
                    try:
                        await eventually(
                            lambda: len(driver.acks_of("assessment")) >= WARM_UP_WORKFLOWS,
                            90, "the first whole workflows")
                        say(began, f"warmed up ({len(driver.acks)} writes); stopping PostgreSQL")
                        o.stop_at = time.monotonic()
                        await asyncio.to_thread(infra.stop_postgres, port, state)
                        o.stopped_at = time.monotonic()
                        await asyncio.sleep(DOWN_S)  # the outage, a duration: the load runs on
                        o.start_at = time.monotonic()
                        await asyncio.to_thread(infra.start_postgres, port, state)
                        o.up_at = time.monotonic()
                        say(began, f"PostgreSQL up again after {o.up_at - o.stop_at:.1f} s")
                        await wait_recovered(o, system, driver, stores, RECOVERY_TIMEOUT_S)
                        say(began, f"recovered: {not o.pending} {o.pending}")
                        if not o.pending:
                            await asyncio.sleep(STEADY_S)  # a duration of load, recovered
                    finally:
                        stop.set()
                        await asyncio.wait_for(load, 3 * driver.request_deadline_s)
                    say(began, "load stopped")
                    try:  # bounded: a system that never recovers fails, not times out
                        settled = await asyncio.wait_for(
                            settle(system, stores, driver, protocol,
                                   quiet_timeout=30.0 if not o.pending else 10.0),
                            max(15.0, began + BUDGET_S - time.monotonic()))
                    except TimeoutError:
                        raise AssertionError(
                            f"no accounting within the test's budget ({BUDGET_S:g} s): not "
                            f"recovered after the cluster's start ({o.pending}); driver "
                            f"{driver.summary()} (logs: {system.log_dir})") from None
                    say(began, f"settled: quiet {settled.quiet.quiet} after "
                               f"{settled.quiet.seconds:.1f} s")
                result = settled.result
                down = [x for x in driver.answers if o.stopped_at <= x.at <= o.up_at]
                unavailable = [x for x in down if x.status == 503]
                no_retry_after = Counter(f"{x.status} {x.code}" for x in driver.answers
                                         if x.status == 503 and x.retry_after is None)
                enrolled = {a.workflow: a.acked_at for a in driver.acks if a.step == "enrol"}
                refusals = [{"workflow": x.workflow, "step": x.step,
                             "answer": f"{x.status} {x.code}", "attempts": x.attempts,
                             "enrolled_s": o.since_start(enrolled.get(x.workflow)),
                             "refused_s": o.since_start(x.at)} for x in driver.refusals]
                rows = rows_of(o, driver, result, down)
                publish(rows, "restart PostgreSQL under load")
                figures = {
                    "down_s": DOWN_S, "stop_s": round(o.stopped_at - o.stop_at, 2),
                    "from_cluster_start": {
                        "cluster_answering_s": o.since_start(o.up_at),
                        "ready_s": {s: o.since_start(t) for s, t in o.ready_at.items()},
                        "first_write_s": {s: o.since_start(t)
                                          for s, t in o.first_write_at.items()}},
                    "answers_while_down": dict(Counter(f"{x.status} {x.code}" for x in down)),
                    "retry_after_while_down": dict(Counter(
                        f"{x.status} {x.code}: Retry-After {x.retry_after}" for x in down)),
                    "503_without_retry_after": dict(no_retry_after),
                    "not_recovered": o.pending,
                    # every workflow of the load is valid: a final refusal is a wrong answer
                    "refusals": refusals}
                print(json.dumps({**figures, "driver": driver.summary(),
                                  "accounting": result.summary(),
                                  "quiet": settled.quiet.__dict__, "verify": settled.verified,
                                  "seconds": round(time.monotonic() - began, 1),
                                  "logs": str(system.log_dir)}, indent=1, default=str))

                database_unavailable = [x for x in unavailable
                                        if x.code == "database_unavailable"]
                refused = driver.summary()["refusals"]
                unhandled = unhandled_errors(system)
                failed = failures(settled, driver, MIN_ACKNOWLEDGED, more=[
                    (not o.pending, f"not recovered {RECOVERY_TIMEOUT_S:g} s after the "
                                    f"cluster's start: {o.pending}"),
                    (bool(database_unavailable),
                     f"no 503 database_unavailable while the cluster was down (answers then: "
                     f"{figures['answers_while_down']})"),
                    (not no_retry_after, f"503s without Retry-After: {dict(no_retry_after)}"),
                    (not unhandled, f"requests that failed unhandled (500s, in the services' logs): "
                                    f"{ {s: len(v) for s, v in unhandled.items()} }: "
                                    f"{ {s: v[:2] for s, v in unhandled.items()} }"),
                    (not refused, f"workflows stopped by a final refusal: {refused}, times "
                                  f"from the cluster's start (stopped "
                                  f"{o.since_start(o.stopped_at)}, answering "
                                  f"{o.since_start(o.up_at)}): {refusals[:5]}"),
                ])
                assert not failed, "\n".join(failed) + f"\n(logs: {system.log_dir})"
        finally:
            await asyncio.to_thread(infra.stop_postgres, port, state)
