"""Issue 15, fault 2: two replicas of every service, as processes on one database and in one
consumer group each; one replica killed with -9 under load, then brought back.

Replica set A (five services and a gateway) is started as every fault test starts its system;
once A is ready, replica set B: the same broker, the same databases, the same environment, ports
and a log folder of its own, hence the same service names and so the same consumer groups. The
site systems' load goes to both gateways in turn (each attempt to the next, as a load balancer
would); gateway A reaches A's services, B's reaches B's.

Then each service in turn (and the gateway) loses its replica in A, at a moment the kill does
harm (the relay that leads has a batch on the broker and not checkpointed, the ledger filing,
requests in flight: `tests.faults.moments`); the replica in B serves alone under load (the
driver's retries reach it; its consumer gets the dead member's partitions once the group has
rebalanced) until it has acknowledged a write of the service (at least DOWN_S), then the killed
one is started again and waited for: ready, its consumer reading again, answering a read
through its own gateway again (the gateway: a write through it; the table's "first write" is
that answer). Then the same for a replica in B (after the kills in
A, B leads every relay: this one hands leadership back to A). So each set has lost one replica,
and every relay's leadership has moved at least once.

The accounting (`tests.faults.scenario.failures`) then proves, beside what test_kill_services
proves: one relay per store published at a time (every store event on Kafka exactly once), every
write acknowledged through either gateway in its store once. And the replica checks: every
service acknowledged writes through both gateways (both replicas served), the surviving replica
served while the other was down (below; the ledger: the twin filed records meanwhile), and at
the end exactly one replica of each publishing service reports `"leading": true` in its
/healthz (D53).

The surviving replica of a service whose writes wait for its consumer (D33, D37: a dose, an
adverse event, an assessment) cannot acknowledge them until the group has taken the dead member
out: Kafka does so when the member's session times out (10 s; the embedded broker's 2 s here).
A write the twin acknowledged within that timeout (and a few seconds of retries) of the kill is
asserted, and the time is reported (`twin_first_write_s`).

Each replica records the protocol version it applies when it starts; replicas (and restarts)
must record it once per store. Both replicas of dosing and efficacy sweep for missed visits:
after the load, dosing and efficacy are restarted (one set, then the other) to sweep every
SWEEP_INTERVAL_S, then their clock (`TRIAL_CLOCK_FILE`) is moved CLOCK_JUMP_DAYS on, so that
every patient has visits whose window closed and both replicas' sweeps find them at once: each
closed visit must be recorded missed once, however the two sweeps met. (Not during the load: a
pass is a transaction per patient, and four processes sweeping every few seconds starve two
cores.)

A final refusal the site gets is not asserted away: a dose refused 404 `patient_not_found` for a
patient the API has randomized is a defect (D33: never "unknown" because a consumer lags), and so
is a write still unanswered at the driver's deadline (the replica set was meant to keep
serving). 409 `idempotency_key_outcome_unknown` is the answer to a retry of a request whose
replica wrote and died before answering (D25); it is reported, not asserted.

Two audit replicas each run an anchorer (services/audit/anchors.py): the same chain head can be
anchored twice. The figures are reported (`anchors`); `GET /v1/audit/verify` is asserted ok
through both gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from deploy import infra
from services.audit.anchors import ledger_id, read_anchors
from shared.clock import FileClock
from shared.kafka import client_options
from shared.settings import SERVICES, Settings
from shared.store import EventStore
from tests.e2e.conftest import SECRET, system_of_its_own, token
from tests.faults.accounting import (
    PUBLISHERS,
    Accounting,
    cluster_id,
    consumer_specs,
    events_of,
    kafka_settings,
    open_stores,
)
from tests.faults.driver import LoadDriver
from tests.faults.moments import Moment
from tests.faults.report import Row, publish
from tests.faults.scenario import ObservedDriver, failures, fault_env, ready, settle, windows
from tests.faults.test_kill_services import kill_at_moment
from tests.support import eventually
from tooling.launcher import System

# New patient workflows a second: half test_kill_services' rate. Twelve service processes,
# PostgreSQL and Kafka run on two cores that other test runs share: at 2 a second the load
# average reached 12-15, efficacy's consumers (200-900 ms a record) fell behind, and after
# efficacy's kill assessments waited out the driver's 60 s deadline on 503 not_caught_up (3 runs
# of 4 on PostgreSQL + Kafka).
RATE_PER_S = 1.0
DOWN_S = 3.0  # how long the killed replica stays dead at least, its twin serving alone
STEADY_S = 2.0  # load on both replicas again before the next kill
RECOVERY_TIMEOUT_S = 60.0  # a replica not serving again this long after its restart failed
WARM_UP_WORKFLOWS = 3  # whole workflows through before the first kill
MIN_ACKNOWLEDGED = 250  # writes the run must have had acknowledged, faults and all
# Which replica is killed, in order: every process of A, then one of B (its relay leads by then).
KILLS: tuple[tuple[str, str], ...] = (*((s, "A") for s in (*SERVICES, "gateway")),
                                      ("randomization", "B"))
CONSUMERS = frozenset(consumer_specs())  # the services whose /healthz shows a consumer
TWIN_SLACK_S = 5.0  # beyond the session timeout: the catch-up wait (2 s) and the retries' pauses
SWEEP_INTERVAL_S = 1.0  # dosing's and efficacy's missed-visit sweeps, after the clock jump
# Past the week-1 to week-3 doses' windows (and methotrexate's week 4) and the week-4
# assessment's (day 28, +/- 2 days), short of a second assessment missed (lost to follow-up).
CLOCK_JUMP_DAYS = 31
SWEEP_STABLE_S = 3 * SWEEP_INTERVAL_S  # no new missed visit this long: both sweeps are done
SWEEP_TIMEOUT_S = 60.0

# About 90 s on SQLite + Tansu and 115 s on PostgreSQL + Kafka on a quiet machine; 235 s was seen
# on PostgreSQL + Kafka with another fault test running beside it, and on 2026-12-02's slow
# machine 195 s embedded and past 240 s on Kafka with every kill recovered (each restart 13-26 s
# under a load average of 13): the budget is for a hang, not for a slow day.
pytestmark = pytest.mark.timeout(420)


@contextmanager
def second_replica_set(a: System, folder: Path) -> Iterator[System]:
    """Replica set B of `a`: the same broker, databases and environment (so the same consumer
    groups), ports and logs of its own; started and ready, stopped after.

    Started only once A is ready: each service migrates its database when it starts, and two
    processes migrating one empty database at once is not what this test is about (the chart
    runs the migrations once, in a Job, before any replica starts)."""
    b = System(bootstrap=a.bootstrap, database_urls=dict(a.database_urls),
               ports={s: infra.free_port() for s in a.ports}, log_dir=folder / "logs",
               env=dict(a.env))
    try:
        b.start()
        b.wait_ready()
        yield b
    finally:
        b.stop()


async def health(client: httpx.AsyncClient, system: System, service: str) -> dict[str, Any]:
    """The replica's /healthz detail ({} when it does not answer)."""
    try:
        r = await client.get(f"{system.url(service)}/healthz")
        detail = r.json().get("detail", {}) if r.status_code == 200 else {}
        return detail if isinstance(detail, dict) else {}
    except (httpx.HTTPError, ValueError):
        return {}


