"""HTTP conventions shared by the gateway and every service: problem+json (and the one table from a
domain's refusal code to its HTTP status), request ids, body limits, strict query strings."""

from __future__ import annotations

import logging
import re
import types
import typing
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, AwareDatetime, BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import AuthError, NoBearerToken
from shared.errors import ConcurrencyError, Refused

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


class Problem(Exception):
    """A domain or protocol error with a stable `code`, answered as RFC 9457 problem+json."""

    def __init__(self, status: int, code: str, title: str, detail: str | None = None,
                 **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.code, self.title, self.detail, self.extra = (
            status, code, title, detail, extra)
        self.headers: dict[str, str] = {}  # answered with it (Retry-After, ...)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://nct03424629.example/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
        }
        if self.detail:
            body["detail"] = self.detail
        body.update(self.extra)
        return body


def database_unavailable_problem() -> Problem:
    """The answer while a service's database is down or restarting: retry the same request (with
    the same Idempotency-Key) after Retry-After; nothing was written (issue 15)."""
    problem = Problem(503, "database_unavailable", "The service's database is unavailable",
                      "Send the same request again, with the same Idempotency-Key, after "
                      "Retry-After")
    problem.headers = {"Retry-After": "2"}
    return problem


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(problem.body(), status_code=problem.status, media_type=PROBLEM_JSON,
                        headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
                 429: "rate_limited", 502: "bad_gateway", 503: "unavailable",
                 504: "gateway_timeout"}


# Every code a domain or the permission matrix refuses with, and its HTTP status: the one place a
# refusal becomes a status. tests/unit/test_refusal_codes.py finds every code raised in the code.
REFUSAL_STATUS: dict[str, int] = {
    # the permission matrix, and the protocol's sites
    "forbidden": 403, "patient_not_found": 404, "unknown_site": 422,
    # randomization
    "screening_not_found": 404, "not_eligible": 422, "already_enrolled": 409,
    "already_randomized": 409, "withdrawn": 409, "trial_halted": 409, "enrollment_paused": 409,
    "arm_suspended": 409, "enrollment_closed": 409, "crossover_disabled": 409,
    "not_randomized": 409, "already_crossed_over": 409, "crossover_not_allowed": 422,
    "crossover_too_early": 409,
    # dosing
    "wrong_arm": 422, "not_a_dosing_week": 422, "already_given": 409, "visit_cancelled": 409,
    "dosing_held": 409, "given_in_future": 422, "dose_out_of_range": 422, "out_of_window": 422,
    "given_before_assignment": 422,
    "dose_mismatch": 422, "dose_step_exceeded": 422, "weight_change_unconfirmed": 422,
    "safety_record_unapplied": 409, "no_such_unapplied_record": 404,
    # safety
    "onset_in_future": 422, "adverse_event_not_found": 404, "empty_follow_up": 422,
    "resolved_before_onset": 422, "validation_error": 422, "collected_in_future": 422,
    "hold_not_found": 404, "no_active_hold": 409, "inconsistent_adverse_event": 422,
    "hold_target_not_found": 404,
    # efficacy
    "assessed_in_future": 422, "not_an_assessment_week": 422, "already_assessed": 409,
    "assessment_visits_unknown": 409, "study_ended": 409, "assessment_not_found": 404,
    "nothing_to_correct": 422, "already_discontinued": 409,
    # dosing, after a disposition; worklists
    "treatment_discontinued": 409, "bad_cursor": 422,
    # reports
    "resource_not_found": 404,
}


def refusal_problem(refused: Refused) -> Problem:
    status = REFUSAL_STATUS.get(refused.code)
    if status is None:  # a code missing from the table is our bug, but still the caller's refusal
        log.error("refusal code %r has no HTTP status in REFUSAL_STATUS; answering 422",
                  refused.code)
        status = 422
    return Problem(status, refused.code, refused.message, **refused.details)


CONFLICT = Problem(409, "conflict", "The record changed while this request ran; retry")


def problem_for(error: Refused | ConcurrencyError) -> Problem:
    """What a caller is answered for a command's domain error."""
    if isinstance(error, Refused):
        return refusal_problem(error)
    # Another writer (a replica, a concurrent request) moved the stream: nothing was written.
    return CONFLICT
# Called with every problem a request is answered with (the services log refused writes, D19).
OnProblem = Callable[[Request, Problem], Awaitable[None]]


