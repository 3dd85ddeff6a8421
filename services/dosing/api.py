"""HTTP API of the dosing service: the visit calendar, and recording infusions and methotrexate."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from services.dosing import commands, domain, worklist
from services.dosing import holds as holding
from shared.auth import Principal
from shared.catchup import having_read, unless_lagging
from shared.deps import (
    CurrentClock,
    CurrentPrincipal,
    CurrentProtocol,
    CurrentRuntime,
    metadata_for,
)
from shared.errors import Refused
from shared.events import EFFICACY, ENROLLMENT, SAFETY, EventData
from shared.permissions import Action, authorize
from shared.protocol import ProtocolConfig
from shared.runtime import Runtime
from shared.web import IsoAwareDateTime, IsoDate

router = APIRouter(prefix="/v1", tags=["dosing"])
Reason = Annotated[str, Field(min_length=3, max_length=2000)]
PatientStatus = Literal["active", "treatment_discontinued", "withdrawn", "lost_to_follow_up",
                        "died", "completed"]


class InfusionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    week: Annotated[int, Field(ge=0, le=1000)]
    given_at: IsoAwareDateTime
    weight_kg: Annotated[float, Field(gt=20, lt=300)]
    cells_administered: Annotated[int, Field(gt=0, le=10**12)]
    lot_number: Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._/-]+$")]
    deviation_reason: Reason | None = None
    # Added: the site confirms a weight further than the protocol's fraction from the last one.
    weight_confirmed: bool = False


class MethotrexateDoseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    week: Annotated[int, Field(ge=0, le=1000)]
    dose_mg: Annotated[float, Field(allow_inf_nan=False)]  # the range is a domain guard
    given_at: IsoAwareDateTime
    deviation_reason: Reason | None = None


Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(max_length=500)]
SiteId = Annotated[str | None, Query(max_length=40)]


def _worklist_site(who: Principal, site: str | None, protocol: ProtocolConfig) -> str | None:
    """Site roles see their own site only (named or not); monitors and admins any, or all."""
    authorize(who, Action.READ_WORKLIST)
    if who.is_site_role:
        if site is not None and site != who.site:
            raise Refused("forbidden", "Site roles see only their own site's worklists")
        site = who.site
    if site is not None and site not in protocol.sites:
        raise Refused("unknown_site", f"Site {site} is not a site of this protocol version",
                      site_id=site)
    return site


@router.get("/patients")
async def patient_worklist(who: CurrentPrincipal, rt: CurrentRuntime, protocol: CurrentProtocol,
                           now: CurrentClock, site: SiteId = None,
                           status: Annotated[PatientStatus | None, Query()] = None,
                           limit: Limit = 100, cursor: Cursor = None) -> dict[str, object]:
    """A site's patients with their arm, status and next visit (the site's dates)."""
    chosen = _worklist_site(who, site, protocol)
    at = now.now()
    found = worklist.patients(await commands.records_at(rt.store, chosen),
                              lambda s: protocol.site_date(s, at), status, limit, cursor)
    return {"items": found.items, "next_cursor": found.next_cursor}


@router.get("/visits")
async def visit_worklist(who: CurrentPrincipal, rt: CurrentRuntime, protocol: CurrentProtocol,
                         now: CurrentClock, site: SiteId = None,
                         start: Annotated[IsoDate | None, Query(alias="from")] = None,
                         end: Annotated[IsoDate | None, Query(alias="to")] = None,
                         status: Annotated[worklist.VisitFilter | None, Query()] = None,
                         limit: Limit = 100, cursor: Cursor = None) -> dict[str, object]:
    """Doses and assessments due, overdue or missed, by due date in [from, to] (the site's
    dates); `overdue` takes in the missed ones too (D37)."""
    chosen = _worklist_site(who, site, protocol)
    if start is not None and end is not None and end < start:
        raise Refused("validation_error", "`to` is before `from`", field="to")
    at = now.now()
    found = worklist.visits(await commands.records_at(rt.store, chosen),
                            lambda s: protocol.site_date(s, at), start, end, status, limit,
                            cursor)
    return {"items": found.items, "next_cursor": found.next_cursor}


@router.get("/patients/{patient_id}/schedule")
async def schedule(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    found = await unless_lagging(rt, ENROLLMENT, patient_id,
                                 lambda: commands.schedule(rt.store, patient_id, who))
    return schedule_view(*found)


def schedule_view(record: domain.DosingRecord, holds: holding.Holds) -> dict[str, object]:
    assert record.current is not None and record.patient_id is not None
    visits = []
    for slot in record.slots():
        status: str = slot.status
        if slot.is_open and slot.visit.kind in ("infusion", "methotrexate") and holding.blocking(
                holds, record.patient_id, slot.arm, slot.visit.kind) is not None:
            status = "held"
        visits.append({**slot.visit.model_dump(mode="json", exclude_none=True), "arm": slot.arm,
                       "status": status})
    in_force = holding.applying_to(holds, record.patient_id, record.current.arm)
    return {
        "patient_id": record.patient_id, "site_id": record.site_id, "arm": record.current.arm,
        "anchor_date": str(record.current.anchor_date),
        "day_zero_fixed": record.current.day_zero_fixed, "withdrawn": record.withdrawn,
        "holds": [h.model_dump(mode="json") for h in in_force],
        "visits": visits,
    }


async def _record(rt: Runtime, patient_id: str, who: Principal, command: domain.DoseCommand,
                  protocol: ProtocolConfig) -> dict[str, object]:
    """Record the dose; a patient dosing has not heard of yet is waited for, never "unknown"."""
    async def record() -> list[EventData]:
        await asyncio.gather(  # all asked of the broker at once; any not read: 503
            having_read(rt, ENROLLMENT, patient_id),  # a withdrawal or a crossover, likewise
            having_read(rt, EFFICACY, patient_id),  # a discontinuation published a moment ago
            having_read(rt, SAFETY))  # a hold published a moment ago, on any key (D73)
        return await commands.record_dose(rt.store, patient_id, who, command, protocol,
                                          metadata_for(who, reason=command.deviation_reason))

    new = await unless_lagging(rt, ENROLLMENT, patient_id, record)
    return _dose_body(new)


def _dose_body(new: list[EventData]) -> dict[str, object]:
    body: dict[str, object] = {**new[0].model_dump(mode="json"), "status": "given"}
    for extra in new[1:]:
        if extra.event_type() == "ProtocolDeviationRecorded":
            body["deviation"] = extra.model_dump(mode="json")
    return body


@router.post("/patients/{patient_id}/infusions", status_code=201)
async def record_infusion(patient_id: str, body: InfusionRequest, who: CurrentPrincipal,
                          rt: CurrentRuntime, protocol: CurrentProtocol,
                          now: CurrentClock) -> dict[str, object]:
    command = domain.RecordInfusion(
        infusion_id=str(uuid.uuid4()), week=body.week, given_at=body.given_at,
        weight_kg=body.weight_kg, cells_administered=body.cells_administered,
        lot_number=body.lot_number, deviation_reason=body.deviation_reason, now=now.now(),
        weight_confirmed=body.weight_confirmed)
    return await _record(rt, patient_id, who, command, protocol)


@router.post("/patients/{patient_id}/methotrexate-doses", status_code=201)
async def record_methotrexate_dose(patient_id: str, body: MethotrexateDoseRequest,
                                   who: CurrentPrincipal, rt: CurrentRuntime,
                                   protocol: CurrentProtocol,
                                   now: CurrentClock) -> dict[str, object]:
    command = domain.RecordMethotrexateDose(
        dose_id=str(uuid.uuid4()), week=body.week, dose_mg=body.dose_mg, given_at=body.given_at,
        deviation_reason=body.deviation_reason, now=now.now())
    return await _record(rt, patient_id, who, command, protocol)
