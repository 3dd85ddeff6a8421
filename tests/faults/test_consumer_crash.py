"""Issue 15, fault 5: a consumer killed between its database commit and its offset commit.

That window lasts microseconds, so a timed kill -9 would find it by luck: the failpoint
`consumer.before_offset_commit` (D55, shared/failpoints.py) makes a process SIGKILL itself the
N-th time it gets there, right after a fetch's records are in its database and before their
offsets are committed. Every process of the system is started with it (the System's environment
is the system's, not a service's; only the consumers reach it), under load through the gateway.
Each consuming service dies there a few seconds into the load; the test sees it exit, starts it
again WITHOUT the failpoint (the System's environment is changed once every process has started,
so a restart is unarmed), and waits until it serves again. The records of the killed batch are
then delivered again (their offsets were never committed) and must be dropped by the processed
marks: the accounting must show no duplicated effect and complete processed marks, and each
service's log must show the failpoint reached and, after the restart, the last record of the
killed batch consumed again as a duplicate (or skipped again, when no handler wants it).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.failpoints import BEFORE_OFFSET_COMMIT
from shared.store import EventStore
from tests.e2e.conftest import SECRET, system_of_its_own
from tests.faults.accounting import Accounting, open_stores
from tests.faults.driver import LoadDriver
from tests.faults.report import Row, publish
from tests.faults.scenario import failures, fault_env, ready, settle, unhandled_errors
from tests.support import eventually
from tooling.launcher import System

RATE_PER_S = 2.0  # new patient workflows a second
# The failpoint fires the N-th time a process gets there (once per partition of a fetch that
# had records): consumers handle ~10-25 records a second at this rate: 2-10 s into the load.
FAILPOINT_AT = 60
ARMED = ("randomization", "dosing", "safety", "efficacy", "audit")  # the consuming services
DOWN_S = 1.0  # how long a dead process stays dead (the launcher's first pause, D46)
STEADY_S = 3.0  # load on the whole recovered system before it stops
CRASH_TIMEOUT_S = 40.0  # every armed service must have reached its failpoint by then
# A busy machine is slow, not wrong: as long as the kill and replica tests give.
RECOVERY_TIMEOUT_S = 60.0  # a restarted process not serving again this long after failed
# How long the site retries one write (the load's wind-down waits): longer than the outage and
# the recovery allowed after it, or a slow recovery within its allowance fails a site's write.
REQUEST_DEADLINE_S = 90.0
BUDGET_S = 240.0  # the test body's, from its start: the accounting is cut off after it
MIN_ACKNOWLEDGED = 80  # writes the run must have had acknowledged

pytestmark = pytest.mark.timeout(300)


@dataclass
class Crash:
    """One process that died: how (exit code), when (monotonic, wall clock), and when it was
    started again, ready, and served its first write (the ledger: filed a record) after."""

    service: str
    code: int
    died_at: float  # when the test saw it exit
    died_wall: datetime
    restarted_at: float | None = None
    ready_at: float | None = None
    first_write_at: float | None = None


def say(began: float, what: str) -> None:
    print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)


async def recover(system: System, crash: Crash, driver: LoadDriver,
                  stores: dict[str, EventStore]) -> None:
    """Start the dead service again (unarmed: `system.env` no longer names the failpoint),
    wait until it is ready and has served a write again."""
    head_before = await stores["audit"].head()
    await asyncio.sleep(DOWN_S)  # the outage, a duration: the load meets it dead
    crash.restarted_at = time.monotonic()
    system.start_one(crash.service)
    async with httpx.AsyncClient(timeout=2) as client:
        await eventually(lambda: ready(client, system, crash.service), RECOVERY_TIMEOUT_S,
                         f"{crash.service} ready again")
    crash.ready_at = time.monotonic()
    if crash.service == "audit":
        async def filing() -> bool:
            return bool(await stores["audit"].head() > head_before)
        await eventually(filing, RECOVERY_TIMEOUT_S, "the ledger filing again")
        crash.first_write_at = time.monotonic()
    else:
        restarted = crash.restarted_at
        ack = await eventually(lambda: driver.first_ack_through(crash.service, restarted),
                               RECOVERY_TIMEOUT_S, f"a write acknowledged by {crash.service}")
        crash.first_write_at = ack.acked_at


async def watch(system: System, driver: LoadDriver, stores: dict[str, EventStore],
                crashes: dict[str, Crash], extra_exits: list[str], stop: asyncio.Event,
                began: float) -> None:
    """Until `stop`: each process that exits is recorded and started again (once: a second
    exit of a restarted process is recorded in `extra_exits` and not restarted)."""
    recoveries: list[asyncio.Task[None]] = []
    while not stop.is_set():
        for service, proc in list(system.processes.items()):
            code = proc.poll()
            if code is None:
                continue
            if service in crashes:
                if crashes[service].restarted_at is not None and (
                        f"{service} exited {code}" not in extra_exits):
                    extra_exits.append(f"{service} exited {code}")
                continue
            crash = crashes[service] = Crash(service, code, time.monotonic(), datetime.now(UTC))
            say(began, f"{service} exited with {code}; restarting it unarmed")
            recoveries.append(asyncio.create_task(recover(system, crash, driver, stores)))
        await asyncio.sleep(0.05)  # the poll's interval; the condition is each exit
    for task in recoveries:  # a recovery that failed leaves its Crash incomplete: reported
        if not task.done():
            task.cancel()
    await asyncio.gather(*recoveries, return_exceptions=True)


# --- the services' logs ---------------------------------------------------------------------


def log_lines(system: System, service: str) -> list[dict[str, Any]]:
    """The service's JSON log lines (TRIAL_LOG_FORMAT=json), across its restart."""
    lines = []
    for text in (system.log_dir / f"{service}.log").read_text(errors="replace").splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


