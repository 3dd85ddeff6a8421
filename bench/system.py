"""The whole system for a benchmark, as `make run` starts it, on ports and a broker of its own.

Every service and the gateway run as uvicorn processes (`tooling.launcher.System`), on free
ports (never make run's 8000-8005 and 9092, which a test run may be using). Embedded: SQLite
files in a temporary folder and a Tansu broker of its own, with `trial run`'s short consumer
session. Real: fresh databases on the dev PostgreSQL cluster and an Apache Kafka broker of its
own. Everything is stopped and dropped at the end, on an error, Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy import infra
from shared.auth import issue_dev_token
from shared.protocol import DEFAULT_PATH, load_protocol
from shared.settings import SERVICES
from tooling.cli import EMBEDDED_SESSION_TIMEOUT_MS
from tooling.launcher import System

SECRET = "bench-" + uuid.uuid4().hex
# The gateway's token bucket still runs on every request; it only never refuses the benchmark's
# one caller, which sends more than a site would (hundreds of screenings in seconds).
UNLIMITED = {"TRIAL_RATE_LIMIT_PER_S": "1000000", "TRIAL_RATE_LIMIT_BURST": "1000000"}


@dataclass
class Running:
    system: System
    folder: Path
    broker_pid_file: Path | None  # the embedded broker's pid file (None on Kafka)
    idle_cores: float = 0.0  # what the system used just after it came up, nothing to digest


def token(role: str = "site_coordinator", site: str | None = "S1") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_dev_token(SECRET, role, site)}"}


def screening(site: str = "S1", pasi: float = 14.2) -> dict[str, Any]:
    """An eligible screening (examples/screening.json) with a number of its own."""
    body: dict[str, Any] = json.loads((Path(__file__).parents[1] / "examples" / "screening.json")
                                      .read_text())
    return {**body, "site_id": site, "screening_number": f"{site}-{uuid.uuid4().hex[:10]}",
            "pasi": pasi}


def protocol_with_cap(folder: Path, cap: int) -> Path:
    """The built-in protocol version with another enrolment cap (as the e2e tests make one)."""
    shutil.copytree(DEFAULT_PATH, folder)
    trial = json.loads((folder / "trial.json").read_text())
    (folder / "trial.json").write_text(json.dumps({**trial, "enrollment_cap": cap}))
    load_protocol(folder)
    return folder


def _terminate_as_exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds through every `finally` below



def stop_infrastructure(backend: str, port: int, folder: Path, dsn: str | None,
                        created: list[str]) -> None:
    """Stop the broker a bench started in `folder` and drop the databases it `created`."""
    if backend == "real":
        infra.stop_kafka(port, state_dir=folder / "kafka")
        for name in created:
            assert dsn is not None
            infra.drop_database(dsn, name)
    else:
        infra.stop_tansu(port, state_dir=folder / "tansu")


def fresh_databases(dsn: str, services: Iterable[str], created: list[str]) -> dict[str, str]:
    """A fresh PostgreSQL database per service, its URL by service; each name is appended to
    `created`, for the caller to drop."""
    urls = {}
    for service in services:
        name = f"bench_{service}_{uuid.uuid4().hex[:8]}"
        infra.create_database(dsn, name)
        created.append(name)
        urls[service] = f"postgresql+asyncpg://{urlsplit(dsn).netloc}/{name}"
    return urls

@contextmanager
def whole_system(backend: str = "embedded", cap: int | None = None,
                 env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start every service and the gateway, ready; stop and drop everything afterwards."""
    signal.signal(signal.SIGTERM, _terminate_as_exit)
    folder = Path(tempfile.mkdtemp(prefix="bench-system-"))
    extra = {"TRIAL_JWT_SECRET": SECRET, **(env or {})}
    if cap is not None:
        extra["TRIAL_PROTOCOL_DIR"] = str(protocol_with_cap(folder / "protocol", cap))
    port = infra.free_port()
    created: list[str] = []
    dsn: str | None = None
    pid_file: Path | None = None
    ok = False
    try:
        if backend == "real":
            bootstrap = infra.start_kafka(port, state_dir=folder / "kafka")
            dsn = infra.start_postgres()
            urls = fresh_databases(dsn, SERVICES, created)
        else:
            bootstrap = infra.start_tansu(port, state_dir=folder / "tansu")
            pid_file = folder / "tansu" / f"tansu-{port}.pid"
            urls = {s: f"sqlite+aiosqlite:///{folder / 'data' / f'{s}.db'}" for s in SERVICES}
            (folder / "data").mkdir()
            extra.setdefault("TRIAL_KAFKA_SESSION_TIMEOUT_MS", str(EMBEDDED_SESSION_TIMEOUT_MS))
        system = System(bootstrap=bootstrap, database_urls=urls,
                        ports={s: infra.free_port() for s in (*SERVICES, "gateway")},
                        log_dir=folder / "logs", env=extra)
        try:
            system.migrate()  # as `trial run` does (D60)
            system.start()
            system.wait_ready()
            running = Running(system, folder, pid_file)
            running.idle_cores = cores_used(running, IDLE_WINDOW_S)
            yield running
            ok = True
        finally:
            system.stop()
    finally:
        stop_infrastructure(backend, port, folder, dsn, created)
        if ok:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"the system's logs are kept in {folder / 'logs'}", file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def pids(running: Running) -> dict[str, int]:
    """Each process of the system by name: the services, the gateway and the embedded broker."""
    found = {name: proc.pid for name, proc in running.system.processes.items()}
    if running.broker_pid_file is not None:
        found["broker (tansu)"] = int(running.broker_pid_file.read_text().split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_WINDOW_S = 3.0


def cores_used(running: Running, window: float) -> float:
    """The whole system's CPU over the next `window` seconds, in cores."""
    before = sum(cpu_seconds(p) for p in pids(running).values())
    time.sleep(window)
    return (sum(cpu_seconds(p) for p in pids(running).values()) - before) / window


def wait_quiet(running: Running, below: float = 0.3, window: float = 2.0,
               timeout: float = 120.0) -> float:
    """Wait until the whole system uses less than `below` of one core over `window` seconds,
    or less than one and a half times what it used just after it came up (its polls and
    fetches: 0.15 to 0.4 of a core, with the machine's speed), so the consumers have digested
    what came before; return how long that took."""
    started, limit = time.monotonic(), max(below, 1.5 * running.idle_cores)
    while cores_used(running, window) >= limit and time.monotonic() - started <= timeout:
        pass
    return time.monotonic() - started
