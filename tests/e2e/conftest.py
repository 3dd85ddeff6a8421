"""The whole system as real processes: five services over HTTP, a real broker, real databases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from deploy import infra
from shared.auth import issue_dev_token
from shared.settings import DEV_JWT_SECRET, SERVICES
from tests.conftest import REAL, Broker, _new_broker
from tooling.cli import EMBEDDED_SESSION_TIMEOUT_MS
from tooling.launcher import System

SECRET = "e2e-secret-" + uuid.uuid4().hex


def fresh_databases(pg_dsn: str | None, folder: Path, services: tuple[str, ...] = SERVICES
                    ) -> tuple[dict[str, str], list[str]]:
    urls, created = {}, []
    for service in services:
        if pg_dsn is None:
            urls[service] = f"sqlite+aiosqlite:///{folder / f'{service}.db'}"
        else:
            name = f"e2e_{service}_{uuid.uuid4().hex[:8]}"
            infra.create_database(pg_dsn, name)
            created.append(name)
            urls[service] = f"postgresql+asyncpg://{urlsplit(pg_dsn).netloc}/{name}"
    return urls, created


def start_system(broker: Broker, pg_dsn: str | None, folder: Path,
                 services: tuple[str, ...] = (*SERVICES, "gateway"),
                 env: dict[str, str] | None = None) -> tuple[System, list[str]]:
    """`env` adds or overrides TRIAL_* variables of every process (a test's own protocol, ...)."""
    urls, created = fresh_databases(pg_dsn, folder, tuple(s for s in services if s != "gateway"))
    system = System(bootstrap=broker.bootstrap, database_urls=urls,
                    ports={s: infra.free_port() for s in (*SERVICES, "gateway")},
                    log_dir=folder / "logs",
                    env={"TRIAL_JWT_SECRET": SECRET, "TRIAL_RELAY_POLL_INTERVAL_S": "0.1",
                         **({} if REAL else {"TRIAL_KAFKA_SESSION_TIMEOUT_MS":
                                             str(EMBEDDED_SESSION_TIMEOUT_MS)}),
                         "TRIAL_KAFKA_REQUEST_TIMEOUT_MS": "5000",
                         "TRIAL_AUDIT_ANCHOR_INTERVAL_S": "1", **(env or {})})
    system.start(services)
    try:
        system.wait_ready()
    except Exception:
        system.stop()
        raise
    return system, created


@contextmanager
def system_and_broker(pg_dsn: str | None, folder: Path,
                      services: tuple[str, ...] = (*SERVICES, "gateway"),
                      env: dict[str, str] | None = None) -> Iterator[tuple[System, Broker]]:
    """A system on a broker of its own, and that Broker (a fault test stops and starts it)."""
    broker = _new_broker(folder / "broker")
    try:
        system, created = start_system(broker, pg_dsn, folder / "system", services, env)
        try:
            yield system, broker
        finally:
            system.stop()
            for name in created:
                assert pg_dsn is not None
                infra.drop_database(pg_dsn, name)
    finally:
        broker.stop()


@contextmanager
def system_of_its_own(pg_dsn: str | None, folder: Path,
                      services: tuple[str, ...] = (*SERVICES, "gateway"),
                      env: dict[str, str] | None = None) -> Iterator[System]:
    """A system on a broker of its own, for a test whose holds or protocol must not reach the
    session system (a suspended arm there would stop every other test's doses)."""
    with system_and_broker(pg_dsn, folder, services, env) as (system, _):
        yield system


@pytest.fixture(scope="session")
def system(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """The session's system, on a broker of its own, not the session's shared one: the
    integration tests publish records of their own sources (`/services/test-*`) to the shared
    broker's topics, which the system's services would read as forged (D42) and fail closed on,
    whatever order the suite runs in."""
    with system_and_broker(pg_dsn, tmp_path_factory.mktemp("system")) as (s, _):
        yield s


def token(role: str, site: str | None = None, sub: str | None = None) -> str:
    assert SECRET != DEV_JWT_SECRET
    return issue_dev_token(SECRET, role, site, sub)


def client(system: System, role: str = "site_coordinator", site: str | None = "S1",
           service: str = "gateway") -> httpx.AsyncClient:
    site = site if role in ("site_coordinator", "investigator", "pharmacist") else None
    return httpx.AsyncClient(base_url=system.url(service), timeout=30,
                             headers={"Authorization": f"Bearer {token(role, site)}"})


def screening(site: str = "S1", number: str | None = None, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "site_id": site, "screening_number": number or f"{site}-{uuid.uuid4().hex[:6]}",
        "birth_date": "1980-05-01", "sex": "female", "weight_kg": 70.0,
        "diagnosis_date": "2020-01-15", "psoriasis_type": "plaque", "pasi": 14.2,
        "bsa_percent": 12.0, "dlqi": 11, "conventional_therapy_failed": True,
        "drug_induced": False, "ongoing_psoriasis_treatment": False, "prior_biologic_targets": [],
        "active_infection": False, "recurrent_infections": False, "malignancy_history": False,
        "hiv": False, "hbv": False, "hcv": False, "pregnant_or_lactating": False,
        "planning_pregnancy": False, "can_attend_follow_up": True,
        "consent_signed_at": "2026-11-20T09:30:00Z"}
    body.update(overrides)
    return body
