"""A fresh, throwaway database for a benchmark run on either backend."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from deploy import infra


@contextmanager
def bench_database(backend: str, label: str = "bench") -> Iterator[str]:
    """Yield a SQLAlchemy async URL: a new SQLite file, or a new PostgreSQL database dropped after."""
    if backend != "real":
        yield f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / f'{label}.db'}"
        return
    dsn = infra.start_postgres()
    name = f"{label}_{uuid.uuid4().hex[:8]}"
    infra.create_database(dsn, name)
    try:
        yield f"postgresql+asyncpg://{urlsplit(dsn).netloc}/{name}"
    finally:
        infra.drop_database(dsn, name)