async def leaders(sets: Mapping[str, System]) -> dict[str, dict[str, bool | None]]:
    """For each publishing service, which replica's relay reports `leading` (None: no answer)."""
    found: dict[str, dict[str, bool | None]] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for service in PUBLISHERS:
            found[service] = {}
            for name, system in sets.items():
                relay = (await health(client, system, service)).get("relay")
                found[service][name] = relay.get("leading") if isinstance(relay, dict) else None
    return found


async def consumers(sets: Mapping[str, System]) -> dict[str, dict[str, Any]]:
    """Each consuming replica's /healthz consumer detail (None: no answer)."""
    found: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for service in sorted(CONSUMERS):
            found[service] = {name: (await health(client, system, service)).get("consumer")
                              for name, system in sets.items()}
    return found


async def groups(bootstrap: str) -> dict[str, Any]:
    """Each service's consumer group as the broker describes it: state and members (a
    diagnosis only: what the broker cannot describe is reported as its error)."""
    found: dict[str, Any] = {}
    for group in sorted(CONSUMERS):
        admin = AIOKafkaAdminClient(**client_options(kafka_settings(bootstrap)))
        try:
            await admin.start()
            for response in await admin.describe_consumer_groups([group]):
                for g in response.groups:
                    found[g[1]] = {"error_code": g[0], "state": g[2], "members": len(g[5])}
        except Exception as exc:
            found[group] = {"error": repr(exc)}
        finally:
            await admin.close()
    return found


