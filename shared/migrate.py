"""Brings a service's database to the newest Alembic revision (run at start-up and by `trial migrate`),
and grants a service's runtime role what it needs and nothing more (PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.db import create_engine, is_sqlite
from shared.optional import without

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision of each branch in migrations/versions (tests/unit/test_migrations.py checks
# it against Alembic's own reading): a database at these needs nothing, and a start that finds
# it so never imports Alembic (about 10 MB a process, D60). A new migration adds itself here.
HEADS = frozenset({"0005"})
_MIGRATION_LOCK_KEY = 7_301_000_002


def _revisions(connection: Connection) -> frozenset[str]:
    """The revisions the database is at (none before its first migration), in plain SQL."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return frozenset()
    return frozenset(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def _upgrade(connection: Connection) -> None:
    if _revisions(connection) == HEADS:
        return
    with without("pygments"):  # mako's highlighted template errors; no template is rendered here
        from alembic import command
        from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    # "heads": each area may add its own branch off 0001 (see docs/decisions.md, D9).
    command.upgrade(config, "heads")


async def upgrade(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if not is_sqlite(url):  # replicas starting together migrate one at a time
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                   {"k": _MIGRATION_LOCK_KEY})
            await conn.run_sync(_upgrade)
    finally:
        await engine.dispose()


# What a service's runtime role may do (D44): read and append events, never change one; the
# bookkeeping tables (checkpoints, idempotency keys) it updates. The owner runs the migrations,
# so only the owner (or a superuser) could alter a table or disable its triggers.
SERVICE_ROLE_GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT ON events, processed_events TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON relay_checkpoints, idempotency_keys TO {role}",
    "GRANT SELECT ON alembic_version TO {role}",
    "GRANT EXECUTE ON FUNCTION event_store_lock(text[]) TO {role}",
)


async def grant_service_role(url: str, role: str) -> None:
    """Let `role` run the service on this database (run as the owner, after `upgrade`). The
    role must exist, and be neither the owner nor a superuser (the cluster's business)."""
    if is_sqlite(url):
        raise ValueError("SQLite has no roles: protect the file instead")
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            quoted = conn.dialect.identifier_preparer.quote(role)
            for grant in SERVICE_ROLE_GRANTS:
                await conn.execute(sa.text(grant.format(role=quoted)))
    finally:
        await engine.dispose()
