"""Brings a service's database to the newest Alembic revision (run at start-up and by `trial migrate`)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from shared.db import create_engine, is_sqlite

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_KEY = 7_301_000_002


def _upgrade(connection: Connection) -> None:
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