@dataclass
class ReplicaKill:
    """One replica killed: which, whether its relay led, when (monotonic and wall clock), and
    when it was ready, its consumer reading, and answering through its own gateway again (the
    gateway: a write through it); what its twin did meanwhile."""

    service: str
    replica: str  # "A" or "B"
    led: bool | None  # its relay was the one publishing when it was killed
    moment: Moment
    killed_at: float
    killed_wall: datetime
    restarted_at: float = 0.0
    ready_at: float = 0.0
    reading_at: float | None = None  # its consumer has partitions again (None: no consumer)
    serving_at: float | None = None  # answering through its own gateway (`PROBES`) again
    own_first_write_at: float | None = None  # a write through its own gateway again (or None)
    served_alone: int = 0  # writes the twin acknowledged (audit: ledger entries filed) meanwhile
    twin_first_write_at: float | None = None  # the twin's first write of the service after it
    not_caught_up: int = 0  # 503 not_caught_up answers meanwhile (the group rebalancing)
    leaders_after: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    failed: str | None = None  # what did not recover

    @property
    def name(self) -> str:
        return f"{self.service} ({self.replica})"


async def consumer_reading(client: httpx.AsyncClient, system: System, service: str) -> bool:
    consumer = (await health(client, system, service)).get("consumer")
    return isinstance(consumer, dict) and consumer.get("reading") is True


# What a replica is asked through its own gateway once restarted: a read of the last patient
# the load took through every step (the ledger: its last entry). A read, not a write: the
# driver sends each attempt to the next gateway of its list and each workflow makes six POSTs,
# so while no request is retried, a step goes through the same gateway in every workflow (run 5
# on SQLite: no adverse event went through gateway A for the 60 s after safety's restart).
PROBES = {"randomization": "/v1/patients/{id}", "dosing": "/v1/patients/{id}/schedule",
          "safety": "/v1/safety/status", "efficacy": "/v1/patients/{id}/efficacy",
          "audit": "/v1/audit/events?limit=1"}


async def serves(client: httpx.AsyncClient, system: System, service: str,
                 driver: LoadDriver) -> bool:
    """`service`'s replica in `system` answers 200 to a read through `system`'s gateway."""
    last = next(a for a in reversed(driver.acks) if a.step == "assessment")
    site = driver.workflows[last.workflow].site
    auth = driver.auth[site] if service != "audit" else {
        "Authorization": f"Bearer {token('admin')}"}
    try:
        r = await client.get(system.url("gateway") + PROBES[service].format(
            id=last.body["patient_id"]), headers=auth)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


