"""What a service's routes ask FastAPI for: the running service, its protocol, the caller, and the
metadata a write records about who did it and why."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shared.auth import Principal, authorization_header
from shared.clock import Clock, SystemClock
from shared.protocol import ProtocolConfig
from shared.runtime import Runtime
from shared.store import Metadata
from shared.web import current_request_id


# Every dependency is `async def`: FastAPI runs a plain `def` one in its thread pool, a thread hop
# each on every request (9 % of a read's time in dosing, 2026-12-02), for a few attribute reads.
async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def protocol(request: Request) -> ProtocolConfig:
    """The protocol version this process was started with (read once, at start-up)."""
    found: ProtocolConfig = request.app.state.protocol
    return found


async def principal(request: Request) -> Principal:
    """The caller, from its bearer token; every service checks it, not only the gateway.
    A missing or bad token raises `AuthError`, answered 401 by the problem handlers."""
    who = await (await runtime(request)).verifier.principal_of(authorization_header(request.headers))
    request.state.principal = who  # so a refusal later in the request can name who was refused
    return who


async def clock(request: Request) -> Clock:
    """The app's clock: the wall clock, unless the app was given another (`app.state.clock`)."""
    found: Clock = getattr(request.app.state, "clock", None) or SystemClock()
    return found


CurrentPrincipal = Annotated[Principal, Depends(principal)]
CurrentClock = Annotated[Clock, Depends(clock)]
CurrentRuntime = Annotated[Runtime, Depends(runtime)]
CurrentProtocol = Annotated[ProtocolConfig, Depends(protocol)]


def metadata_for(who: Principal, reason: str | None = None) -> Metadata:
    request_id = current_request_id()
    return Metadata(actor=who.sub, role=who.role, site=who.site, request_id=request_id,
                    correlation_id=request_id, reason=reason)
