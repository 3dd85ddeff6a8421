"""HTTP API of the safety service: adverse events, follow-ups, lab results, DSMB decisions, status."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.safety import commands, domain
from shared.catchup import unless_lagging
from shared.deps import CurrentPrincipal, CurrentProtocol, CurrentRuntime, metadata_for
from shared.events import ENROLLMENT, AdverseEventOutcome, LabResult, SafetyHold
from shared.permissions import Action, allowed, authorize, sees_site
from shared.store import utcnow
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
    infusion_related: Annotated[bool | None, Field(strict=True)] = None  # (an addition)


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
    # (added) "enrollment": the trial's enrolment only (its target is the trial id)
    scope: Literal["trial", "arm", "patient", "enrollment"]
    target: Annotated[str, Field(min_length=1, max_length=64)]
    decision: Literal["resume", "hold"]  # (added) "hold": the DSMB imposes one
    rationale: Annotated[str, Field(min_length=10, max_length=5000)]
    hold_id: Annotated[str | None, Field(min_length=1, max_length=64)] = None  # lift only this one
    # (added) a patient's hold: which dosing it stops (default: every dose)
    product: Literal["any", "infusion", "methotrexate"] | None = None

    @model_validator(mode="after")
    def _fits_the_decision(self) -> DecisionRequest:
        if self.decision == "hold" and self.hold_id is not None:
            raise ValueError("hold_id names a hold to lift: not with decision hold")
        if self.product is not None and (self.decision != "hold" or self.scope != "patient"):
            raise ValueError("product is for a hold on a patient")
        return self


@router.post("/patients/{patient_id}/adverse-events", status_code=201)
async def report_adverse_event(patient_id: str, body: AdverseEventRequest, who: CurrentPrincipal,
                               rt: CurrentRuntime, protocol: CurrentProtocol
                               ) -> dict[str, object]:
    report = domain.ReportAdverseEvent(patient_id=patient_id, **body.model_dump())
    adverse_event_id, emitted = await unless_lagging(
        rt, ENROLLMENT, patient_id,
        lambda: commands.report_adverse_event(rt.store, protocol, who, report, metadata_for(who)))
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
    follow_up_id, emitted = await unless_lagging(
        rt, ENROLLMENT, patient_id,
        lambda: commands.follow_up(rt.store, protocol, who, change, metadata_for(who)))
    return {"follow_up_id": follow_up_id, "adverse_event_id": adverse_event_id,
            "triggered_rules": commands.fired(emitted)}


@router.post("/patients/{patient_id}/lab-results", status_code=201)
async def report_lab_result(patient_id: str, body: LabResultRequest, who: CurrentPrincipal,
                            rt: CurrentRuntime, protocol: CurrentProtocol) -> dict[str, object]:
    results = tuple(LabResult.model_validate(r.model_dump()) for r in body.results)
    lab_result_id, emitted = await unless_lagging(
        rt, ENROLLMENT, patient_id, lambda: commands.report_lab_result(
            rt.store, protocol, who, patient_id, body.collected_at, results, metadata_for(who)))
    return {"lab_result_id": lab_result_id, "triggered_rules": commands.fired(emitted)}


@router.post("/safety/decisions", status_code=201)
async def decide(body: DecisionRequest, who: CurrentPrincipal, rt: CurrentRuntime,
                 protocol: CurrentProtocol) -> dict[str, object]:
    authorize(who, Action.DSMB_DECISION)
    meta = metadata_for(who, reason=body.rationale)
    if body.decision == "hold":
        hold = domain.Impose(body.scope, body.target, body.rationale, who.sub,
                             commands.new_decision_id(), body.product or "any")
        emitted = await commands.dsmb_decision(rt.store, protocol, hold, meta)
        return {"decision": body.decision, "scope": body.scope, "target": body.target,
                "decision_id": hold.decision_id,
                "held": [{"hold_id": e.hold_id, "kind": e.event_type(), "scope": e.scope,
                          "target": e.target, "rule_id": e.rule_id, "decision_id": e.decision_id}
                         for _, e in emitted if isinstance(e, SafetyHold)]}
    lift = domain.Lift(body.scope, body.target, body.hold_id, body.rationale, who.sub)
    emitted = await commands.dsmb_decision(rt.store, protocol, lift, meta)
    return {"decision": body.decision, "scope": body.scope, "target": body.target,
            "lifted": [e.model_dump(mode="json", include={"hold_id", "scope", "target"})
                       for _, e in emitted]}


@router.get("/safety/status")
async def status(who: CurrentPrincipal, rt: CurrentRuntime,
                 protocol: CurrentProtocol) -> dict[str, object]:
    authorize(who, Action.READ_SAFETY_STATUS)
    state = await commands.state(rt.store, protocol)
    view = domain.status(protocol.safety, state, protocol.enrollment_cap, now=utcnow())
    if who.is_site_role:  # another site's patients must not leak through the trial's status
        sites = {p.patient_id: p.site_id for p in state.patients.values()}
        view["patient_holds"] = [h for h in _dicts(view["patient_holds"])
                                 if sees_site(who, sites.get(str(h["patient_id"])))]
        view["triggered_rules"] = [f for f in _dicts(view["triggered_rules"])
                                   if f["scope"] != "patient"
                                   or sees_site(who, sites.get(str(f["target"])))]
        view["susar_reports_due"] = [s for s in _dicts(view["susar_reports_due"])
                                     if sees_site(who, sites.get(str(s["patient_id"])))]
        view["reporting_clocks"] = [c for c in _dicts(view["reporting_clocks"])
                                    if sees_site(who, sites.get(str(c["patient_id"])))]
    return domain.visible_status(view, interim=allowed(who, Action.READ_INTERIM_DATA),
                                 firings=allowed(who, Action.READ_RULE_FIRINGS))


def _dicts(value: object) -> list[dict[str, object]]:
    assert isinstance(value, list)
    return value