async def kill_replica(sets: Mapping[str, System], service: str, replica: str,
                       driver: ObservedDriver, stores: dict[str, EventStore],
                       cluster: str | None) -> ReplicaKill:
    """kill -9 `service`'s replica in set `replica` at a moment it has work half done, let its
    twin serve alone for DOWN_S, start it again and wait until it is ready, its consumer reads
    again and it answers through its own gateway again (`PROBES`; the gateway: a write through
    it); then STEADY_S of load before the next kill. A replica that does not get there within
    RECOVERY_TIMEOUT_S is recorded (`failed`) and the test stops killing."""
    system = sets[replica]
    twin = next(s for name, s in sets.items() if name != replica)
    own_gateway, twin_gateway = system.url("gateway"), twin.url("gateway")
    proc = system.processes[service]
    led = (await leaders({replica: system}))[service][replica] if service in PUBLISHERS else None
    killed: list[tuple[float, datetime]] = []
    moment = await kill_at_moment(system, service, driver, stores, cluster, killed)
    (killed_at, killed_wall), = killed
    k = ReplicaKill(service, replica, led, moment, killed_at, killed_wall)
    ledger_head = await stores["audit"].head()
    await asyncio.to_thread(proc.wait)

    async def twin_served() -> bool:
        if service == "audit":  # the twin's ledger files what the group gives it
            return await stores["audit"].head() > ledger_head
        return twin_first_write(driver, twin_gateway, service, killed_at) is not None

    # Down until its twin has served alone (a consumer's: once the group has given it the dead
    # member's partitions, after the session timeout), at least DOWN_S; past the bound, the
    # twin_late assertion names it.
    await asyncio.sleep(DOWN_S)  # the outage's least length, a duration
    with contextlib.suppress(AssertionError):
        await eventually(twin_served, session_s(system) + TWIN_SLACK_S,
                         f"{service}'s twin serving alone")
    k.restarted_at = time.monotonic()
    system.start_one(service)
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            await eventually(lambda: ready(client, system, service), 90,
                             f"{k.name} ready again")
            k.ready_at = time.monotonic()
            if service == "audit":
                k.served_alone = await stores["audit"].head() - ledger_head
            else:
                k.served_alone = sum(
                    1 for a in driver.acks if a.gateway == twin_gateway
                    and killed_at <= a.acked_at <= k.ready_at
                    and (service == "gateway" or a.service == service))
            k.not_caught_up = sum(1 for x in driver.answers if x.code == "not_caught_up"
                                  and killed_at <= x.at <= k.ready_at)
            if service in CONSUMERS:
                await eventually(lambda: consumer_reading(client, system, service),
                                 RECOVERY_TIMEOUT_S, f"{k.name}'s consumer reading again")
                k.reading_at = time.monotonic()
            if service == "gateway":
                def through_own() -> Any:
                    return next((a for a in driver.acks if a.gateway == own_gateway
                                 and a.sent_at > k.restarted_at), None)
                ack = await eventually(through_own, RECOVERY_TIMEOUT_S,
                                       f"a write acknowledged through {k.name} again")
                k.serving_at = ack.acked_at
            else:
                await eventually(lambda: serves(client, system, service, driver),
                                 RECOVERY_TIMEOUT_S, f"{k.name} answering through its gateway")
                k.serving_at = time.monotonic()
        except AssertionError as exc:  # not recovered: recorded, the run ends here
            k.failed = str(exc)
            return k
        finally:
            k.twin_first_write_at = twin_first_write(driver, twin_gateway, service, killed_at)
    await asyncio.sleep(STEADY_S)  # a duration of load, not a condition
    k.own_first_write_at = next((a.acked_at for a in driver.acks if a.gateway == own_gateway
                                 and a.sent_at > k.restarted_at
                                 and (service == "gateway" or a.service == service)), None)
    k.leaders_after = await leaders(sets)
    return k


def session_s(system: System) -> float:
    """The consumers' group session of `system`'s processes, in seconds."""
    return int(system.env.get("TRIAL_KAFKA_SESSION_TIMEOUT_MS",
                              Settings().kafka_session_timeout_ms)) / 1000


def twin_first_write(driver: LoadDriver, twin_gateway: str, service: str,
                     killed_at: float) -> float | None:
    """When the twin first acknowledged a write of `service` (the gateway: any) after the kill;
    None for the ledger, which takes no writes."""
    return next((a.acked_at for a in driver.acks if a.gateway == twin_gateway
                 and a.acked_at >= killed_at and (service == "gateway" or a.service == service)),
                None)


