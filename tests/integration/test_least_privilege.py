"""PostgreSQL: a service runs as a role that may read and append events, never change them (D44).

SQLite has no roles (its file's permissions are the operating system's business), so these tests
exist on `make test-real` only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from typer.testing import CliRunner

from shared.migrate import upgrade
from shared.store import EventStore, NewEvent
from tests.conftest import REAL
from tooling.cli import app

FORBIDDEN = (
    "ALTER TABLE events DISABLE TRIGGER ALL",
    "UPDATE events SET type = 'Forged'",
    "DELETE FROM events",
    "TRUNCATE events",
    "DROP TABLE events",
    "ALTER TABLE relay_checkpoints ADD COLUMN forged integer",
    "SET session_replication_role = replica",  # would skip every trigger: superusers only
)


def _raw(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


if REAL:

    @pytest.fixture
    async def service_url(database_url: str) -> AsyncIterator[str]:
        """The database migrated by its owner, and a URL for a fresh runtime role granted the
        service's rights by `trial migrate --service-role`."""
        role, password = f"svc_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        owner = await asyncpg.connect(_raw(database_url))
        try:
            await owner.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD '{password}'")
            result = await asyncio.to_thread(  # the command runs an event loop of its own
                CliRunner().invoke, app, ["migrate", database_url, "--service-role", role])
            assert result.exit_code == 0, result.output
            parts = urlsplit(database_url)
            yield f"postgresql+asyncpg://{role}:{password}@{parts.hostname}:{parts.port}{parts.path}"
        finally:
            await owner.execute(f"DROP OWNED BY {role}")
            await owner.execute(f"DROP ROLE {role}")
            await owner.close()

    async def test_the_service_role_runs_the_store(service_url: str) -> None:
        await upgrade(service_url)  # a service's start: at the head already, nothing to do
        store = EventStore(service_url)
        try:
            appended = await store.append("s-1", [NewEvent("TestHappened", {"n": 1})], 0)
            async with store.transaction() as tx:
                await tx.append("s-1", [NewEvent("TestHappened", {"n": 2})], 1)
                await tx.mark_processed("consumer", str(uuid.uuid4()), "topic")
                await tx.save_checkpoint("relay", appended[-1].position)
            await store.save_checkpoint("relay", 2)
            assert [e.data["n"] for e in await store.read_stream("s-1")] == [1, 2]
            assert await store.checkpoint("relay") == 2
            assert (await store.verify()).ok
        finally:
            await store.close()

    @pytest.mark.parametrize("statement", FORBIDDEN)
    async def test_the_service_role_cannot_change_or_unprotect_the_events(
            database_url: str, service_url: str, statement: str) -> None:
        owner = await asyncpg.connect(_raw(database_url))
        try:  # the statement itself is fine for the owner, but for the append-only triggers
            async with owner.transaction():
                try:
                    await owner.execute(statement)
                except asyncpg.InsufficientPrivilegeError as by_trigger:
                    assert "append-only" in str(by_trigger)  # the second line of defence
                raise _RolledBack
        except _RolledBack:
            pass
        finally:
            await owner.close()
        service = await asyncpg.connect(_raw(service_url))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await service.execute(statement)
            # Refused for want of the right, before any trigger could be asked.
            assert "permission denied" in str(refused.value) or "must be" in str(refused.value)
        finally:
            await service.close()


class _RolledBack(Exception):
    pass
