"""HTTP API of the dosing service: the visit calendar, and recording infusions and methotrexate."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from services.dosing import domain
from services.dosing import holds as holding
from services.dosing.config import protocol
from services.dosing.handlers import load_holds, load_record
from shared.auth import Principal
from shared.clock import Clock, SystemClock
from shared.events import EventData
from shared.permissions import Action, authorize_patient
from shared.service import CurrentPrincipal, CurrentRuntime, metadata_for
from shared.store import ConcurrencyError, EventStore, NewEvent
from shared.web import IsoAwareDateTime, Problem

router = APIRouter(prefix="/v1", tags=["dosing"])
Reason = Annotated[str, Field(min_length=3, max_length=2000)]


def clock(request: Request) -> Clock:
    """The app's clock: the wall clock, unless a test put another one in `app.state.clock`."""
    found: Clock = getattr(request.app.state, "clock", None) or SystemClock()
    return found


CurrentClock = Annotated[Clock, Depends(clock)]


class InfusionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    week: Annotated[int, Field(ge=0, le=1000)]
    given_at: IsoAwareDateTime
    weight_kg: Annotated[float, Field(gt=20, lt=300)]
    cells_administered: Annotated[int, Field(gt=0, le=10**12)]
    lot_number: Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._/-]+$")]
    deviation_reason: Reason | None = None


class MethotrexateDoseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    week: Annotated[int, Field(ge=0, le=1000)]
    dose_mg: Annotated[float, Field(allow_inf_nan=False)]  # the range is a domain guard
    given_at: IsoAwareDateTime
    deviation_reason: Reason | None = None


@router.get("/patients/{patient_id}/schedule")
async def schedule(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    stream = await rt.store.read_stream(domain.schedule_stream(patient_id))
    record = domain.fold(e.payload() for e in stream)
    authorize_patient(who, Action.READ_PATIENT, record.site_id)
    cur = record.current
    if cur is None:
        raise Problem(404, "patient_not_found", "No such patient")
    holds = holding.fold(e.payload() for e in await rt.store.read_stream(holding.HOLDS_STREAM))
    return schedule_view(record, holds)


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


async def record_dose(store: EventStore, patient_id: str, who: Principal,
                      command: domain.RecordInfusion | domain.RecordMethotrexateDose,
                      reason: str | None) -> list[EventData]:
    """Decide and append in one store transaction: the holds read here are the holds in force
    when the dose commits, so a hold consumed before the dose is always enforced, and of two
    posts for one visit the second reads the first one's dose (or loses the version race)."""
    try:
        async with store.transaction() as tx:
            record, version = await load_record(tx, patient_id)
            authorize_patient(who, Action.DOSE, record.site_id)
            holds, _ = await load_holds(tx)
            new = domain.decide_dose(record, holds, command, protocol())
            meta = metadata_for(who, reason=reason)
            await tx.append(domain.schedule_stream(patient_id),
                            [NewEvent.of(e, meta) for e in new], version)
    except ConcurrencyError as exc:  # another replica recorded something for this patient
        raise Problem(409, "conflict", "The patient's dosing record changed; retry") from exc
    return new


def _dose_body(new: list[EventData]) -> dict[str, object]:
    body: dict[str, object] = {**new[0].model_dump(mode="json"), "status": "given"}
    for extra in new[1:]:
        if extra.event_type() == "ProtocolDeviationRecorded":
            body["deviation"] = extra.model_dump(mode="json")
    return body


@router.post("/patients/{patient_id}/infusions", status_code=201)
async def record_infusion(patient_id: str, body: InfusionRequest, who: CurrentPrincipal,
                          rt: CurrentRuntime, now: CurrentClock) -> dict[str, object]:
    command = domain.RecordInfusion(
        infusion_id=str(uuid.uuid4()), week=body.week, given_at=body.given_at,
        weight_kg=body.weight_kg, cells_administered=body.cells_administered,
        lot_number=body.lot_number, deviation_reason=body.deviation_reason, now=now.now())
    return _dose_body(await record_dose(rt.store, patient_id, who, command, body.deviation_reason))


@router.post("/patients/{patient_id}/methotrexate-doses", status_code=201)
async def record_methotrexate_dose(patient_id: str, body: MethotrexateDoseRequest,
                                   who: CurrentPrincipal, rt: CurrentRuntime,
                                   now: CurrentClock) -> dict[str, object]:
    command = domain.RecordMethotrexateDose(
        dose_id=str(uuid.uuid4()), week=body.week, dose_mg=body.dose_mg, given_at=body.given_at,
        deviation_reason=body.deviation_reason, now=now.now())
    return _dose_body(await record_dose(rt.store, patient_id, who, command, body.deviation_reason))
