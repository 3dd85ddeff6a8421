"""Starts the six services as uvicorn processes and waits until each is ready (make run, e2e)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.infra import die_with_parent
from shared.settings import SERVICES

# How long uvicorn keeps an idle client connection open. Its default, 5 s, is exactly httpx's
# (and many clients') own idle expiry: a site system reusing a connection at the fifth second
# meets a server that has just closed it, and its POST fails with "server disconnected" (seen
# in CI). Above the usual client and load-balancer idle times (60 s), the client closes first.
# The gateway's own pool to the services drops idle connections at 4 s (IDLE_CONNECTION_S).
KEEP_ALIVE_S = 75

DEFAULT_PORTS = {"gateway": 8000, "randomization": 8001, "dosing": 8002, "safety": 8003,
                 "audit": 8004, "efficacy": 8005}


@dataclass
class System:
    """The whole backend as child processes; each service gets its own database."""

    bootstrap: str
    database_urls: dict[str, str]
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    log_dir: Path = Path(".run/logs")
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, service: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def service_env(self, service: str) -> dict[str, str]:
        env = {**os.environ, **self.env, "TRIAL_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap}
        env["TRIAL_SERVICE_NAME"] = service
        for name in SERVICES:
            env[f"TRIAL_{name.upper()}_URL"] = self.url(name)
        env["TRIAL_PUBLIC_URL"] = self.url("gateway")  # callers' links go through it
        if service in self.database_urls:
            env["TRIAL_DATABASE_URL"] = self.database_urls[service]
        return env

    def migrate(self) -> None:
        """Each service's database brought to the newest schema here, before its service starts,
        which then finds nothing to do and never loads Alembic (about 10 MB a process, D60). A
        service started without this migrates its own database (compose, the chart, the tests)."""
        from shared.migrate import upgrade

        async def every_database() -> None:
            for url in self.database_urls.values():
                await upgrade(url)

        asyncio.run(every_database())

    def start(self, services: tuple[str, ...] = (*SERVICES, "gateway")) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in services:
            self.start_one(service)

    def start_one(self, service: str) -> None:
        log = (self.log_dir / f"{service}.log").open("ab")
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"services.{service}.app:app", "--host",
             "127.0.0.1", "--port", str(self.ports[service]), "--log-level", "warning",
             "--timeout-keep-alive", str(KEEP_ALIVE_S)],
            env=self.service_env(service), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent())  # prctl only: nothing in the child that locks

    def supervise(self, stopping: Callable[[float], bool],
                  say: Callable[[str], None] = print,
                  broker: tuple[Callable[[], bool], Callable[[], object]] | None = None) -> None:
        """Until `stopping(wait)` says so (it waits up to `wait` seconds for a stop): restart any
        service that exits, after a pause that doubles with each exit in a row (1 s up to 30 s;
        back to 1 s once it has run for a minute), and say so.

        `broker`: (alive, start) of an embedded broker, which keeps nothing. When it dies, it is
        started again and every service with it: fresh clients meet the fresh broker, each
        relay publishes its history to it (D45) and the consumers drop what they have seen. A
        broker restarted under clients connected before it misplaces and loses records (issue
        15, docs/faults.md defect 1)."""
        pause: dict[str, float] = {}
        due: dict[str, float] = {}  # service -> when to start it again
        started = {service: time.monotonic() for service in self.processes}
        while not stopping(0.5):
            if broker is not None and not broker[0]():
                say("the embedded broker exited: starting it again, and every service with it "
                    "(each relay publishes its history to the new broker)")
                services = tuple(self.processes)
                self.stop()
                broker[1]()
                self.start(services)
                self.wait_ready()
                say("restarted with a new broker")
                due.clear()
                started = {service: time.monotonic() for service in self.processes}
                continue
            now = time.monotonic()
            for service, proc in list(self.processes.items()):
                if service in due:
                    if now >= due[service]:
                        del due[service]
                        self.start_one(service)
                        started[service] = now
                        say(f"{service}: restarted")
                    continue
                code = proc.poll()
                if code is None:
                    if now - started[service] > 60:
                        pause.pop(service, None)
                    continue
                wait = pause[service] = min(pause.get(service, 0.5) * 2, 30.0)
                due[service] = now + wait
                say(f"{service}: exited with {code}; restarting in {wait:g} s "
                    f"(see {self.log_dir / (service + '.log')})")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.processes)
        while pending:
            for service in sorted(pending):
                proc = self.processes[service]
                if proc.poll() is not None:
                    raise RuntimeError(f"{service} exited with {proc.returncode}; see "
                                       f"{self.log_dir / (service + '.log')}")
                try:
                    if httpx.get(f"{self.url(service)}/readyz", timeout=2).status_code == 200:
                        pending.discard(service)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout}s: {', '.join(sorted(pending))}")
            if pending:
                time.sleep(0.2)

    def stop(self, services: tuple[str, ...] | None = None) -> None:
        chosen = [s for s in (services or tuple(self.processes)) if s in self.processes]
        for service in chosen:
            self.processes[service].terminate()
        for service in chosen:
            proc = self.processes.pop(service)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
