"""Which database errors are "unavailable" (503 with Retry-After, D54) and which stay a 500."""

from __future__ import annotations

import asyncpg
import sqlalchemy as sa

from shared.store import database_unavailable


def wrapped(inner: BaseException) -> sa.exc.DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises it: a DBAPIError whose `orig` is the dialect's
    adapted error, caused by asyncpg's own."""
    adapted = Exception(str(inner))
    adapted.__cause__ = inner
    return sa.exc.DBAPIError("connect", None, adapted)


def test_a_connection_refused_while_postgres_shuts_down_is_unavailable() -> None:
    # SQLSTATE 57P03, "the database system is shutting down": a plain DBAPIError, not invalidated
    error = wrapped(asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"))
    assert not error.connection_invalidated
    assert database_unavailable(error)


def test_connection_errors_are_unavailable_and_a_bug_is_not() -> None:
    assert database_unavailable(sa.exc.OperationalError("x", None, Exception("gone")))
    assert database_unavailable(ConnectionRefusedError())
    assert not database_unavailable(wrapped(ValueError("a bug in a query")))
    assert not database_unavailable(sa.exc.IntegrityError("x", None, Exception("duplicate")))
