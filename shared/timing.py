"""Where a request's time went, in its answer's `Server-Timing` header (W3C Server Timing, D90).

    Server-Timing: commit;dur=4.2, publish;dur=9.8, app;dur=21.5

Every answer of every service carries `app`, the time from the request's arrival at this
middleware to its answer's start (the idempotency key's bookkeeping included), and the parts the
code times with `timed()`, each summed over the request:

- `commit`: waiting for the store's group commit to write the request's events (the queue
  behind other writers, the write and, on SQLite, its fsync);
- `publish`: waiting for the relay to put them on the broker before answering (D56).

The gateway adds `upstream` (its round trip to the service) and `gateway` (its whole answer)
beside the service's own entries, which it passes on. A site or an operator reading one slow
answer sees at once whether the database, the broker or the service itself took the time; the
target 3 benchmark reads the same header. Durations are milliseconds, as the standard has them.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The current request's parts, in milliseconds (None outside a request: a consumer's work).
_spent: ContextVar[dict[str, float] | None] = ContextVar("server_timing", default=None)

HEADER = b"server-timing"


def timed(name: str, seconds: float) -> None:
    """Add `seconds` to the current request's `name` (nothing outside a request)."""
    spent = _spent.get()
    if spent is not None:
        spent[name] = spent.get(name, 0.0) + seconds * 1000


def entries(header: str) -> dict[str, float]:
    """`{"commit": 4.2, ...}` from a `Server-Timing` value (several headers joined by commas);
    an entry without a duration is left out."""
    found: dict[str, float] = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key.strip().lower() == "dur":
                try:
                    found[name] = found.get(name, 0.0) + float(value)
                except ValueError:
                    pass
    return found


class ServerTimingMiddleware:
    """Puts `Server-Timing` on every HTTP answer: the parts timed during the request, then
    `total` for the whole, from here to the answer's start."""

    def __init__(self, app: ASGIApp, total: str = "app") -> None:
        self.app = app
        self.total = total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        spent: dict[str, float] = {}
        token = _spent.set(spent)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                parts = [*spent.items(), (self.total, (time.perf_counter() - started) * 1000)]
                value = ", ".join(f"{name};dur={ms:.1f}" for name, ms in parts)
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (HEADER, value.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            _spent.reset(token)
