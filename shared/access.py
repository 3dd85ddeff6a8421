"""Refused writes of known principals become `AccessDenied` events on `trial.access` (D19)."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shared.auth import Principal
from shared.deps import metadata_for, principal, runtime
from shared.events import AccessDenied
from shared.store import EventStore, NewEvent, utcnow
from shared.web import OnProblem, Problem

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
                await record_access_denied(runtime(request).store, who, service, request.method,
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
        who = principal(request)
        await record_access_denied(runtime(request).store, who, "gateway", report.method,
                                   report.path, report.status, report.code)
        return JSONResponse({"recorded": True}, status_code=202)

    return router
