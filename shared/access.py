"""Refused writes of known principals become `AccessDenied` events on `trial.access` (D19); a
monitor's or the DSMB's read of a patient's data becomes `PatientDataViewed` (D50)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Principal
from shared.deps import metadata_for, principal, runtime
from shared.events import AccessDenied, PatientDataViewed
from shared.metrics import route_template
from shared.store import EventStore, NewEvent, Transaction, utcnow
from shared.web import OnProblem, Problem, problem_response

log = logging.getLogger(__name__)
DENIED_STATUSES = frozenset({403, 404})
_PATIENT_IN_PATH = re.compile(r"^/v1/patients/([^/]+)")


async def record_access_denied(store: EventStore, who: Principal, service: str, method: str,
                               path: str, status: int, code: str) -> None:
    """Append AccessDenied to this service's store: relayed to `trial.access`, kept by audit."""
    found = _PATIENT_IN_PATH.match(path)
    denied = AccessDenied(access_id=str(uuid.uuid4()), service=service, method=method,
                          path=path[:500], status=status, code=code[:100],
                          patient_id=found.group(1)[:200] if found else None,
                          denied_at=utcnow())
    await store.append(f"access-{denied.access_id}", [NewEvent.of(denied, metadata_for(who))], 0)


def refused_writes_logger(service: str) -> OnProblem:
    """The problem handlers' hook: every 403 or 404 answered to a POST of a verified principal
    is recorded (probing shows)."""

    async def log_refusal(request: Request, problem: Problem) -> None:
        who = getattr(request.state, "principal", None)
        if (request.method == "POST" and problem.status in DENIED_STATUSES
                and isinstance(who, Principal)):
            try:
                await record_access_denied((await runtime(request)).store, who, service, request.method,
                                           request.url.path, problem.status, problem.code)
            except Exception as error:  # the refusal stands even if its record fails
                log.warning("could not record AccessDenied: %r", error)

    return log_refusal


class AccessDeniedReport(BaseModel):
    """The gateway's note of a write it refused before forwarding (token of the refused caller)."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(pattern=r"^[A-Z]{3,7}$")
    path: str = Field(pattern=r"^/v1/", max_length=500)
    status: int = Field(ge=403, le=404)
    code: str = Field(min_length=1, max_length=100)


def access_router() -> APIRouter:
    router = APIRouter(tags=["internal"], include_in_schema=False)

    @router.post("/internal/access-denied", status_code=202)
    async def access_denied(report: AccessDeniedReport, request: Request) -> JSONResponse:
        # The caller's own token: a report can only ever be about the principal who sends it.
        who = await principal(request)
        await record_access_denied((await runtime(request)).store, who, "gateway", report.method,
                                   report.path, report.status, report.code)
        return JSONResponse({"recorded": True}, status_code=202)

    return router


# Whose reads of a patient's data are audited (D50): the roles that read across sites. A site's
# own staff reading their patients is their work, not oversight.
VIEWERS = frozenset({"monitor", "dsmb"})
_PATIENT_READ = re.compile(r"^/v1/(?:audit/)?patients/([^/]+)")
# The query parameters that narrow a read to one patient: the audit's filters
# (`/v1/audit/events`, `/export`) and FHIR's search parameter (`/v1/fhir/AdverseEvent`, ...).
_PATIENT_PARAMS = ("patient_id", "patient")


def patient_read(scope: Scope) -> str | None:
    """The patient whose data a GET reads: named in its path, or by a query parameter that
    narrows the answer to that patient's entries."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    found = _PATIENT_READ.match(scope["path"])
    if found is not None:
        return found.group(1)
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return next((query[name][0] for name in _PATIENT_PARAMS if query.get(name)), None)


# How a service files a view: in its own store by default (relayed to trial.access, filed by the
# ledger); the ledger itself files it straight in (services.audit).
RecordView = Callable[[Transaction, PatientDataViewed, Principal], Awaitable[None]]


async def append_view(tx: Transaction, viewed: PatientDataViewed, who: Principal) -> None:
    await tx.append(f"view-{viewed.view_id}", [NewEvent.of(viewed, metadata_for(who))], 0)


class PatientReadAudit:
    """A GET of one patient's data (`/v1/patients/{id}...`, `/v1/audit/patients/{id}...`, or
    any read narrowed to a patient by `patient_id=` or `patient=`: the audit's events and
    export, FHIR's searches) answered 200 to a monitor or the DSMB is recorded before the answer
    leaves: when it cannot be recorded, the reader gets 503 and retries, so no such read goes
    unaudited (fails closed, like the dose checks)."""

    def __init__(self, app: ASGIApp, service: str, record: RecordView = append_view) -> None:
        self.app, self.service, self.record = app, service, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        patient_id = patient_read(scope)
        if patient_id is None:
            await self.app(scope, receive, send)
            return
        refused = False

        async def audited(message: Message) -> None:
            nonlocal refused
            if refused:
                return  # the body of an answer replaced by the 503 below
            if message["type"] == "http.response.start" and message["status"] == 200:
                who = scope.get("state", {}).get("principal")
                if isinstance(who, Principal) and who.role in VIEWERS:
                    try:
                        await self._record(scope, patient_id, who)
                    except Exception as error:
                        log.error("could not record PatientDataViewed: %r", error)
                        refused = True
                        answer = problem_response(Problem(
                            503, "view_not_recorded", "The read could not be recorded in the "
                            "audit trail; retry shortly", retry_after_s=1), {"Retry-After": "1"})
                        await answer(scope, receive, send)
                        return
            await send(message)

        await self.app(scope, receive, audited)

    async def _record(self, scope: Scope, patient_id: str, who: Principal) -> None:
        viewed = PatientDataViewed(view_id=str(uuid.uuid4()), service=self.service,
                                   route=route_template(scope)[:300],
                                   patient_id=patient_id[:200], viewed_at=utcnow())
        store = scope["app"].state.runtime.store
        async with store.transaction() as tx:
            await self.record(tx, viewed, who)
