"""HTTP API of the safety service: adverse events, follow-ups, lab results, DSMB decisions, status."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from services.safety import commands, domain
from shared.deps import CurrentPrincipal, CurrentProtocol, CurrentRuntime, metadata_for
from shared.events import AdverseEventOutcome, LabResult
from shared.permissions import Action, authorize, sees_site
from shared.web import IsoAwareDateTime

router = APIRouter(prefix="/v1", tags=["safety"])
Relatedness = Literal["not_related", "unlikely", "possible", "probable", "definite"]
Term = Annotated[str, Field(min_length=2, max_length=200)]


class AdverseEventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    term: Term
    onset_at: IsoAwareDateTime
    ctcae_grade: Annotated[int, Field(ge=1, le=5, strict=True)]
    serious: Annotated[bool, Field(strict=True)]
    relatedness: Relatedness
    expected: Annotated[bool, Field(strict=True)]
    infusion_related: Annotated[bool | None, Field(strict=True)] = None
    outcome: AdverseEventOutcome | None = None


class FollowUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ctcae_grade: Annotated[int | None, Field(ge=1, le=5, strict=True)] = None
    serious: Annotated[bool | None, Field(strict=True)] = None
    relatedness: Relatedness | None = None
    expected: Annotated[bool | None, Field(strict=True)] = None
    outcome: AdverseEventOutcome | None = None
    resolved_at: IsoAwareDateTime | None = None


class LabValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    analyte: Literal["ALT", "AST", "WBC", "neutrophils", "platelets"]
    value: Annotated[float, Field(ge=0, lt=1e6)]
    unit: Annotated[str, Field(min_length=1, max_length=20)]
    uln: Annotated[float | None, Field(gt=0, lt=1e6)] = None


class LabResultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collected_at: IsoAwareDateTime
    results: Annotated[list[LabValue], Field(min_length=1, max_length=20)]


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Literal["trial", "arm", "patient"]
    target: Annotated[str, Field(min_length=1, max_length=64)]
    decision: Literal["resume"]
    rationale: Annotated[str, Field(min_length=10, max_length=5000)]
    hold_id: Annotated[str | None, Field(min_length=1, max_length=64)] = None  # lift only this one


@router.post("/patients/{patient_id}/adverse-events", status_code=201)
async def report_adverse_event(patient_id: str, body: AdverseEventRequest, who: CurrentPrincipal,
                               rt: CurrentRuntime, protocol: CurrentProtocol
                               ) -> dict[str, object]:
    report = domain.ReportAdverseEvent(patient_id=patient_id, **body.model_dump())
    adverse_event_id, emitted = await commands.report_adverse_event(
        rt.store, protocol, who, report, metadata_for(who))
    return {"adverse_event_id": adverse_event_id,
            "infusion_related": getattr(emitted[0].event, "infusion_related", None),
            "triggered_rules": commands.fired(emitted)}


@router.post("/patients/{patient_id}/adverse-events/{adverse_event_id}/follow-ups",
             status_code=201)
async def follow_up(patient_id: str, adverse_event_id: str, body: FollowUpRequest,
                    who: CurrentPrincipal, rt: CurrentRuntime,
                    protocol: CurrentProtocol) -> dict[str, object]:
    change = domain.FollowUp(patient_id=patient_id, adverse_event_id=adverse_event_id,
                             **body.model_dump())
    follow_up_id, emitted = await commands.follow_up(rt.store, protocol, who, change,
                                                     metadata_for(who))
    return {"follow_up_id": follow_up_id, "adverse_event_id": adverse_event_id,
            "triggered_rules": commands.fired(emitted)}


@router.post("/patients/{patient_id}/lab-results", status_code=201)
async def report_lab_result(patient_id: str, body: LabResultRequest, who: CurrentPrincipal,
                            rt: CurrentRuntime, protocol: CurrentProtocol) -> dict[str, object]:
    results = tuple(LabResult.model_validate(r.model_dump()) for r in body.results)
    lab_result_id, emitted = await commands.report_lab_result(
        rt.store, protocol, who, patient_id, body.collected_at, results, metadata_for(who))
    return {"lab_result_id": lab_result_id, "triggered_rules": commands.fired(emitted)}


@router.post("/safety/decisions", status_code=201)
async def decide(body: DecisionRequest, who: CurrentPrincipal, rt: CurrentRuntime,
                 protocol: CurrentProtocol) -> dict[str, object]:
    authorize(who, Action.DSMB_DECISION)
    lift = domain.Lift(body.scope, body.target, body.hold_id, body.rationale, who.sub)
    emitted = await commands.lift_holds(rt.store, protocol, who, lift,
                                        metadata_for(who, reason=body.rationale))
    return {"decision": body.decision, "scope": body.scope, "target": body.target,
            "lifted": [e.model_dump(mode="json", include={"hold_id", "scope", "target"})
                       for _, e in emitted]}


@router.get("/safety/status")
async def status(who: CurrentPrincipal, rt: CurrentRuntime,
                 protocol: CurrentProtocol) -> dict[str, object]:
    authorize(who, Action.READ_SAFETY_STATUS)
    state = await commands.state(rt.store, protocol)
    view = domain.status(protocol.safety, state, protocol.enrollment_cap)
    if who.is_site_role:  # another site's patients must not leak through the trial's status
        sites = {p.patient_id: p.site_id for p in state.patients.values()}
        view["patient_holds"] = [h for h in _dicts(view["patient_holds"])
                                 if sees_site(who, sites.get(str(h["patient_id"])))]
        view["triggered_rules"] = [f for f in _dicts(view["triggered_rules"])
                                   if f["scope"] != "patient"
                                   or sees_site(who, sites.get(str(f["target"])))]
        view["susar_reports_due"] = [s for s in _dicts(view["susar_reports_due"])
                                     if sees_site(who, sites.get(str(s["patient_id"])))]
    return view


def _dicts(value: object) -> list[dict[str, object]]:
    assert isinstance(value, list)
    return value