def install_problem_handlers(app: FastAPI, on_problem: OnProblem | None = None) -> None:
    """Problems, domain refusals, version conflicts, validation and HTTP errors: problem+json."""

    async def answer(request: Request, problem: Problem) -> JSONResponse:
        if on_problem is not None:
            await on_problem(request, problem)
        headers = {**problem.headers,
                   **({"WWW-Authenticate": "Bearer"} if problem.status == 401 else {})}
        return problem_response(problem, headers or None)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return await answer(request, exc)

    @app.exception_handler(Refused)
    @app.exception_handler(ConcurrencyError)
    async def _domain(request: Request, exc: Refused | ConcurrencyError) -> JSONResponse:
        problem = problem_for(exc)
        protocol = getattr(request.app.state, "protocol", None)
        if isinstance(exc, Refused) and protocol is not None:
            # Which version's rule refused it: a refusal is read against the protocol it applied.
            problem.extra.setdefault("protocol_version", protocol.version)
        return await answer(request, problem)

    @app.exception_handler(AuthError)
    async def _unauthenticated(request: Request, exc: AuthError) -> JSONResponse:
        if isinstance(exc, NoBearerToken):
            return await answer(request, Problem(401, "unauthorized", str(exc)))
        return await answer(request, Problem(401, "unauthorized", "The bearer token is not valid",
                                             detail=str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"],
                   "type": e["type"]} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem_response(Problem(400, "malformed_json", "Request body is not JSON",
                                            errors=errors))
        return problem_response(Problem(422, "validation_error", "Request is not valid",
                                        errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return problem_response(Problem(400, "malformed_json", "Request body is not UTF-8 JSON"))
        code = _STATUS_CODES.get(exc.status_code, "error")
        return problem_response(Problem(exc.status_code, code, str(exc.detail)))



# --- dates and times on the wire: ISO 8601 text only ---------------------------------------------
# Pydantic would also take a number as seconds since 1970: `since=2026` would read as
# 1970-01-01T00:33:46Z and an audit query would silently answer for the wrong half-century.
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_only(pattern: re.Pattern[str], what: str) -> BeforeValidator:
    def check(value: object) -> object:
        if isinstance(value, str) and pattern.match(value):
            return value
        if isinstance(value, date) and not isinstance(value, str):
            return value  # already parsed (Python callers)
        raise ValueError(f"must be an ISO 8601 {what}")

    return BeforeValidator(check)


def _utc(value: datetime) -> datetime:
    """An instant with a zone, as UTC: stored and returned in UTC whatever offset it came in."""
    return value.astimezone(UTC) if value.tzinfo is not None else value


# The dates a request may carry: a year inside Python's range at either end, so that a time's
# UTC instant, any site's local date and the trial's windows can all be worked out from them.
# Beyond, a 422 saying so, where `astimezone` or a date's arithmetic would raise OverflowError:
# a 500 for bad input.
EARLIEST_DATE, LATEST_DATE = date(2, 1, 1), date(9998, 12, 31)


def _in_range(value: date) -> date:
    day = value.date() if isinstance(value, datetime) else value
    if not EARLIEST_DATE <= day <= LATEST_DATE:
        raise ValueError(f"must be between {EARLIEST_DATE.isoformat()} and "
                         f"{LATEST_DATE.isoformat()}")
    return value


_IN_RANGE = AfterValidator(_in_range)
IsoDate = Annotated[date, _iso_only(_ISO_DATE, "date (YYYY-MM-DD)"), _IN_RANGE]
IsoDateTime = Annotated[datetime, _iso_only(_ISO_DATETIME, "date-time"), _IN_RANGE,
                        AfterValidator(_utc)]
IsoAwareDateTime = Annotated[AwareDatetime, _iso_only(_ISO_DATETIME, "date-time with a time zone"),
                             _IN_RANGE, AfterValidator(_utc)]


def _repeatable(annotation: Any) -> bool:
    """A list-typed query parameter (`?x=1&x=2`); `X | None` is looked through."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin in (typing.Union, types.UnionType) and any(
        _repeatable(a) for a in typing.get_args(annotation))


def _declared_query(route: Any) -> dict[str, bool]:
    """The route's query parameters (its dependencies' too): name -> may it repeat.
    Worked out once per route, on its first request, and kept on the route."""
    cached: dict[str, bool] | None = getattr(route, "_trial_declared_query", None)
    if cached is None:
        cached = _walk_query(route)
        route._trial_declared_query = cached
    return cached


def _walk_query(route: object) -> dict[str, bool]:
    names: dict[str, bool] = {}
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is not None:
            names.update((p.alias, _repeatable(p.field_info.annotation)) for p in dependant.query_params)
            pending.extend(dependant.dependencies)
    return names


# A NUL character in JSON text: `\\u0000` after an even number of backslashes (`\\\\u0000` is a
# backslash, then the letters).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


async def strict_input(request: Request) -> None:
    """Every route's input checks beyond its models (D23). Unknown query parameters are refused,
    as unknown body fields are (`extra="forbid"`), and so is a single-valued parameter given
    twice (which of the two would count is anybody's guess).

    A filter misspelt as `?patinet_id=` must not silently answer with the unfiltered audit log.
    Nor may a path or query parameter, or a string of the JSON body, hold a NUL character
    (`%00`, `\\u0000`): no identifier or text of the trial has one, and PostgreSQL's text
    refuses it, so a lookup by it would fail as a 500 instead of a 422.
    """
    route = request.scope.get("route")
    if route is None:
        return
    declared = _declared_query(route)
    errors = [{"field": f"{where}.{name}", "message": "Must not contain a NUL character",
               "type": "string_nul"}
              for where, items in (("path", request.path_params.items()),
                                   ("query", request.query_params.multi_items()))
              for name, value in items if isinstance(value, str) and "\x00" in value]
    if request.method in ("POST", "PUT", "PATCH") and _JSON_NUL.search(await request.body()):
        errors.append({"field": "body", "message": "Must not contain a NUL character",
                       "type": "string_nul"})
    for name in sorted(set(request.query_params)):
        if name not in declared:
            errors.append({"field": f"query.{name}", "message": "Unknown query parameter",
                           "type": "extra_forbidden"})
        elif not declared[name] and len(request.query_params.getlist(name)) > 1:
            errors.append({"field": f"query.{name}", "message": "Given more than once",
                           "type": "repeated_parameter"})
    if errors:
        raise Problem(422, "validation_error", "Request is not valid", errors=errors[:20])


def health_router(ready: Callable[[Request], Awaitable[dict[str, bool]]],
                  report: Callable[[Request], Awaitable[dict[str, Any]]] | None = None,
                  detail: Callable[[Request], Awaitable[dict[str, Any]]] | None = None
                  ) -> APIRouter:
    """`/healthz` (the process answers: always 200 while it runs; `detail` adds what an operator
    should see, like a broker outage) and `/readyz` (every dependency `ready` checks is up;
    `report` adds what else the answer shows, without deciding it)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        if detail is None:
            return {"status": "ok"}
        try:
            return {"status": "ok", "detail": await detail(request)}
        except Exception as exc:  # liveness never fails on what it only reports
            return {"status": "ok", "detail": {"error": type(exc).__name__}}

    @router.get("/readyz")
    async def readyz(request: Request) -> dict[str, object]:
        checks = await ready(request)
        extra = await report(request) if report is not None else {}
        if not all(checks.values()):
            raise Problem(503, "not_ready", "Not ready", checks=checks, **extra)
        return {"status": "ready", "checks": checks, **extra}

    return router


def internal_error(request_id: str | None) -> JSONResponse:
    return problem_response(Problem(500, "internal_error", "Internal error", request_id=request_id))


class RequestIdMiddleware:
    """Takes the caller's X-Request-ID (if well-formed) or makes one, and echoes it back.

    It also turns an unexpected exception into a 500 problem carrying the request id: the stack
    goes to the log, never to the caller.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        token = request_id_var.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            await internal_error(request_id)(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Refuses a request body over `max_bytes` with 413 before anything reads it whole.

    A declared Content-Length over the limit is refused before a byte is read. A body without
    one (chunked) is counted as it arrives: past the limit this middleware answers 413 itself,
    tells the app the client has gone, and drops whatever the app still tries to send. Nothing
    is written, since no handler ever sees the body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return problem_response(Problem(413, "payload_too_large", "Request body is too large",
                                        f"At most {self.max_bytes} bytes"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received, refused, app_started = 0, False, False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not app_started:
                        await self._too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started
            if refused:
                return  # our 413 went out instead
            app_started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not refused:
                raise
            # The app failed on the body it never got whole (a "client disconnected" error):
            # the caller already has its 413.


def current_request_id() -> str | None:
    return request_id_var.get()
