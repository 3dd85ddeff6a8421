"""`make run` on this checkout brings the system up, says where it is, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aiokafka import ConsumerRecord

from deploy import infra
from shared.events import ENROLLMENT, CloudEvent
from shared.settings import SERVICES
from tests.e2e.conftest import SECRET, screening, token
from tests.e2e.test_dosing_patients import randomized_patient
from tests.support import eventually, read_topic

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("command", "stop"), [
    (["make", "--no-print-directory", "run"], "ctrl-c"),        # a person at a terminal
    ([str(REPO / ".venv" / "bin" / "trial"), "run"], "sigterm"),  # a supervisor, to it alone
])
def test_run_starts_everything_prints_the_gateway_and_kafka_and_stops_everything(
        tmp_path: Path, command: list[str], stop: str) -> None:
    gateway, kafka = infra.free_port(), infra.free_port()
    ports = {f"TRIAL_{s.upper()}_PORT": str(infra.free_port())
             for s in SERVICES}
    env = {**os.environ, "TRIAL_GATEWAY_PORT": str(gateway), "TRIAL_RUN_KAFKA_PORT": str(kafka),
           "TRIAL_DATA_DIR": str(tmp_path / "data"), **ports}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while not any(line.startswith("Kafka bootstrap:") for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "run exited:\n" + "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "run said nothing in time:\n" + "".join(lines)
        out = "".join(lines)
        assert re.search(rf"Gateway:\s+http://127\.0\.0\.1:{gateway}\b", out), out
        assert re.search(rf"Kafka bootstrap:\s+127\.0\.0\.1:{kafka}\b", out), out
        for service in SERVICES:  # the new efficacy service among the others
            port = ports[f"TRIAL_{service.upper()}_PORT"]
            assert re.search(rf"{service}:\s+http://127\.0\.0\.1:{port}\s+ready", out), out
        ready = httpx.get(f"http://127.0.0.1:{gateway}/readyz", timeout=10)
        assert ready.status_code == 200
        assert {s: v["ready"] for s, v in ready.json()["services"].items()} == dict.fromkeys(
            SERVICES, True)
        assert infra.kafka_ready(f"127.0.0.1:{kafka}")
    finally:
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert not infra.kafka_ready(f"127.0.0.1:{kafka}"), "run left its broker running"
    assert all(
        not _listening(int(p)) for p in (gateway, *map(int, ports.values()))
    ), "run left a service running"


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def _start_run(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """`trial run` as a process; returns once it has said where everything is."""
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "trial"), "run"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = _read_until(proc, lambda line: line.startswith("Kafka bootstrap:"), 180)
    return proc, lines


def _read_until(proc: subprocess.Popen[str], done: Callable[[str], bool],
                timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not (lines and done(lines[-1])):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "run exited:\n" + "".join(lines)
        lines.append(line)
        assert time.monotonic() < deadline, "not said in time:\n" + "".join(lines)
    return lines


def _alive(ports: list[int], kafka: int, timeout: float) -> list[int]:
    """The ports still served after `timeout` seconds (the broker's among them)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in ports if _listening(p)]
        if infra.kafka_ready(f"127.0.0.1:{kafka}"):
            alive.append(kafka)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


async def test_run_restarts_a_dead_service_and_dies_whole_and_starts_again_with_the_history(
        tmp_path: Path) -> None:
    """Issue 15: a service that dies is restarted; a launcher killed outright takes its broker
    and services with it; the next run, on the same data, starts a new broker and the relays
    publish the whole history to it again."""
    gateway, kafka = infra.free_port(), infra.free_port()
    ports = {f"TRIAL_{s.upper()}_PORT": infra.free_port() for s in SERVICES}
    env = {**os.environ, "TRIAL_GATEWAY_PORT": str(gateway), "TRIAL_RUN_KAFKA_PORT": str(kafka),
           "TRIAL_DATA_DIR": str(tmp_path / "data"), "TRIAL_JWT_SECRET": SECRET,
           **{k: str(v) for k, v in ports.items()}}
    proc, _ = _start_run(tmp_path, env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway}", timeout=30,
                                     headers={"Authorization": f"Bearer {token('site_coordinator', 'S1')}"}
                                     ) as site:
            answer = await site.post("/v1/screenings", json=screening(number="S1-RUN-1"))
            assert answer.status_code == 201, answer.text
            screened = answer.json()["screening_id"]
        await read_topic(f"127.0.0.1:{kafka}", ENROLLMENT, until=lambda rs: _has(rs, screened))
        dosing = ports["TRIAL_DOSING_PORT"]
        pid = _listener_pid(dosing)
        os.kill(pid, signal.SIGKILL)
        _read_until(proc, lambda line: line.startswith("dosing: restarted"), 60)
        deadline = time.monotonic() + 60
        while not _ready(dosing):
            assert time.monotonic() < deadline, "dosing not ready again"
            await asyncio.sleep(0.2)
        assert _listener_pid(dosing) != pid
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as a closed terminal might
        proc.wait(10)
        alive = _alive([gateway, *ports.values()], kafka, 30)
        assert not alive, f"the launcher's children outlived it: {alive} of {ports}, {kafka}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    again, _ = _start_run(tmp_path, env)
    try:
        # A new broker, empty at first: the randomization relay publishes its history again.
        records = await read_topic(f"127.0.0.1:{kafka}", ENROLLMENT,
                                   until=lambda rs: _has(rs, screened), timeout=60)
        assert _has(records, screened)
    finally:
        again.terminate()
        again.wait(60)


def _has(records: list[ConsumerRecord], subject: str) -> bool:
    return any(CloudEvent.from_bytes(r.value or b"").subject == subject for r in records)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _listener_pid(port: int) -> int:
    """The pid of the process listening on 127.0.0.1:`port` (from /proc, no tools needed)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            inode = fields[9]
    assert inode is not None, f"nothing listens on {port}"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
    raise AssertionError(f"no process holds port {port}'s socket")


async def test_run_restarts_everything_with_a_new_broker_when_its_broker_dies(
        tmp_path: Path) -> None:
    """Issue 15, docs/faults.md defect 1: the embedded broker keeps nothing, and restarted under
    clients connected before it, it misplaces and loses records. When it dies under `trial run`,
    the launcher starts a new one and every service with it: the new broker gets the whole
    history again, and the consumers act on what comes after (a new patient's dosing schedule),
    having dropped what they had seen."""
    gateway, kafka = infra.free_port(), infra.free_port()
    ports = {f"TRIAL_{s.upper()}_PORT": infra.free_port() for s in SERVICES}
    env = {**os.environ, "TRIAL_GATEWAY_PORT": str(gateway), "TRIAL_RUN_KAFKA_PORT": str(kafka),
           "TRIAL_DATA_DIR": str(tmp_path / "data"), "TRIAL_JWT_SECRET": SECRET,
           **{k: str(v) for k, v in ports.items()}}
    bootstrap = f"127.0.0.1:{kafka}"
    proc, _ = _start_run(tmp_path, env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway}", timeout=30,
                                     headers={"Authorization": f"Bearer {token('site_coordinator', 'S1')}"}
                                     ) as site:
            before, _ = await randomized_patient(site)
            await read_topic(bootstrap, ENROLLMENT, until=lambda rs: _has(rs, before))
            broker = _listener_pid(kafka)
            os.kill(broker, signal.SIGKILL)
            said = await asyncio.to_thread(
                _read_until, proc, lambda line: line.startswith("restarted with a new broker"),
                180)
            assert any(line.startswith("the embedded broker exited") for line in said), said
            assert _listener_pid(kafka) != broker
            # the new broker holds the history again, published by the restarted relays
            await read_topic(bootstrap, ENROLLMENT, until=lambda rs: _has(rs, before),
                             timeout=60)
            after, _ = await randomized_patient(site)  # acknowledged: on the new broker (D56)

            async def scheduled() -> bool:
                r = await site.get(f"/v1/patients/{after}/schedule")
                return r.status_code == 200

            await eventually(scheduled, timeout=60, what="dosing to act on the new patient")
            assert (await site.get(f"/v1/patients/{before}/schedule")).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