class Phases:
    """When each phase of the run ended (seconds from the start), printed as it goes: a run
    that outlasts its timeout still shows where the time went."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended: dict[str, float] = {}

    def done(self, phase: str, note: object = "") -> None:
        self.ended[phase] = round(time.monotonic() - self.started, 1)
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"[replicas {self.ended[phase]:6.1f} s, load {load}] {phase} {note}", flush=True)


def since(at: float | None, start: float) -> float | None:
    return None if at is None else round(at - start, 2)


async def protocol_activations(stores: Mapping[str, EventStore]) -> dict[str, int]:
    """Per store, how many times it recorded the protocol version its service applies."""
    return {name: sum(e.stream_id == f"protocol-{name}"
                      for e in await events_of(store, "ProtocolVersionActivated"))
            for name, store in stores.items()}


@dataclass
class Sweeps:
    """The missed visits both replicas' sweeps recorded after the clock jump, and the visits
    recorded more than once."""

    moved_to: str = ""
    seconds: float = 0.0
    recorded: dict[str, int] = field(default_factory=dict)  # per store
    patients: dict[str, int] = field(default_factory=dict)  # with a missed visit, per store
    twice: list[str] = field(default_factory=list)


async def closed_visits(stores: Mapping[str, EventStore]) -> dict[str, list[Any]]:
    return {name: await events_of(stores[name], "VisitMissed", "VisitHeld")
            for name in ("dosing", "efficacy")}


async def sweep_after_jump(clock_file: Path, stores: Mapping[str, EventStore],
                           sets: Mapping[str, System]) -> Sweeps:
    """Restart dosing and efficacy in one set, then the other (a rolling restart: each group
    keeps a member), sweeping every SWEEP_INTERVAL_S; then move their clock CLOCK_JUMP_DAYS on,
    so that both replicas' sweeps find the same closed visits at once, and wait until they have
    recorded them (nothing new for SWEEP_STABLE_S); then count each closed visit.

    Not both sets at once: on the embedded broker (Tansu 0.6.0) a group whose members are all
    replaced can keep a departed member as its leader, and the new members' SyncGroup is then
    answered REBALANCE_IN_PROGRESS for ever (seen in 2 runs of 10: dosing never read again).
    So the next set is restarted only once this set's consumers have their partitions (ready
    alone was not enough: both dosing replicas were replaced 3 s apart, and dosing stopped)."""
    s = Sweeps()
    sweepers = ("dosing", "efficacy")
    for system in sets.values():
        system.env |= {"TRIAL_DOSING_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S),
                       "TRIAL_EFFICACY_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S)}
        await asyncio.to_thread(system.stop, sweepers)
        for service in sweepers:
            system.start_one(service)
        await asyncio.to_thread(system.wait_ready)
        async with httpx.AsyncClient(timeout=5) as client:  # in its group before the next set
            for service in sweepers:
                await eventually(functools.partial(consumer_reading, client, system, service),
                                 RECOVERY_TIMEOUT_S, f"{service}'s consumer reading again")
    at = datetime.now(UTC) + timedelta(days=CLOCK_JUMP_DAYS)
    s.moved_to = at.isoformat(timespec="seconds")
    FileClock(clock_file).set(at)
    started = time.monotonic()
    last, since_change = -1, time.monotonic()
    while time.monotonic() - started < SWEEP_TIMEOUT_S:
        found = sum(len(v) for v in (await closed_visits(stores)).values())
        if found != last:
            last, since_change = found, time.monotonic()
        elif found and time.monotonic() - since_change >= SWEEP_STABLE_S:
            break
        await asyncio.sleep(0.5)  # the poll's interval; the condition is a count at rest
    s.seconds = round(time.monotonic() - started, 1)
    for name, visits in (await closed_visits(stores)).items():
        s.recorded[name] = len(visits)
        s.patients[name] = len({v.data["patient_id"] for v in visits})
        seen = Counter((v.data["patient_id"], v.data["kind"], v.data["week"]) for v in visits)
        s.twice += [f"{name}: {key} x{n}" for key, n in seen.items() if n > 1]
    return s


async def refusals(driver: LoadDriver, randomization: EventStore) -> list[dict[str, Any]]:
    """Every final refusal, with when (wall clock), and for a patient's write the patient's
    ArmAssigned: when it was recorded, whether the site was told (its randomization
    acknowledged, how long before)."""
    assigned = {e.data["patient_id"]: e
                for e in await events_of(randomization, "ArmAssigned")}
    now_wall, now = datetime.now(UTC), time.monotonic()
    found = []
    for r in driver.refusals:
        entry: dict[str, Any] = {
            "step": r.step, "path": r.path, "status": r.status, "code": r.code,
            "attempts": r.attempts, "key": r.key,
            "at": (now_wall - timedelta(seconds=now - r.at)).isoformat(), "body": r.body[:300]}
        parts = r.path.split("/")
        if len(parts) > 3 and parts[2] == "patients":
            patient = parts[3]
            arm = assigned.get(patient)
            entry["patient_id"] = patient
            entry["arm_assigned_recorded_at"] = arm.recorded_at.isoformat() if arm else None
            randomized = next((a for a in driver.acks if a.step == "randomize"
                               and a.workflow == r.workflow), None)
            entry["refused_s_after_randomize_acked"] = (
                None if randomized is None else round(r.at - randomized.acked_at, 2))
        found.append(entry)
    return found


@dataclass
class Anchors:
    """The audit anchors on the broker for the ledger: how many, how many distinct positions,
    and the positions anchored more than once (two anchorers, one per audit replica)."""

    published: int
    positions: int
    anchored_twice: int
    examples: list[int]


async def anchors_of(bootstrap: str, ledger: EventStore) -> Anchors:
    name = await ledger_id(ledger)
    found = await read_anchors(kafka_settings(bootstrap), name) if name else []
    counts = Counter(a.position for a in found)
    repeated = sorted(p for p, n in counts.items() if n > 1)
    return Anchors(len(found), len(counts), len(repeated), repeated[:10])


def served_by_gateway(driver: LoadDriver, sets: Mapping[str, System]) -> dict[str, dict[str, int]]:
    """Per service, the writes acknowledged through each set's gateway (hence by its replica)."""
    by_url = {system.url("gateway"): name for name, system in sets.items()}
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(sets, 0) for s in PUBLISHERS}
    for a in driver.acks:
        counts[a.service][by_url[a.gateway]] += 1
    return counts


def rows_of(kills: list[ReplicaKill], driver: LoadDriver, result: Accounting,
            ended_at: float) -> list[Row]:
    """One row per kill, over the writes acknowledged from it to the next kill, and a total."""
    rows = []
    for k, w in windows(kills, driver, result, ended_at):
        rows.append(Row(
            "kill -9 one of two replicas", k.name, w.acknowledged, w.lost, w.duplicated,
            result.kafka.duplicates_by_service.get(k.service, 0),
            round(k.ready_at - k.killed_at, 2) if k.ready_at else None,
            since(k.serving_at, k.killed_at),
            {"killed": k.moment.what, "moment_hit": k.moment.hit, "relay_led": k.led,
             "served_alone_by_twin": k.served_alone,
             "not_caught_up_503_while_down": k.not_caught_up,
             "twin_first_write_s": since(k.twin_first_write_at, k.killed_at),
             "own_first_write_s": since(k.own_first_write_at, k.killed_at),
             "consumer_reading_s": (None if k.reading_at is None
                                    else round(k.reading_at - k.killed_at, 2)),
             "restart_to_ready_s": (round(k.ready_at - k.restarted_at, 2) if k.ready_at
                                    else None),
             "leaders_after": k.leaders_after, "failed": k.failed,
             "down_s": DOWN_S, "steady_s": STEADY_S, "rate_per_s": RATE_PER_S}))
    rows.append(Row("kill -9 one of two replicas, each in turn", "all (whole run)",
                    len(driver.acks), len(result.lost), len(result.duplicated),
                    result.kafka.duplicate_ids,
                    detail={"driver": driver.summary(), "accounting": result.summary()}))
    return rows


