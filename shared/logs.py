"""Structured logs: one structlog configuration for every service and the gateway.

Every line, structlog's and the standard library's (`logging.getLogger(__name__).warning(...)`,
uvicorn's, aiokafka's) goes through one formatter on the root logger: a JSON object a line
(`TRIAL_LOG_FORMAT=json`, the default with `TRIAL_ENV=production`) or a readable line
(`console`, the development default). Each carries `timestamp` (UTC, ISO 8601), `level`,
`service`, `event` (the message), and, inside a request or a consumed record, `request_id`,
`correlation_id` (the request id, or the record's correlation id) and, when tracing is on,
`trace_id` and `span_id`.

`RequestLogMiddleware` writes one line per HTTP request (uvicorn's access log is turned off): the
method, the route *template* (never the raw path nor the query string), the status, the duration
and the principal (the token's `sub` and role). `consumed` writes one line per Kafka record a
consumer handled. Nothing here reads a request's body or headers other than X-Request-ID's echo,
so no patient data, token or secret is written; `_scrub` also blanks anything token-like a
message or an `extra=` might carry.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.optional import without
from shared.settings import Settings
from shared.web import current_request_id

with without("rich"):  # structlog's pretty tracebacks: these logs print plain stacks (below)
    import structlog

REQUEST_LOGGER = "trial.request"
CONSUMER_LOGGER = "trial.consumer"
# Requests an orchestrator or a scraper makes every few seconds: their lines are DEBUG.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_HANDLER_NAME = "trial-structlog"
_state: dict[str, Any] = {"service": None, "format": None, "level": None, "direct": None}

# Keys a line never keeps, whoever adds them (an `extra=`, a bound value).
_SECRET_KEYS = re.compile(r"authorization|token|secret|password|passwd|cookie|api[_-]?key|jwt",
                          re.IGNORECASE)
# A bearer token or a JWT inside any text (a message, an exception's repr).
_TOKEN_TEXT = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+|\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
                         r"(?:\.[A-Za-z0-9_-]*)?")
_KEEP = frozenset({"event", "timestamp", "level", "service", "request_id", "correlation_id",
                   "trace_id", "span_id", "logger", "principal"})


def _add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("service", _state["service"])
    return event


def _add_request_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The request id of the request this line is written in (shared/web.py's), and the
    correlation id: the request's, unless a consumed record bound its own."""
    request_id = event.get("request_id") or current_request_id()
    if request_id is not None:
        event["request_id"] = request_id
        event.setdefault("correlation_id", request_id)
    return event


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # A process that never imported shared.tracing has no tracing on (and the import, here, a
    # cycle); a lookup rather than an import statement: this runs for every line.
    tracing = sys.modules.get("shared.tracing")
    if tracing is not None and tracing.enabled():
        ids = tracing.current_ids()
        if ids is not None:
            event.setdefault("trace_id", ids[0])
            event.setdefault("span_id", ids[1])
    return event


