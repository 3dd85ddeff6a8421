"""Issue 15, first fault: every process killed outright (SIGKILL) in turn, under load.

While site systems run the whole patient workflow through the gateway at a steady rate (with
Idempotency-Keys and retries, `tests.faults.driver`), each service and then the gateway is
killed with -9 at a moment it has work half done (a relay's batch on the broker and not yet
checkpointed, the ledger filing, requests in flight: `tests.faults.moments`), left dead for a
couple of seconds of load, started again and waited for. Then the load stops, the system is left
to go quiet, and the accounting (`tests.faults.accounting`) proves:

- no request was answered 500 (a dead service is a 502/503/504 or no answer: retried);
- no acknowledged write is lost: each is in its service's store, as the site was told;
- nothing took effect twice: no write (a retry under its key) and no consumed event (a record
  redelivered after a consumer died before committing its offset) changed a store twice;
- every event of every store is on Kafka, none twice (a relay killed between publishing and
  saving its checkpoint must not republish; consumers would drop the copies, but pharmacies and
  other readers see them);
- the audit ledger holds every record once and its hash chain (and anchors) verify;
- every consumer has handled exactly the records of its topics; randomization numbers are 1..n;
- and how long each process took to recover: to ready, and to its first acknowledged write
  (the audit ledger: to its first record filed again).

The table of rows (fault | service | writes acknowledged | lost | duplicated | duplicates on Kafka
| time to recover) is printed and appended to `TRIAL_FAULTS_REPORT` when set.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from shared.settings import SERVICES
from shared.store import EventStore
from tests.e2e.conftest import SECRET, system_of_its_own
from tests.faults.accounting import Accounting, cluster_id, open_stores
from tests.faults.driver import LoadDriver
from tests.faults.moments import BrokerTail, Moment, requests_in_flight
from tests.faults.report import Row, publish
from tests.faults.scenario import failures, fault_env, ready, settle, windows
from tests.support import eventually
from tooling.launcher import System

RATE_PER_S = 2.0  # new patient workflows a second
DOWN_S = 2.0  # how long each killed process stays dead, the load running against it
STEADY_S = 3.0  # load on the recovered system before the next kill
MOMENT_TIMEOUT_S = 15.0  # how long to wait for a harmful moment to kill in (then kill anyway)
RECOVERY_TIMEOUT_S = 60.0  # a process not serving writes again this long after its restart failed
WARM_UP_WORKFLOWS = 3  # whole workflows through before the first kill
MIN_ACKNOWLEDGED = 250  # writes the run must have had acknowledged, faults and all

pytestmark = pytest.mark.timeout(480)


@dataclass
class Recovery:
    """One kill: when (monotonic and wall clock), and when the process was ready again and
    served its first write after it."""

    service: str
    moment: Moment
    killed_at: float
    killed_wall: datetime
    restarted_at: float
    ready_at: float
    first_write_at: float | None


async def kill_at_moment(system: System, service: str, driver: LoadDriver,
                         stores: dict[str, EventStore], cluster: str | None,
                         killed: list[tuple[float, datetime]]) -> Moment:
    """kill -9 `service` the moment a kill does harm (`tests.faults.moments`); when (monotonic,
    wall clock) is appended to `killed`."""
    proc = system.processes[service]

    def kill() -> None:
        proc.kill()
        killed.append((time.monotonic(), datetime.now(UTC)))

    if service == "gateway":
        return await requests_in_flight(driver, MOMENT_TIMEOUT_S, kill)
    async with BrokerTail(system.bootstrap) as tail:
        if service == "audit":
            return await tail.filing(MOMENT_TIMEOUT_S, kill)
        return await tail.mid_batch(service, stores[service], cluster, MOMENT_TIMEOUT_S, kill)


async def kill_and_restart(system: System, service: str, driver: LoadDriver,
                           stores: dict[str, EventStore], cluster: str | None) -> Recovery:
    """kill -9 `service` at a moment it has work half done, let the load meet it dead for
    DOWN_S, start it again, wait until it is ready and has served a write (the ledger: filed a
    record) again, then give the load STEADY_S on the whole system before the next fault. A
    process that serves no write within RECOVERY_TIMEOUT_S of its restart has not recovered:
    its Recovery says so (`first_write_at` None) and the test stops killing."""
    proc = system.processes[service]
    killed: list[tuple[float, datetime]] = []
    moment = await kill_at_moment(system, service, driver, stores, cluster, killed)
    (killed_at, killed_wall), = killed
    head_before = await stores["audit"].head()  # the ledger's, frozen if audit is the one dead
    await asyncio.to_thread(proc.wait)
    await asyncio.sleep(DOWN_S)  # the outage itself, a duration: the load runs against it
    restarted_at = time.monotonic()
    system.start_one(service)
    async with httpx.AsyncClient(timeout=2) as client:
        await eventually(lambda: ready(client, system, service), 90, f"{service} ready again")
    ready_at = time.monotonic()
    first_write_at: float | None = None
    try:
        if service == "audit":
            async def filing() -> bool:
                return bool(await stores["audit"].head() > head_before)
            await eventually(filing, RECOVERY_TIMEOUT_S, "the ledger filing again")
            first_write_at = time.monotonic()
        else:
            ack = await eventually(lambda: driver.first_ack_through(service, restarted_at),
                                   RECOVERY_TIMEOUT_S, f"a write acknowledged by {service} again")
            first_write_at = ack.acked_at
    except AssertionError:  # not recovered: recorded (first_write_at None), the run ends here
        return Recovery(service, moment, killed_at, killed_wall, restarted_at, ready_at, None)
    await asyncio.sleep(STEADY_S)  # a duration of load, not a condition
    return Recovery(service, moment, killed_at, killed_wall, restarted_at, ready_at,
                    first_write_at)


def rows_of(recoveries: list[Recovery], driver: LoadDriver, result: Accounting,
            ended_at: float) -> list[Row]:
    """One row per kill, over the writes acknowledged from it to the next kill, and a total."""
    rows = []
    for r, w in windows(recoveries, driver, result, ended_at):
        rows.append(Row(
            "kill -9", r.service, w.acknowledged, w.lost, w.duplicated,
            result.kafka.duplicates_by_service.get(r.service, 0),
            round(r.ready_at - r.killed_at, 2),
            None if r.first_write_at is None else round(r.first_write_at - r.killed_at, 2),
            {"killed": r.moment.what, "moment_hit": r.moment.hit, "down_s": DOWN_S,
             "steady_s": STEADY_S, "rate_per_s": RATE_PER_S,
             "restart_to_ready_s": round(r.ready_at - r.restarted_at, 2)}))
    rows.append(Row("kill -9, each in turn", "all (whole run)", len(driver.acks),
                    len(result.lost), len(result.duplicated), result.kafka.duplicate_ids,
                    detail={"driver": driver.summary(), "accounting": result.summary()}))
    return rows


async def test_kill_each_process_under_load(pg_dsn: str | None, tmp_path: Path) -> None:
    """Every process killed -9 in turn under load: nothing acknowledged lost, nothing applied
    or published twice, the ledger whole and verified, every consumer complete."""
    protocol, env = fault_env(tmp_path)
    started = time.monotonic()
    with system_of_its_own(pg_dsn, tmp_path, env=env) as system:
        async with open_stores(system.database_urls) as stores:
            driver = LoadDriver([system.url("gateway")], SECRET, protocol, RATE_PER_S)
            stop = asyncio.Event()
            load = asyncio.create_task(driver.run(stop))
            recoveries: list[Recovery] = []
            try:
                await eventually(lambda: len(driver.acks_of("assessment")) >= WARM_UP_WORKFLOWS,
                                 90, "the first whole workflows")
                cluster = await cluster_id(system.bootstrap)
                for service in (*SERVICES, "gateway"):
                    recovery = await kill_and_restart(system, service, driver, stores, cluster)
                    recoveries.append(recovery)
                    if recovery.first_write_at is None:
                        break  # it did not recover: account for what happened, then fail
            finally:
                stop.set()
                await asyncio.wait_for(load, 3 * driver.request_deadline_s)
            ended_at = time.monotonic()
            settled = await settle(system, stores, driver, protocol)
        rows = rows_of(recoveries, driver, settled.result, ended_at)
        publish(rows, "kill -9 each process in turn under load")
        print(json.dumps({"kills": {r.service: r.moment.what for r in recoveries},
                          "driver": driver.summary(), "accounting": settled.result.summary(),
                          "quiet": settled.quiet.__dict__, "verify": settled.verified,
                          "seconds": round(time.monotonic() - started, 1),
                          "logs": str(system.log_dir)}, indent=1, default=str))

        unrecovered = [r.service for r in recoveries if r.first_write_at is None]
        failed = failures(settled, driver, MIN_ACKNOWLEDGED, more=[
            (not unrecovered, f"no write served again within {RECOVERY_TIMEOUT_S:g} s of the "
                              f"restart of {unrecovered} (refusals: {driver.summary()['refusals']})")])
        assert not failed, "\n".join(failed) + f"\n(logs: {system.log_dir})"
