"""What every fault test does around its fault: a system on a protocol with room for the load,
the load through the gateway(s), quiet after it, the accounting, and one list of what failed.

A fault test is then: start (`fault_env`, `system_of_its_own`), load (`LoadDriver`), its fault,
`settle` and `failures` (empty, or every check that failed, with its figures)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from bench.system import UNLIMITED, protocol_with_cap
from shared.protocol import ProtocolConfig, load_protocol
from shared.store import EventStore
from tests.conftest import REAL
from tests.e2e.conftest import token
from tests.faults.accounting import Accounting, Quiet, account, wait_quiet
from tests.faults.driver import LoadDriver, _problem_code
from tooling.launcher import System

K = TypeVar("K", bound="Kill")

# A key whose request never answered (its process was killed) is "in progress" until its lease
# runs out (D25); the default, 300 s, would outlast a site's retries. 20 s is still twice the
# gateway's upstream timeout, longer than any request lives in a service that is not killed.
IDEMPOTENCY_LEASE_S = 20


def fault_env(folder: Path) -> tuple[ProtocolConfig, dict[str, str]]:
    """The protocol (the built-in one with room for every patient the load enrols) and the
    environment every process of a fault test runs with."""
    protocol_dir = protocol_with_cap(folder / "protocol", 100_000)
    return load_protocol(protocol_dir), {
        "TRIAL_PROTOCOL_DIR": str(protocol_dir), **UNLIMITED,
        "TRIAL_IDEMPOTENCY_LEASE_S": str(IDEMPOTENCY_LEASE_S),
        # Kafka's least (group.min.session.timeout.ms): a dead member's partitions move sooner
        **({"TRIAL_KAFKA_SESSION_TIMEOUT_MS": "6000"} if REAL else {})}


@dataclass
class Settled:
    quiet: Quiet
    result: Accounting
    verified: dict[str, Any]  # GET /v1/audit/verify


async def settle(system: System, stores: Mapping[str, EventStore], driver: LoadDriver,
                 protocol: ProtocolConfig, gateway: str | None = None,
                 quiet_timeout: float = 120.0) -> Settled:
    """After the load: wait until the system is quiet (at most `quiet_timeout` s), then account
    and verify the ledger through the API (`gateway`: another gateway's URL than the system's
    own)."""
    quiet = await wait_quiet(stores, system.bootstrap, protocol, quiet_timeout)
    result = await account(stores, system.bootstrap, driver.acks, protocol)
    async with httpx.AsyncClient(base_url=gateway or system.url("gateway"), timeout=60) as http:
        verified = (await http.get("/v1/audit/verify", headers={
            "Authorization": f"Bearer {token('admin')}"})).json()
    return Settled(quiet, result, verified)


def failures(settled: Settled, driver: LoadDriver, min_acknowledged: int,
             more: Iterable[tuple[bool, str]] = ()) -> list[str]:
    """Every check of the accounting that failed, each with its figures; [] when all held.
    `more`: the fault's own checks (ok, message), put first."""
    quiet, result, verified = settled.quiet, settled.result, settled.verified
    s, k = result.summary(), result.kafka
    checks = [
        *more,
        (quiet.quiet, f"the system never went quiet: {quiet.pending}"),
        (not driver.tally.server_errors, f"500s: {driver.tally.server_errors[:5]}"),
        (not driver.summary()["driver_errors"], f"driver: {driver.summary()['driver_errors']}"),
        (len(driver.acks) >= min_acknowledged,
         f"only {len(driver.acks)} writes acknowledged (< {min_acknowledged})"),
        (not result.lost, f"{len(result.lost)} acknowledged writes lost: {result.lost[:5]}"),
        (not result.duplicated,
         f"{len(result.duplicated)} duplicated effects: {result.duplicated[:5]}"),
        (not k.missing, f"store events not on Kafka: "
                        f"{ {n: ids[:5] for n, ids in k.missing.items()} }"),
        (not k.duplicates, f"{k.duplicate_ids} event ids on Kafka more than once, by "
                           f"service {dict(k.duplicates_by_service)}: "
                           f"{list(k.duplicates.items())[:5]}"),
        (not k.unknown and not k.unreadable,
         f"records on Kafka of no store: {k.unknown[:5]}, unreadable: {k.unreadable}"),
        (not result.ledger.missing and not result.ledger.repeated
         and not result.ledger.not_on_kafka,
         f"ledger: missing {result.ledger.missing[:5]}, repeated "
         f"{list(result.ledger.repeated)[:5]}, never on Kafka {result.ledger.not_on_kafka[:5]}"),
        (result.ledger.chain_ok and verified.get("ok") is True,
         f"ledger chain: ok {result.ledger.chain_ok}, first broken at "
         f"{result.ledger.first_broken_position}; GET /v1/audit/verify: {verified}"),
        (all(result.chains.values()), f"store chains: {result.chains}"),
        (all(not c.missing and not c.extra for c in result.processed.values()),
         f"processed marks: {s['processed']}"),
        (result.numbers.gapless, f"randomization numbers: {s['randomization_numbers']}"),
        (not result.dead_lettered, f"dead-lettered: {result.dead_lettered}"),
    ]
    return [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class Answer:
    """A non-2xx answer the driver got: when (monotonic), to what path, status, problem code,
    Retry-After."""

    at: float
    path: str
    status: int
    code: str
    retry_after: str | None


class ObservedDriver(LoadDriver):
    """A LoadDriver that also keeps every non-2xx answer with its Retry-After (`answers`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[Answer] = []

    async def _send(self, url: str, content: bytes | None,
                    headers: dict[str, str]) -> httpx.Response:
        r = await super()._send(url, content, headers)
        if not 200 <= r.status_code < 300:
            self.answers.append(Answer(time.monotonic(), httpx.URL(url).path, r.status_code,
                                       _problem_code(r), r.headers.get("retry-after")))
        return r


def unhandled_errors(system: System) -> dict[str, list[str]]:
    """Per service, the first lines of its log that report a request failed unhandled (a 500,
    even one the gateway's own timeout hid behind a 504): `shared.web`'s "unhandled error in
    request"."""
    found: dict[str, list[str]] = {}
    for log in sorted(system.log_dir.glob("*.log")):
        lines = [line[:300] for line in log.read_text(errors="replace").splitlines()
                 if "unhandled error in request" in line]
        if lines:
            found[log.stem] = lines
    return found


async def ready(client: httpx.AsyncClient, system: System, service: str) -> bool:
    """Whether `service` of `system` answers its /readyz 200 now."""
    try:
        return (await client.get(f"{system.url(service)}/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


class Kill(Protocol):
    killed_at: float  # monotonic
    killed_wall: datetime


@dataclass(frozen=True)
class Window:
    """What happened between one kill and the next: writes acknowledged, those of them lost,
    and the duplicated effects recorded in the same span of wall-clock time."""

    acknowledged: int
    lost: int
    duplicated: int


def windows(kills: Sequence[K], driver: LoadDriver, result: Accounting,
            ended_at: float) -> Iterator[tuple[K, Window]]:
    """Each kill with what happened from it to the next kill (the last: to `ended_at`)."""
    for i, kill in enumerate(kills):
        after = kills[i + 1] if i + 1 < len(kills) else None
        until = after.killed_at if after is not None else ended_at
        until_wall = after.killed_wall if after is not None else None
        yield kill, Window(
            sum(kill.killed_at <= a.acked_at < until for a in driver.acks),
            sum(kill.killed_at <= x.acked_at < until for x in result.lost),
            sum(d.last_recorded_at >= kill.killed_wall
                and (until_wall is None or d.last_recorded_at < until_wall)
                for d in result.duplicated))