async def test_kill_one_of_two_replicas_under_load(pg_dsn: str | None, tmp_path: Path) -> None:
    """Two replicas of every process on one database and one consumer group; one of each
    killed -9 in turn under load and brought back: nothing acknowledged lost, nothing applied
    or published twice, one relay per store publishing, both replicas serving."""
    protocol, env = fault_env(tmp_path)
    clock_file = tmp_path / "clock"  # absent until the jump: the wall clock
    env["TRIAL_CLOCK_FILE"] = str(clock_file)
    started = time.monotonic()
    phases = Phases()
    with (system_of_its_own(pg_dsn, tmp_path, env=env) as a,
          second_replica_set(a, tmp_path / "replica-b") as b):
        sets = {"A": a, "B": b}
        startup_s = round(time.monotonic() - started, 1)
        phases.done("both replica sets ready")
        leaders_at_start = await leaders(sets)
        async with open_stores(a.database_urls) as stores:
            driver = ObservedDriver([a.url("gateway"), b.url("gateway")], SECRET, protocol,
                                    RATE_PER_S)
            stop = asyncio.Event()
            load = asyncio.create_task(driver.run(stop))
            kills: list[ReplicaKill] = []
            try:
                await eventually(lambda: len(driver.acks_of("assessment")) >= WARM_UP_WORKFLOWS,
                                 90, "the first whole workflows")
                phases.done("warm-up")
                cluster = await cluster_id(a.bootstrap)
                for service, replica in KILLS:
                    kill = await kill_replica(sets, service, replica, driver, stores, cluster)
                    kills.append(kill)
                    phases.done(f"kill {kill.name}", {
                        "ready_s": since(kill.ready_at or None, kill.killed_at),
                        "serving_s": since(kill.serving_at, kill.killed_at),
                        "twin_first_write_s": since(kill.twin_first_write_at, kill.killed_at),
                        "failed": kill.failed})
                    if kill.failed:
                        break  # it did not recover: account for what happened, then fail
            finally:
                stop.set()
                await asyncio.wait_for(load, 3 * driver.request_deadline_s)
            ended_at = time.monotonic()
            phases.done("load drained", driver.summary()["refusals"])
            refused = await refusals(driver, stores["randomization"])
            sweeps = await sweep_after_jump(clock_file, stores, sets)
            phases.done("sweeps after the clock jump", sweeps.recorded)
            settled = await settle(a, stores, driver, protocol)
            phases.done("settled and accounted")
            activations = await protocol_activations(stores)
            async with httpx.AsyncClient(base_url=b.url("gateway"), timeout=60) as http:
                verified_b = (await http.get("/v1/audit/verify", headers={
                    "Authorization": f"Bearer {token('admin')}"})).json()
            anchors = await anchors_of(a.bootstrap, stores["audit"])
        leaders_at_end = await leaders(sets)
        consumers_at_end = await consumers(sets)
        groups_at_end = await groups(a.bootstrap)
        served = served_by_gateway(driver, sets)
        session = session_s(a)
        rows = rows_of(kills, driver, settled.result, ended_at)
        publish(rows, "kill -9 one of two replicas of each process under load")
        print(json.dumps({
            "kills": {row.service: row.detail for row in rows[:-1]}, "startup_s": startup_s,
            "protocol_activations": activations, "sweeps": sweeps.__dict__,
            "refusals": refused, "phases_s": phases.ended,
            "leaders_at_start": leaders_at_start, "leaders_at_end": leaders_at_end,
            "consumers_at_end": consumers_at_end, "groups_at_end": groups_at_end,
            "served_by_gateway": served, "anchors": anchors.__dict__,
            "driver": driver.summary(), "accounting": settled.result.summary(),
            "quiet": settled.quiet.__dict__, "verify_a": settled.verified,
            "verify_b": verified_b, "seconds": round(time.monotonic() - started, 1),
            "logs": {"A": str(a.log_dir), "B": str(b.log_dir)}}, indent=1, default=str))

        unrecovered = {k.name: k.failed for k in kills if k.failed}
        alone = [k.name for k in kills if k.service == "audit" and not k.served_alone]
        twin_late = {k.name: since(k.twin_first_write_at, k.killed_at) for k in kills
                     if k.service != "audit" and (k.twin_first_write_at is None or
                                                 k.twin_first_write_at - k.killed_at
                                                 > session + TWIN_SLACK_S)}
        not_one_leader = {s: by for s, by in leaders_at_end.items()
                          if list(by.values()).count(True) != 1}
        one_sided = {s: by for s, by in served.items() if not all(by.values())}
        unknown = [r for r in refused if r["code"] == "patient_not_found"
                   and r.get("arm_assigned_recorded_at")]
        deadlines = Counter(f"{r['step']}: {r['status']} {r['code']}" for r in refused
                            if r["code"].startswith("deadline"))
        failed = failures(settled, driver, MIN_ACKNOWLEDGED, more=[
            (not unknown, f"{len(unknown)} writes refused 404 patient_not_found for a patient "
                          f"that exists: {unknown[:5]}"),
            (not deadlines, f"workflows stopped at the driver's deadline: {dict(deadlines)}"),
            (not unrecovered, f"replicas not serving again within {RECOVERY_TIMEOUT_S:g} s of "
                              f"their restart: {unrecovered} "
                              f"(refusals: {driver.summary()['refusals']})"),
            (not alone, f"the twin filed nothing in the ledger while {alone} was down"),
            (not twin_late, f"the twin acknowledged no write of the service within "
                            f"{session + TWIN_SLACK_S:g} s of the kill (the session timeout, "
                            f"{session:g} s, and {TWIN_SLACK_S:g} s): {twin_late}"),
            (all(n == 1 for n in activations.values()),
             f"protocol version recorded other than once per store: {activations}"),
            (all(sweeps.patients.values()) and not sweeps.twice,
             f"missed visits after the clock jump: {sweeps.recorded} in "
             f"{sweeps.patients} patients, recorded twice: {sweeps.twice[:10]}"),
            (not not_one_leader, f"not exactly one relay leading at the end: {not_one_leader}"),
            (not one_sided, f"writes acknowledged by one replica only: {one_sided}"),
            (verified_b.get("ok") is True, f"GET /v1/audit/verify through B: {verified_b}"),
        ])
        assert not failed, "\n".join(failed) + f"\n(logs: {a.log_dir}, {b.log_dir})"