@dataclass
class Redelivery:
    """What a service's log says about its failpoint: reached, the last record of the killed
    batch, and how that record was consumed after the restart."""

    reached: bool
    record: str | None = None  # topic/partition@offset (event id)
    before: str | None = None  # its outcome before the kill
    after: list[str] | None = None  # its outcomes after the restart

    @property
    def ok(self) -> bool:
        if not self.reached or self.record is None or not self.after:
            return False
        expected = "duplicate" if self.before == "handled" else self.before
        return all(outcome == expected for outcome in self.after)


def redelivery(system: System, service: str) -> Redelivery:
    lines = log_lines(system, service)
    fired = next((i for i, e in enumerate(lines) if re.search(
        rf"failpoint {re.escape(BEFORE_OFFSET_COMMIT)} reached", str(e.get("event", "")))), None)
    if fired is None:
        return Redelivery(False)
    consumed = [e for e in lines[:fired] if e.get("event") == "record consumed"]
    if not consumed:
        return Redelivery(True)
    last = consumed[-1]
    where = (last.get("topic"), last.get("partition"), last.get("offset"))
    after = [str(e.get("outcome")) for e in lines[fired + 1:] if e.get("event") == "record consumed"
             and (e.get("topic"), e.get("partition"), e.get("offset")) == where]
    return Redelivery(True, f"{where[0]}/{where[1]}@{where[2]} ({last.get('event_id')})",
                      str(last.get("outcome")), after)


# --- the test -------------------------------------------------------------------------------


def rows_of(crashes: dict[str, Crash], driver: LoadDriver, result: Accounting,
            logs: dict[str, Redelivery]) -> list[Row]:
    rows = []
    for c in sorted(crashes.values(), key=lambda c: c.died_at):
        acks = [a for a in driver.acks if a.acked_at >= c.died_at]
        lost = [x for x in result.lost if x.acked_at >= c.died_at]
        rows.append(Row(
            f"kill at {BEFORE_OFFSET_COMMIT}", c.service, len(acks), len(lost),
            sum(d.store == c.service for d in result.duplicated),
            result.kafka.duplicates_by_service.get(c.service, 0),
            None if c.ready_at is None else round(c.ready_at - c.died_at, 2),
            None if c.first_write_at is None else round(c.first_write_at - c.died_at, 2),
            {"exit_code": c.code, "failpoint_at": FAILPOINT_AT, "down_s": DOWN_S,
             "rate_per_s": RATE_PER_S,
             "redelivered": logs[c.service].__dict__ if c.service in logs else None}))
    rows.append(Row(f"kill at {BEFORE_OFFSET_COMMIT}, every consumer", "all (whole run)",
                    len(driver.acks), len(result.lost), len(result.duplicated),
                    result.kafka.duplicate_ids,
                    detail={"driver": driver.summary(), "accounting": result.summary()}))
    return rows


