"""HTTP API of the dosing service: the patient's visit calendar."""

from __future__ import annotations

from fastapi import APIRouter

from services.dosing.handlers import schedule_stream
from shared.events import DosingScheduleCreated
from shared.service import CurrentPrincipal, CurrentRuntime
from shared.web import Problem

router = APIRouter(prefix="/v1", tags=["dosing"])
READ_ALL_ROLES = {"monitor", "dsmb", "admin"}


@router.get("/patients/{patient_id}/schedule")
async def schedule(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    stream = await rt.store.read_stream(schedule_stream(patient_id))
    created = next((e.payload() for e in stream if e.type == "DosingScheduleCreated"), None)
    if not isinstance(created, DosingScheduleCreated) or (
            who.role not in READ_ALL_ROLES and who.site != created.site_id):
        raise Problem(404, "schedule_not_found", "No schedule for this patient")
    return {
        "patient_id": patient_id,
        "arm": created.arm,
        "visits": [{**v.model_dump(mode="json", exclude_none=True), "status": "planned"}
                   for v in created.visits],
    }
