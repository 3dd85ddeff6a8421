"""Domain errors: what a decision refuses, and a stream that moved on. Pure: no web, no database."""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    """A command the trial's rules refuse: a stable `code`, a sentence, and details for the caller.

    Domains raise it and choose no HTTP status: the web layer's one table (`shared.web`) maps the
    code to its status, and nothing is written.
    """

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class ConcurrencyError(Exception):
    """The stream moved on since the caller read it: reload and retry, or answer 409."""

    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(f"stream {stream_id!r}: expected version {expected}, found {actual}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual
