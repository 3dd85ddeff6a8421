"""HTTP API of the efficacy service: assessments and corrections, treatment discontinuation and
loss to follow-up, a patient's efficacy, and the trial's efficacy summary."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Self

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.efficacy import analysis, commands, domain, scoring
from shared.auth import Principal
from shared.catchup import having_read, unless_lagging
from shared.deps import CurrentClock, CurrentPrincipal, CurrentProtocol, CurrentRuntime, metadata_for
from shared.events import DOSING, ENROLLMENT, EventData
from shared.permissions import Action
from shared.protocol import ProtocolConfig
from shared.runtime import Runtime
from shared.store import utcnow
from shared.web import IsoAwareDateTime

router = APIRouter(prefix="/v1", tags=["efficacy"])
Reason = Annotated[str, Field(min_length=3, max_length=2000)]


class AssessmentRequest(BaseModel):
    """One assessment: at a scheduled assessment week, or unscheduled (no week)."""

    model_config = ConfigDict(extra="forbid")
    week: Annotated[int | None, Field(ge=0, le=1000, strict=True)] = None
    assessed_at: IsoAwareDateTime
    unscheduled: Annotated[bool, Field(strict=True)] = False
    pasi: scoring.PasiInput
    bsa_percent: scoring.BsaPercent | None = None
    dlqi: scoring.DlqiInput | None = None
    spga: scoring.Spga | None = None

    @model_validator(mode="after")
    def _week_or_unscheduled(self) -> Self:
        if self.unscheduled and self.week is not None:
            raise ValueError("an unscheduled assessment has no week")
        if not self.unscheduled and self.week is None:
            raise ValueError("week is required (or unscheduled: true)")
        return self


class CorrectionRequest(BaseModel):
    """What changes, and why; a measure left out stays as it was (null: not measured)."""

    model_config = ConfigDict(extra="forbid")
    reason: Reason
    pasi: scoring.PasiInput | None = None
    bsa_percent: scoring.BsaPercent | None = None
    dlqi: scoring.DlqiInput | None = None
    spga: scoring.Spga | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set - {"reason"}:
            raise ValueError("a correction names at least one of pasi, bsa_percent, dlqi, spga")
        if "pasi" in self.model_fields_set and self.pasi is None:
            raise ValueError("pasi cannot be removed, only corrected")
        return self


class ReasonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Reason


def _measures(body: AssessmentRequest | CorrectionRequest) -> dict[str, Any]:
    """The event's measurement fields for the measures the body names."""
    found: dict[str, Any] = {}
    given = body.model_fields_set | ({"pasi"} if isinstance(body, AssessmentRequest) else set())
    if "pasi" in given and body.pasi is not None:
        found["pasi_total"] = float(scoring.pasi_total(body.pasi))
        found["pasi_regions"] = (body.pasi.regions.model_dump(mode="json")
                                 if isinstance(body.pasi, scoring.PasiFromRegions) else None)
    if "bsa_percent" in given:
        found["bsa_percent"] = None if body.bsa_percent is None else float(body.bsa_percent)
    if "dlqi" in given:
        dlqi = body.dlqi
        found["dlqi_total"] = None if dlqi is None else scoring.dlqi_total(dlqi)
        found["dlqi_items"] = (tuple(body.model_dump(mode="json")["dlqi"]["items"])
                               if isinstance(dlqi, scoring.DlqiItems) else None)
    if "spga" in given:
        found["spga"] = body.spga
    return found


async def _command(rt: Runtime, patient_id: str, who: Principal, action: Action,
                   command: commands.PatientCommand, protocol: ProtocolConfig,
                   reason: str | None = None) -> tuple[list[EventData], domain.FollowUp]:
    """A patient efficacy has not heard of yet is waited for (enrolment), and so are their
    assessment visits (dosing's calendar): never "unknown" because a consumer lags."""
    async def run() -> tuple[list[EventData], domain.FollowUp]:
        await having_read(rt, ENROLLMENT, patient_id)  # a withdrawal published a moment ago
        return await commands.command_patient(rt.store, patient_id, who, action, command, protocol,
                                        metadata_for(who, reason=reason))

    async def with_calendar() -> tuple[list[EventData], domain.FollowUp]:
        return await unless_lagging(rt, DOSING, patient_id, run,
                                    unknown=frozenset({"assessment_visits_unknown"}))
    return await unless_lagging(rt, ENROLLMENT, patient_id, with_calendar)


@router.post("/patients/{patient_id}/assessments", status_code=201)
async def record_assessment(patient_id: str, body: AssessmentRequest, who: CurrentPrincipal,
                            rt: CurrentRuntime, protocol: CurrentProtocol,
                            now: CurrentClock) -> dict[str, Any]:
    m = _measures(body)
    measured = domain.Measurements(
        pasi_total=scoring.pasi_total(body.pasi), pasi_regions=m["pasi_regions"],
        bsa_percent=m.get("bsa_percent"), dlqi_items=m.get("dlqi_items"),
        dlqi_total=m.get("dlqi_total"), spga=m.get("spga"))
    command = domain.RecordAssessment(str(uuid.uuid4()), body.week, body.assessed_at, measured,
                                      now.now())
    _, state = await _command(rt, patient_id, who, Action.RECORD_ASSESSMENT, command, protocol)
    found = state.assessment(command.assessment_id)
    assert found is not None
    return {**assessment_view(state, found), "study_completed": state.ended == "completed"}


@router.post("/patients/{patient_id}/assessments/{assessment_id}/corrections", status_code=201)
async def correct_assessment(patient_id: str, assessment_id: str, body: CorrectionRequest,
                             who: CurrentPrincipal, rt: CurrentRuntime,
                             protocol: CurrentProtocol, now: CurrentClock) -> dict[str, Any]:
    command = domain.CorrectAssessment(str(uuid.uuid4()), assessment_id, _measures(body),
                                       body.reason, now.now())
    new, state = await _command(rt, patient_id, who, Action.RECORD_ASSESSMENT, command, protocol,
                                reason=body.reason)
    found = state.assessment(assessment_id)
    assert found is not None
    return {**assessment_view(state, found), "correction_id": command.correction_id,
            "changed": list(new[0].model_dump()["changed"]), "reason": body.reason}


async def _disposition(rt: Runtime, patient_id: str, who: Principal,
                       command: domain.DiscontinueTreatment | domain.DeclareLost,
                       protocol: ProtocolConfig, reason: str) -> dict[str, Any]:
    _, state = await _command(rt, patient_id, who, Action.DISCONTINUE_TREATMENT, command,
                              protocol, reason)
    return {"patient_id": patient_id, "disposition": disposition_view(state)}


@router.post("/patients/{patient_id}/treatment-discontinuation")
async def discontinue_treatment(patient_id: str, body: ReasonRequest, who: CurrentPrincipal,
                                rt: CurrentRuntime, protocol: CurrentProtocol,
                                now: CurrentClock) -> dict[str, Any]:
    """No more doses (dosing refuses them: 409 treatment_discontinued); the assessments go on."""
    return await _disposition(rt, patient_id, who, domain.DiscontinueTreatment(
        body.reason, who.sub, now.now()), protocol, body.reason)


@router.post("/patients/{patient_id}/lost-to-follow-up")
async def declare_lost(patient_id: str, body: ReasonRequest, who: CurrentPrincipal,
                       rt: CurrentRuntime, protocol: CurrentProtocol,
                       now: CurrentClock) -> dict[str, Any]:
    """The investigator declares the patient lost to follow-up: every future visit cancelled."""
    return await _disposition(rt, patient_id, who, domain.DeclareLost(
        body.reason, who.sub, now.now()), protocol, body.reason)


@router.get("/patients/{patient_id}/efficacy")
async def patient_efficacy(patient_id: str, who: CurrentPrincipal,
                           rt: CurrentRuntime) -> dict[str, Any]:
    state = await unless_lagging(rt, ENROLLMENT, patient_id,
                                 lambda: commands.followup(rt.store, patient_id, who))
    return {
        "patient_id": state.patient_id, "site_id": state.site_id, "arm": state.randomized_arm,
        "current_arm": state.arm, "baseline": state.baseline,
        "disposition": disposition_view(state),
        "visits": [{**v.visit.model_dump(mode="json", include={
            "week", "due_date", "window_start", "window_end"}), "status": v.status,
            "assessment_id": v.assessment_id} for v in state.visits],
        "assessments": [assessment_view(state, a) for a in
                        sorted(state.assessments, key=lambda a: a.assessed_at)],
    }


@router.get("/efficacy/summary")
async def summary(who: CurrentPrincipal, rt: CurrentRuntime,
                  protocol: CurrentProtocol) -> dict[str, Any]:
    found = analysis.summary_of(await commands.all_followups(rt.store, who), protocol)
    return {"generated_at": utcnow().isoformat(), "protocol_version": protocol.version,
            "rules": {"nri": "everyone randomized; a missing assessment, or one after treatment "
                             "discontinuation, counts as no response",
                      "observed": "the patients assessed at that week",
                      "ci95": "exact (Clopper-Pearson)"},
            **found}


def assessment_view(state: domain.FollowUp, a: domain.Assessment) -> dict[str, Any]:
    baseline = state.baseline_pasi
    response = (scoring.pasi_response(baseline, a.measured.pasi_total)
                if baseline is not None else None)
    improvement = response.percent_improvement_reported if response is not None else None
    m = a.measured
    return {
        "assessment_id": a.assessment_id, "patient_id": state.patient_id, "week": a.week,
        "unscheduled": a.unscheduled, "assessed_at": a.assessed_at.isoformat(),
        "assessed_on": str(a.assessed_on),
        "pasi_total": float(scoring.reported(m.pasi_total)), "pasi_regions": m.pasi_regions,
        "bsa_percent": m.bsa_percent, "dlqi_total": m.dlqi_total, "spga": m.spga,
        "baseline_pasi": None if baseline is None else float(baseline),
        "pasi_percent_improvement": None if improvement is None else float(improvement),
        **{f"pasi{t}": bool(response and getattr(response, f"pasi{t}"))
           for t in scoring.RESPONSE_THRESHOLDS},
        "after_treatment_discontinued": a.after_treatment_discontinued,
        "corrections": a.corrections,
    }


def disposition_view(state: domain.FollowUp) -> dict[str, Any]:
    discontinued = state.treatment_discontinued_at
    return {
        "treatment": "discontinued" if discontinued is not None else "ongoing",
        "treatment_discontinued_at": discontinued.isoformat() if discontinued else None,
        "treatment_discontinuation_reason": state.treatment_discontinuation_reason,
        "study": state.ended or "ongoing",
        "study_ended_at": state.ended_at.isoformat() if state.ended_at else None,
        "study_end_reason": state.end_reason,
    }

