"""Every uvicorn the project starts keeps an idle client connection open longer than clients
keep theirs (tooling/launcher.py, KEEP_ALIVE_S): with uvicorn's default 5 s, equal to httpx's
own idle expiry, a client reusing a connection at the fifth second met a server that had just
closed it, and its POST failed with "server disconnected" (an e2e run in CI). The client must be
the one to close first, wherever the system is started: `make run` and the tests (the
launcher), docker-compose.yml and the Helm chart."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml

from services.gateway.app import IDLE_CONNECTION_S
from shared.settings import SERVICES
from tooling.launcher import KEEP_ALIVE_S, System

ROOT = Path(__file__).resolve().parents[2]


def _keep_alive(command: list[str]) -> float:
    return float(command[command.index("--timeout-keep-alive") + 1])


def test_the_server_outlasts_the_clients_idle_connections() -> None:
    client_idle = httpx.Limits().keepalive_expiry
    assert client_idle is not None and KEEP_ALIVE_S > client_idle
    assert KEEP_ALIVE_S >= 60  # the usual idle time of a load balancer in front
    assert IDLE_CONNECTION_S < KEEP_ALIVE_S  # the gateway's pool to the services closes first


def test_every_way_of_starting_the_services_sets_it(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []  # the launcher's commands, none of them run
    monkeypatch.setattr("tooling.launcher.subprocess.Popen",
                        lambda args, **_: started.append(args))
    System(bootstrap="127.0.0.1:1", database_urls={}, log_dir=tmp_path).start()
    assert len(started) == len(SERVICES) + 1
    assert {_keep_alive(args) for args in started} == {KEEP_ALIVE_S}

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    uvicorns = [s["command"] for s in compose["services"].values()
                if s.get("command", [None])[0] == "uvicorn"]
    assert len(uvicorns) == len(SERVICES) + 1
    assert {_keep_alive(command) for command in uvicorns} == {KEEP_ALIVE_S}

    chart = (ROOT / "deploy/helm/uc-msc-trial/templates/deployment.yaml").read_text()
    (helm,) = re.findall(r'command: \["uvicorn".*\]', chart)
    assert f'"--timeout-keep-alive", "{KEEP_ALIVE_S}"' in helm
