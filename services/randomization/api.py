"""HTTP API of the randomization service: screening, enrolment, randomization, withdrawal, crossover."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from services.randomization import commands, config, domain
from shared.deps import CurrentPrincipal, CurrentProtocol, CurrentRuntime, metadata_for
from shared.events import Arm, ArmAssigned
from shared.permissions import Action
from shared.store import utcnow
from shared.web import IsoDate, IsoDateTime, Problem

router = APIRouter(prefix="/v1", tags=["randomization"])
# A consent timestamp may run a little ahead of this server's clock, not more.
CLOCK_SKEW = timedelta(minutes=5)


class ScreeningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site_id: Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]
    screening_number: Annotated[str, Field(min_length=1, max_length=40)]
    birth_date: IsoDate
    sex: Literal["female", "male", "other"]
    weight_kg: Annotated[float, Field(gt=20, lt=300)]
    diagnosis_date: IsoDate
    psoriasis_type: Literal["plaque", "pustular", "erythrodermic", "guttate"]
    pasi: Annotated[float, Field(ge=0, le=72)]
    bsa_percent: Annotated[float, Field(ge=0, le=100)]
    dlqi: Annotated[int, Field(ge=0, le=30)]
    conventional_therapy_failed: bool
    drug_induced: bool
    ongoing_psoriasis_treatment: bool
    prior_biologic_targets: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        max_length=20)
    active_infection: bool
    recurrent_infections: bool
    malignancy_history: bool
    hiv: bool
    hbv: bool
    hcv: bool
    pregnant_or_lactating: bool
    planning_pregnancy: bool
    can_attend_follow_up: bool
    consent_signed_at: IsoDateTime | None


class ScreeningResponse(BaseModel):
    screening_id: str
    eligible: bool
    reasons: list[dict[str, str]]


class EnrolResponse(BaseModel):
    patient_id: str
    site_id: str
    status: Literal["enrolled"]


class AssignmentResponse(BaseModel):
    patient_id: str
    arm: Arm
    randomization_number: int
    stratum: str
    assigned_at: datetime


class CrossoverView(BaseModel):
    from_arm: Arm
    to_arm: Arm
    crossed_over_at: datetime


class DispositionView(BaseModel):
    """Treatment: ongoing or discontinued; study: ongoing, or how it ended for the patient."""

    treatment: Literal["ongoing", "discontinued"]
    treatment_discontinued_at: datetime | None = None
    study: Literal["ongoing", "withdrawn", "lost_to_follow_up", "died", "completed"]
    study_ended_at: datetime | None = None
    study_end_reason: str | None = None


class PatientResponse(BaseModel):
    """`arm` is the current arm; `assigned_arm` and `crossovers` appear after a crossover."""

    patient_id: str
    site_id: str
    status: Literal["enrolled", "randomized", "withdrawn"]
    arm: Arm | None
    randomization_number: int | None
    stratum: str | None
    assigned_arm: Arm | None = None
    crossovers: list[CrossoverView] | None = None
    # Added (efficacy issue): stopping treatment is not leaving the study.
    disposition: DispositionView | None = None


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    screening_id: Annotated[str, Field(min_length=1, max_length=64)]


class WithdrawalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(min_length=3, max_length=2000)]


class CrossoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_arm: Arm
    reason: Annotated[str, Field(min_length=3, max_length=2000)]


def _impossible_times(body: ScreeningRequest) -> list[dict[str, str]]:
    """Times no real screening can have: bad input (422), not an ineligible patient. (Dates
    against the site's today are the domain's: `domain.decide_screen`.)"""
    signed = body.consent_signed_at
    if signed is not None and (signed.tzinfo is None or signed > utcnow() + CLOCK_SKEW):
        return [{"field": "consent_signed_at", "type": "value_error",
                 "message": "needs a time zone and must not be in the future"}]
    return []


def patient_view(state: domain.Patient) -> PatientResponse:
    # Before assignment nothing about the allocation is served: no stratum, slot or arm.
    a = state.assignment
    view: dict[str, object] = {
        "patient_id": state.patient_id, "site_id": state.site_id, "status": state.status,
        "arm": state.arm, "randomization_number": a.randomization_number if a else None,
        "stratum": a.stratum if a else None}
    if a is not None:
        view["disposition"] = disposition_view(state)
    if state.crossovers:
        view["assigned_arm"] = a.arm if a else None
        view["crossovers"] = [{"from_arm": c.from_arm, "to_arm": c.to_arm,
                               "crossed_over_at": c.crossed_over_at} for c in state.crossovers]
    # Validated, so fields left out (no crossover) stay out of the response.
    return PatientResponse.model_validate(view)


def disposition_view(state: domain.Patient) -> DispositionView:
    stopped = next((d for d in state.dispositions if d.disposition == "treatment_discontinued"),
                   None)
    ended = next((d for d in state.dispositions if d.disposition != "treatment_discontinued"),
                 None)
    study: dict[str, object] = {"study": "ongoing"}
    if state.status == "withdrawn":
        study = {"study": "withdrawn"}
    elif ended is not None:
        study = {"study": ended.disposition, "study_ended_at": ended.at,
                 "study_end_reason": ended.reason}
    return DispositionView.model_validate({
        "treatment": "discontinued" if stopped else "ongoing",
        "treatment_discontinued_at": stopped.at if stopped else None, **study})


def assignment_body(a: ArmAssigned) -> AssignmentResponse:
    return AssignmentResponse(patient_id=a.patient_id, arm=a.arm,
                              randomization_number=a.randomization_number, stratum=a.stratum,
                              assigned_at=a.assigned_at)


@router.post("/screenings", status_code=201, response_model=ScreeningResponse)
async def screen(body: ScreeningRequest, who: CurrentPrincipal, rt: CurrentRuntime,
                 protocol: CurrentProtocol) -> ScreeningResponse:
    if errors := _impossible_times(body):
        raise Problem(422, "validation_error", "Request is not valid", errors=errors)
    facts = domain.ScreeningFacts(
        **body.model_dump(exclude={"prior_biologic_targets"}),
        prior_biologic_targets=tuple(body.prior_biologic_targets),
        consent_signed=body.consent_signed_at is not None)
    event = await commands.screen(rt.store, facts, who, protocol, metadata_for(who))
    return ScreeningResponse(screening_id=event.screening_id, eligible=event.eligible,
                             reasons=[r.model_dump() for r in event.reasons])


@router.post("/patients", status_code=201, response_model=EnrolResponse)
async def enrol(body: EnrolRequest, who: CurrentPrincipal, rt: CurrentRuntime,
                protocol: CurrentProtocol) -> EnrolResponse:
    patient = await commands.enrol(rt.store, body.screening_id, who, protocol, metadata_for(who))
    return EnrolResponse(patient_id=patient.patient_id or "", site_id=patient.site_id or "",
                         status="enrolled")


@router.post("/patients/{patient_id}/randomization", status_code=201,
             response_model=AssignmentResponse,
             responses={200: {"model": AssignmentResponse, "description": "randomized before"}})
async def randomize(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime,
                    protocol: CurrentProtocol, response: Response) -> AssignmentResponse:
    result = await commands.randomize(rt.store, patient_id, who, protocol,
                                      config.secret(rt.settings), metadata_for(who))
    if not result.created:
        response.status_code = 200
    return assignment_body(result.assignment)


@router.get("/patients/{patient_id}", response_model=PatientResponse,
            response_model_exclude_unset=True)
async def get_patient(patient_id: str, who: CurrentPrincipal,
                      rt: CurrentRuntime) -> PatientResponse:
    patient = await commands.load_patient(rt.store, patient_id)
    return patient_view(commands.visible_patient(patient, who, Action.READ_PATIENT))


@router.post("/patients/{patient_id}/withdrawal", response_model=PatientResponse,
             response_model_exclude_unset=True)
async def withdraw(patient_id: str, body: WithdrawalRequest, who: CurrentPrincipal,
                   rt: CurrentRuntime, protocol: CurrentProtocol) -> PatientResponse:
    patient = await commands.withdraw(rt.store, patient_id, body.reason, who, protocol,
                                      metadata_for(who, reason=body.reason))
    return patient_view(patient)


@router.post("/patients/{patient_id}/crossover", response_model=PatientResponse,
             response_model_exclude_unset=True)
async def cross_over(patient_id: str, body: CrossoverRequest, who: CurrentPrincipal,
                     rt: CurrentRuntime, protocol: CurrentProtocol) -> PatientResponse:
    patient = await commands.cross_over(rt.store, patient_id, body.to_arm, body.reason, who,
                                        protocol, metadata_for(who, reason=body.reason))
    return patient_view(patient)
