"""HTTP API of the safety service: adverse events, follow-ups, lab results, DSMB decisions, status."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from services.safety import domain
from services.safety.handlers import ENGINE_ACTOR
from services.safety.projection import append_all, current_state, state_for_write
from services.safety.rules import Emitted
from services.safety.state import SafetyState
from shared.auth import Principal
from shared.events import AdverseEventOutcome, LabResult, StoppingRuleTriggered
from shared.permissions import Action, authorize, authorize_patient, sees_site
from shared.protocol import default_protocol
from shared.service import CurrentPrincipal, CurrentRuntime, metadata_for
from shared.store import Metadata, utcnow
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


def _fired(emitted: list[Emitted]) -> list[str]:
    return [e.rule_id for _, e in emitted if isinstance(e, StoppingRuleTriggered)]


def _engine_meta(who: Principal, caused_by: str) -> Metadata:
    m = metadata_for(who)
    return Metadata(actor=ENGINE_ACTOR, request_id=m.request_id, correlation_id=m.correlation_id,
                    causation_id=caused_by)


def _reporter(state: SafetyState, patient_id: str, who: Principal) -> None:
    patient = domain.known_patient(state, patient_id)
    authorize_patient(who, Action.REPORT_SAFETY, patient.site_id)


@router.post("/patients/{patient_id}/adverse-events", status_code=201)
async def report_adverse_event(patient_id: str, body: AdverseEventRequest, who: CurrentPrincipal,
                               rt: CurrentRuntime) -> dict[str, object]:
    protocol = default_protocol()
    adverse_event_id = "AE-" + uuid.uuid4().hex[:16].upper()
    async with rt.store.transaction() as tx:
        state = await state_for_write(tx, protocol.trial_id)
        _reporter(state, patient_id, who)
        cmd = domain.ReportAdverseEvent(patient_id=patient_id, **body.model_dump())
        emitted = domain.decide_report(protocol.safety, state, cmd, adverse_event_id, utcnow())
        await append_all(tx, emitted, metadata_for(who), _engine_meta(who, emitted[0][0]))
    reported = emitted[0][1]
    return {"adverse_event_id": adverse_event_id,
            "infusion_related": getattr(reported, "infusion_related", None),
            "triggered_rules": _fired(emitted)}


@router.post("/patients/{patient_id}/adverse-events/{adverse_event_id}/follow-ups",
             status_code=201)
async def follow_up(patient_id: str, adverse_event_id: str, body: FollowUpRequest,
                    who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    protocol = default_protocol()
    follow_up_id = "FU-" + uuid.uuid4().hex[:16].upper()
    async with rt.store.transaction() as tx:
        state = await state_for_write(tx, protocol.trial_id)
        _reporter(state, patient_id, who)
        cmd = domain.FollowUp(patient_id=patient_id, adverse_event_id=adverse_event_id,
                              **body.model_dump())
        emitted = domain.decide_follow_up(protocol.safety, state, cmd, follow_up_id, utcnow())
        await append_all(tx, emitted, metadata_for(who), _engine_meta(who, emitted[0][0]))
    return {"follow_up_id": follow_up_id, "adverse_event_id": adverse_event_id,
            "triggered_rules": _fired(emitted)}


@router.post("/patients/{patient_id}/lab-results", status_code=201)
async def report_lab_result(patient_id: str, body: LabResultRequest, who: CurrentPrincipal,
                            rt: CurrentRuntime) -> dict[str, object]:
    protocol = default_protocol()
    lab_result_id = "LAB-" + uuid.uuid4().hex[:16].upper()
    results = tuple(LabResult.model_validate(r.model_dump()) for r in body.results)
    async with rt.store.transaction() as tx:
        state = await state_for_write(tx, protocol.trial_id)
        _reporter(state, patient_id, who)
        emitted = domain.decide_lab(protocol.safety, state, patient_id, body.collected_at,
                                    results, lab_result_id, utcnow())
        await append_all(tx, emitted, metadata_for(who), _engine_meta(who, emitted[0][0]))
    return {"lab_result_id": lab_result_id, "triggered_rules": _fired(emitted)}


@router.post("/safety/decisions", status_code=201)
async def decide(body: DecisionRequest, who: CurrentPrincipal,
                 rt: CurrentRuntime) -> dict[str, object]:
    authorize(who, Action.DSMB_DECISION)
    protocol = default_protocol()
    async with rt.store.transaction() as tx:
        state = await state_for_write(tx, protocol.trial_id)
        emitted = domain.decide_lift(state, body.scope, body.target, body.hold_id,
                                     body.rationale, who.sub)
        meta = metadata_for(who, reason=body.rationale)
        await append_all(tx, emitted, meta, meta)
    return {"decision": body.decision, "scope": body.scope, "target": body.target,
            "lifted": [e.model_dump(mode="json", include={"hold_id", "scope", "target"})
                       for _, e in emitted]}


@router.get("/safety/status")
async def status(who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    authorize(who, Action.READ_SAFETY_STATUS)
    protocol = default_protocol()
    state = await current_state(rt.store, protocol.trial_id)
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
