"""Fixtures that give every test a real database and a real broker.

`TRIAL_TEST_BACKEND=embedded` (default, `make test`): SQLite files and the embedded Tansu broker.
`TRIAL_TEST_BACKEND=real` (`make test-real`): PostgreSQL and Apache Kafka, started by deploy/infra.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from deploy import infra
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore

BACKEND = os.environ.get("TRIAL_TEST_BACKEND", "embedded")
if BACKEND not in ("embedded", "real"):
    raise RuntimeError(f"TRIAL_TEST_BACKEND must be embedded or real, not {BACKEND!r}")
REAL = BACKEND == "real"


def pytest_report_header() -> str:
    return f"backend: {BACKEND} ({'PostgreSQL + Apache Kafka' if REAL else 'SQLite + Tansu'})"


@dataclass
class Broker:
    """A broker this test session may stop and start again (for outage tests)."""

    kind: str
    port: int
    state_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        if self.kind == "kafka":
            return infra.start_kafka(self.port, state_dir=self.state_dir)
        return infra.start_tansu(self.port, state_dir=self.state_dir)

    def stop(self) -> None:
        if self.kind == "kafka":
            infra.stop_kafka(self.port, state_dir=self.state_dir)
        else:
            infra.stop_tansu(self.port, state_dir=self.state_dir)


def _new_broker(state_dir: Path) -> Broker:
    broker = Broker("kafka" if REAL else "tansu", infra.free_port(), state_dir)
    broker.start()
    return broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The session's broker. Tests share it, so each filters what it reads by its own ids."""
    b = _new_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, which the test may stop and restart."""
    b = _new_broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture(scope="session")
def pg_dsn() -> str | None:
    return infra.start_postgres() if REAL else None


@pytest.fixture
def make_database_url(pg_dsn: str | None, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A factory of fresh, empty databases (one per service the test starts)."""
    created: list[str] = []

    def make(label: str = "db") -> str:
        if pg_dsn is None:
            return f"sqlite+aiosqlite:///{tmp_path / f'{label}-{uuid.uuid4().hex[:6]}.db'}"
        name = f"t_{label}_{uuid.uuid4().hex[:10]}"
        infra.create_database(pg_dsn, name)
        created.append(name)
        return f"postgresql+asyncpg://{urlsplit(pg_dsn).netloc}/{name}"

    yield make
    for name in created:
        assert pg_dsn is not None
        infra.drop_database(pg_dsn, name)


@pytest.fixture
def database_url(make_database_url: Callable[[str], str]) -> str:
    return make_database_url("store")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    await upgrade(database_url)
    s = EventStore(database_url)
    yield s
    await s.close()


@pytest.fixture
def settings(broker: Broker, database_url: str) -> Settings:
    return Settings(service_name=f"test-{uuid.uuid4().hex[:8]}", database_url=database_url,
                    kafka_bootstrap_servers=broker.bootstrap, relay_poll_interval_s=0.1,
                    kafka_request_timeout_ms=5000,
                    # the embedded broker lets a consumer read after half its session (D33)
                    kafka_session_timeout_ms=10_000 if REAL else 2000)