_plain_keys: set[str] = set()  # keys seen and never blanked (few: the code's own), bounded
_secret_keys: set[str] = set()  # keys seen and always blanked


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank a value under a secret-sounding key, and token-like text in any text value.
    Every line passes here, so the common case (known keys, no token) is two C-speed checks:
    the keys against those already classified, then one search over the text values joined."""
    if not event.keys() <= _plain_keys:
        for key in [k for k in event if k not in _plain_keys]:
            if key in _secret_keys or (key not in _KEEP and _SECRET_KEYS.search(key) is not None):
                if len(_secret_keys) < 10_000:
                    _secret_keys.add(key)
                event[key] = "[redacted]"
            elif len(_plain_keys) < 10_000:
                _plain_keys.add(key)
    texts = "\n".join([value for value in event.values() if isinstance(value, str)])
    if "eyJ" in texts or "earer" in texts:
        for key, value in event.items():
            if isinstance(value, str) and ("eyJ" in value or "earer" in value):
                event[key] = _TOKEN_TEXT.sub("[redacted]", value)
    return event


def _drop_color_message(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.pop("color_message", None)  # uvicorn's copy of its message, with terminal colours
    event.pop("message", None)  # the formatted message of a record formatted before: `event`
    return event


_FIRST = ("timestamp", "level", "service", "event")


def _ordered(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """When, how bad, who and what first: the rest as they came."""
    return {**{key: event[key] for key in _FIRST if key in event}, **event}


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        _add_service,
        _add_request_ids,
        _add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def _dumps(line: Any, **options: Any) -> str:
    """A line's JSON: orjson's (D82: about a third of a line's cost less than the standard
    library's encoder, and a line is written for every request and every record), the standard
    library's for what orjson refuses (an integer past 64 bits, a key that is not text)."""
    try:
        return orjson.dumps(line, default=options.get("default")).decode()
    except TypeError:
        return json.dumps(line, **options)


def log_format(settings: Settings) -> str:
    """`TRIAL_LOG_FORMAT`, else JSON in production and the console elsewhere."""
    return settings.log_format or ("json" if settings.env == "production" else "console")


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    """Route every logger of the process through structlog's formatter. Called by every app
    factory; again with the same settings it changes nothing, with others it re-configures
    (several apps share a process in tests: the service of a line outside any request is the
    last one configured; inside one it is the request's own, bound by the middleware).
    Lines go to standard error, or to `stream` (a test's)."""
    fmt, level = log_format(settings), settings.log_level.upper()
    _state["service"] = settings.service_name
    if stream is None and (_state["format"], _state["level"]) == (fmt, level) and _installed():
        _quiet_uvicorn(level)
        return
    _state.update(format=fmt, level=level)
    renderer: Any = (structlog.processors.JSONRenderer(_dumps) if fmt == "json"
                     # A plain stack: rich's, with every frame's locals, printed thousands of
                     # lines per error (the event loop stalled 12-31 s, long enough to lose a
                     # Kafka session: docs/faults.md, defect 4), and locals can hold patient data.
                     else structlog.dev.ConsoleRenderer(
                         colors=sys.stderr.isatty(),
                         exception_formatter=structlog.dev.plain_traceback))
    final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
             structlog.processors.format_exc_info, _scrub, _ordered, renderer]
    if fmt != "json":
        final.remove(structlog.processors.format_exc_info)  # the console renderer prints stacks
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_shared_processors(),
                                                    processors=final)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_shared_processors(),
                    structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream) if stream is not None else _StandardError()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    # The same chain, for the lines written a request or a record at a time (_write): the
    # formatter's processors less the two that handle a standard LogRecord, which has none.
    chain = [p for p in (*_shared_processors(), *final)
             if not isinstance(p, structlog.stdlib.ExtraAdder)
             and p is not structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    _state["direct"] = (handler, chain)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _quiet_uvicorn(level)


class _StandardError(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test runner swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _installed() -> bool:
    return any(h.get_name() == _HANDLER_NAME for h in logging.getLogger().handlers)


def _quiet_uvicorn(level: str) -> None:
    """uvicorn's access log off (RequestLogMiddleware writes the line, by route template; with no
    handler uvicorn does not even format its own), its other lines through the root's; httpx's
    per-call lines off."""
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    for name in ("uvicorn", "uvicorn.error"):
        found = logging.getLogger(name)
        found.handlers.clear()
        found.propagate = True
    # httpx writes a line per call with its whole URL (a patient's id, a query): the gateway's
    # forwarded request is the request's own line already; aiohttp (the gateway's client, D69)
    # likewise keeps to warnings.
    # alembic's start-up chatter and aiokafka's group and metadata news: warnings and worse only
    # (all of it with TRIAL_LOG_LEVEL=DEBUG).
    for name in ("httpx", "httpcore", "aiohttp", "alembic", "aiokafka"):
        logging.getLogger(name).setLevel(logging.WARNING if level != "DEBUG" else logging.NOTSET)


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)


_METHODS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
            logging.ERROR: "error"}


def _write(logger: logging.Logger, level: int, event: str, *lines: dict[str, Any]) -> None:
    """Lines of a request or of consumed records (`lines`, each its fields), through exactly the
    processors and the handler `configure_logging` installed, without the standard library's
    LogRecord and structlog's wrapping around it: 13 us a line instead of 34 (JSON; 28 instead of
    50 on the console), paid by every request and every record each service handles (D60); the
    lines of one call written and flushed at once (D67). The caller has checked the level. In a
    process that never configured logging, structlog's own path."""
    direct = _state["direct"]
    if direct is None:
        for fields in lines:
            structlog.stdlib.get_logger(logger.name).log(level, event, **fields)
        return
    handler, chain = direct
    method = _METHODS.get(level, "critical")
    rendered = []
    for fields in lines:
        line: Any = {**fields, "event": event}
        for processor in chain:
            line = processor(logger, method, line)
        rendered.append(line + handler.terminator)
    handler.acquire()
    try:
        handler.stream.write("".join(rendered))
        handler.flush()
    except Exception:  # as logging's own handlers: a line that cannot be written stops nothing
        sys.stderr.write(f"--- a log line could not be written: {event}\n")
    finally:
        handler.release()


