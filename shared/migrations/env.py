"""Alembic environment: runs on the connection `shared.migrate` hands it, or on the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from shared.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # the `alembic` command line, with sqlalchemy.url set to a sync driver
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
