"""`make run` on this checkout brings the system up, says where it is, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from deploy import infra
from shared.settings import SERVICES

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