_request_log = logging.getLogger(REQUEST_LOGGER)


def _principal(scope: Scope) -> dict[str, Any] | None:
    who = scope.get("state", {}).get("principal")
    sub, role = getattr(who, "sub", None), getattr(who, "role", None)
    return {"sub": sub, "role": role} if sub is not None else None


def _route_template(scope: Scope) -> str:
    from shared.metrics import route_template

    return route_template(scope)


class RequestLogMiddleware:
    """One line per HTTP request, once its answer is sent (or it failed): method, route template,
    status, duration, principal, request id. The service is bound for every line the request
    writes. The route comes from `route` (the gateway passes its public route table)."""

    def __init__(self, app: ASGIApp, service: str,
                 route: Callable[[Scope], str] = _route_template) -> None:
        self.app = app
        self.service = service
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, request_id = 500, None
        scope.setdefault("state", {})  # shared with any copy of the scope further in
        tokens = structlog.contextvars.bind_contextvars(service=self.service)

        async def watch(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope.get("path", "")
            level = (logging.DEBUG if path in PROBES else
                     logging.ERROR if status >= 500 else logging.INFO)
            if _request_log.isEnabledFor(level):
                _write(_request_log, level, "request", {
                    "method": scope.get("method"), "route": self.route(scope), "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "principal": _principal(scope), "request_id": request_id})
            structlog.contextvars.reset_contextvars(**tokens)


_consumer_log = logging.getLogger(CONSUMER_LOGGER)


def _consumed_fields(*, service: str, group: str, topic: str, partition: int, offset: int,
                     event_id: str | None, event_type: str | None, correlation_id: str | None,
                     outcome: str, duration_ms: float, batch: int | None = None,
                     ids: tuple[str, str] | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"service": service, "group": group, "topic": topic,
                              "partition": partition, "offset": offset, "event_id": event_id,
                              "type": event_type, "outcome": outcome,
                              "duration_ms": round(duration_ms, 2)}
    if correlation_id is not None:
        fields["correlation_id"] = correlation_id
    if batch is not None:
        fields["batch"] = batch
    if ids is not None:  # the record's own trace and span, not the current ones (a batch's)
        fields["trace_id"], fields["span_id"] = ids
    return fields


def _consumed_level(outcome: str) -> int:
    return logging.ERROR if outcome == "dead-lettered" else logging.INFO


def consumed(*, service: str, group: str, topic: str, partition: int, offset: int,
             event_id: str | None, event_type: str | None, correlation_id: str | None,
             outcome: str, duration_ms: float, batch: int | None = None) -> None:
    """The line of one record a consumer is done with: handled, duplicate, skipped (no handler
    of this service wants it) or dead-lettered."""
    level = _consumed_level(outcome)
    if _consumer_log.isEnabledFor(level):
        _write(_consumer_log, level, "record consumed", _consumed_fields(
            service=service, group=group, topic=topic, partition=partition, offset=offset,
            event_id=event_id, event_type=event_type, correlation_id=correlation_id,
            outcome=outcome, duration_ms=duration_ms, batch=batch))


def consumed_lines(records: list[dict[str, Any]]) -> None:
    """`consumed`'s line for each of `records` (its keywords each), written and flushed once for
    the lot: a batch of a thousand records is a thousand lines, one write (D67)."""
    by_level: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        level = _consumed_level(record["outcome"])
        if _consumer_log.isEnabledFor(level):
            by_level.setdefault(level, []).append(_consumed_fields(**record))
    for level, lines in by_level.items():
        _write(_consumer_log, level, "record consumed", *lines)


__all__ = ["RequestLogMiddleware", "configure_logging", "consumed", "consumed_lines", "get_logger",
           "log_format"]