async def test_consumer_killed_before_its_offset_commit(pg_dsn: str | None,
                                                       tmp_path: Path) -> None:
    """Each consumer killed by its failpoint under load and started again unarmed: the records
    it had applied and not committed are delivered again and dropped, nothing applied twice,
    nothing lost, every processed mark there."""
    protocol, env = fault_env(tmp_path)
    env = {**env, "TRIAL_FAILPOINT": f"{BEFORE_OFFSET_COMMIT}:{FAILPOINT_AT}",
           "TRIAL_LOG_FORMAT": "json"}
    began = time.monotonic()
    with system_of_its_own(pg_dsn, tmp_path, env=env) as system:
        # Every process has started armed; from now on a (re)start is not.
        system.env = {k: v for k, v in system.env.items() if k != "TRIAL_FAILPOINT"}
        say(began, "system ready, armed")
        async with open_stores(system.database_urls) as stores:
            driver = LoadDriver([system.url("gateway")], SECRET, protocol, RATE_PER_S,
                                request_deadline_s=REQUEST_DEADLINE_S)
            stop, stop_watch = asyncio.Event(), asyncio.Event()
            crashes: dict[str, Crash] = {}
            extra_exits: list[str] = []
            load_started = time.monotonic()
            load = asyncio.create_task(driver.run(stop))
            watcher = asyncio.create_task(
                watch(system, driver, stores, crashes, extra_exits, stop_watch, began))
            try:
                def all_recovered() -> bool:
                    return all(s in crashes and crashes[s].first_write_at is not None
                               for s in ARMED)
                try:
                    await eventually(all_recovered, CRASH_TIMEOUT_S + RECOVERY_TIMEOUT_S,
                                     "every consumer killed at its failpoint and recovered")
                except AssertionError:
                    pass  # what is missing is reported below, after the accounting
                died = {s: round(c.died_at - load_started, 1) for s, c in crashes.items()}
                say(began, f"crashed: {died} s into the load")
                await asyncio.sleep(STEADY_S)  # a duration of load on the recovered system
            finally:
                stop.set()
                await asyncio.wait_for(load, 3 * driver.request_deadline_s)
                stop_watch.set()
                await watcher
            say(began, "load stopped")
            try:  # bounded: a system that never recovers fails, not times out
                settled = await asyncio.wait_for(
                    settle(system, stores, driver, protocol, quiet_timeout=30.0),
                    max(15.0, began + BUDGET_S - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"no accounting within the test's budget ({BUDGET_S:g} s); crashes "
                    f"{crashes}, driver {driver.summary()} (logs: {system.log_dir})") from None
            say(began, f"settled: quiet {settled.quiet.quiet} after {settled.quiet.seconds:.1f} s")
        result = settled.result
        logs = {s: redelivery(system, s) for s in ARMED}
        rows = rows_of(crashes, driver, result, logs)
        publish(rows, f"kill every consumer at {BEFORE_OFFSET_COMMIT} under load")
        print(json.dumps({
            "crashes": {s: {"code": c.code, "died_s_into_load": round(c.died_at - load_started, 2),
                            "ready_s": None if c.ready_at is None else round(c.ready_at - c.died_at, 2),
                            "first_write_s": None if c.first_write_at is None
                            else round(c.first_write_at - c.died_at, 2)}
                        for s, c in crashes.items()},
            "redelivered": {s: r.__dict__ for s, r in logs.items()},
            "extra_exits": extra_exits, "driver": driver.summary(),
            "accounting": result.summary(), "quiet": settled.quiet.__dict__,
            "verify": settled.verified, "seconds": round(time.monotonic() - began, 1),
            "logs": str(system.log_dir)}, indent=1, default=str))

        not_killed = [s for s in ARMED if s not in crashes]
        wrong_exit = {s: c.code for s, c in crashes.items() if c.code != -signal.SIGKILL}
        unrecovered = [s for s, c in crashes.items() if c.first_write_at is None]
        not_reached = [s for s in ARMED if not logs[s].reached]
        not_redelivered = {s: r.__dict__ for s, r in logs.items() if r.reached and not r.ok}
        # A retry of a request whose process wrote and was killed before answering is told 409
        # idempotency_key_outcome_unknown (D25, D56): reported, not asserted. Any other final
        # refusal of this valid load is a wrong answer (a 404 patient_not_found above all, D33).
        refused = {k: n for k, n in driver.summary()["refusals"].items()
                   if "idempotency_key_outcome_unknown" not in k}
        enrolled = {a.workflow: a.acked_at for a in driver.acks if a.step == "enrol"}
        died = {c.service: round(c.died_at - load_started, 2) for c in crashes.values()}
        restarted = {c.service: round(c.restarted_at - load_started, 2)
                     for c in crashes.values() if c.restarted_at is not None}
        refusals = [{"workflow": x.workflow, "step": x.step, "answer": f"{x.status} {x.code}",
                     "attempts": x.attempts,
                     "enrolled_s": None if x.workflow not in enrolled
                     else round(enrolled[x.workflow] - load_started, 2),
                     "refused_s": round(x.at - load_started, 2)} for x in driver.refusals]
        unhandled = unhandled_errors(system)
        failed = failures(settled, driver, MIN_ACKNOWLEDGED, more=[
            (not not_killed, f"never killed at the failpoint within {CRASH_TIMEOUT_S:g} s: "
                             f"{not_killed} (killed: {sorted(crashes)})"),
            (not wrong_exit, f"exited otherwise than by SIGKILL: {wrong_exit}"),
            (not extra_exits, f"processes that died again after their unarmed restart: "
                              f"{extra_exits}"),
            ("gateway" not in crashes, "the gateway exited"),
            (not unrecovered, f"not serving again within {RECOVERY_TIMEOUT_S:g} s of the "
                              f"restart: {unrecovered}"),
            (not not_reached, f"no 'failpoint {BEFORE_OFFSET_COMMIT} reached' in the logs of "
                              f"{not_reached}"),
            (not not_redelivered, f"the killed batch's last record not consumed again as a "
                                  f"duplicate after the restart: {not_redelivered}"),
            (not unhandled, f"requests that failed unhandled (500s, in the services' logs): "
                            f"{ {s: len(v) for s, v in unhandled.items()} }: "
                            f"{ {s: v[:2] for s, v in unhandled.items()} }"),
            (not refused, f"workflows stopped by a final refusal: {refused}; times from the "
                          f"load's start (crashes {died}, restarts {restarted}): "
                          f"{refusals[:10]}"),
        ])
        assert not failed, "\n".join(failed) + f"\n(logs: {system.log_dir})"
