"""HTTP API of the randomization service: screening, enrolment, randomization, withdrawal."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from services.randomization import domain
from shared.auth import Principal
from shared.events import ArmAssigned, PatientScreened, PatientWithdrawn
from shared.protocol import default_protocol
from shared.service import CurrentPrincipal, CurrentRuntime, metadata_for
from shared.store import NewEvent, StreamReader, utcnow
from shared.web import Problem

router = APIRouter(prefix="/v1", tags=["randomization"])
PATIENT_NS = uuid.UUID("6f1c0a52-8f4e-4c1a-9d57-2b1e7d0c5a11")
ENROLLING_ROLES = {"site_coordinator", "investigator"}
READ_ALL_ROLES = {"monitor", "dsmb", "admin"}


class ScreeningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site_id: Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]
    screening_number: Annotated[str, Field(min_length=1, max_length=40)]
    birth_date: date
    sex: Literal["female", "male", "other"]
    weight_kg: Annotated[float, Field(gt=20, lt=300)]
    diagnosis_date: date
    psoriasis_type: Literal["plaque", "pustular", "erythrodermic", "guttate"]
    pasi: Annotated[float, Field(ge=0, le=72)]
    bsa_percent: Annotated[float, Field(ge=0, le=100)]
    dlqi: Annotated[int, Field(ge=0, le=30)]
    conventional_therapy_failed: bool
    drug_induced: bool
    ongoing_psoriasis_treatment: bool
    prior_biologic_targets: list[Annotated[str, Field(max_length=40)]] = Field(max_length=20)
    active_infection: bool
    recurrent_infections: bool
    malignancy_history: bool
    hiv: bool
    hbv: bool
    hcv: bool
    pregnant_or_lactating: bool
    planning_pregnancy: bool
    can_attend_follow_up: bool
    consent_signed_at: datetime | None


class ScreeningResponse(BaseModel):
    screening_id: str
    eligible: bool
    reasons: list[dict[str, str]]


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    screening_id: Annotated[str, Field(min_length=1, max_length=64)]


class WithdrawalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(min_length=3, max_length=2000)]


def _require_site_role(who: Principal, site_id: str) -> None:
    if who.role not in ENROLLING_ROLES:
        raise Problem(403, "forbidden", f"Role {who.role} may not do this")
    if who.site != site_id:
        raise Problem(403, "forbidden", "Site roles act only on their own site")


def patient_view(state: domain.Patient) -> dict[str, object]:
    a = state.assignment
    return {"patient_id": state.patient_id, "site_id": state.site_id, "status": state.status,
            "arm": a.arm if a else None,
            "randomization_number": a.randomization_number if a else None,
            "stratum": a.stratum if a else None}


async def _load_patient(reader: StreamReader, patient_id: str) -> domain.Patient:
    stream = await reader.read_stream(f"patient-{patient_id}")
    return domain.fold([e.payload() for e in stream])


def _visible(state: domain.Patient, who: Principal) -> domain.Patient:
    # Another site's patient answers 404, so its existence does not leak.
    if state.patient_id is None or (who.role not in READ_ALL_ROLES and who.site != state.site_id):
        raise Problem(404, "patient_not_found", "No such patient")
    return state


@router.post("/screenings", status_code=201, response_model=ScreeningResponse)
async def screen(body: ScreeningRequest, who: CurrentPrincipal,
                 rt: CurrentRuntime) -> ScreeningResponse:
    _require_site_role(who, body.site_id)
    facts = domain.ScreeningFacts(
        **body.model_dump(exclude={"prior_biologic_targets", "consent_signed_at"}),
        prior_biologic_targets=tuple(body.prior_biologic_targets),
        consent_signed=body.consent_signed_at is not None)
    now = utcnow()
    reasons = domain.eligibility(facts, now.date())
    screening_id = str(uuid.uuid4())
    event = PatientScreened(
        screening_id=screening_id, site_id=body.site_id, screening_number=body.screening_number,
        eligible=not reasons, reasons=tuple(reasons),
        age_years=domain.age_on(body.birth_date, now.date()), weight_kg=body.weight_kg,
        pasi=body.pasi, protocol_version=default_protocol().version, screened_at=now)
    await rt.store.append(f"screening-{screening_id}", [NewEvent.of(event, metadata_for(who))], 0)
    return ScreeningResponse(screening_id=screening_id, eligible=event.eligible,
                             reasons=[r.model_dump() for r in reasons])


@router.post("/patients", status_code=201)
async def enrol(body: EnrolRequest, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, str]:
    patient_id = "PT-" + uuid.uuid5(PATIENT_NS, body.screening_id).hex[:12].upper()
    async with rt.store.transaction() as tx:
        screened = await tx.read_stream(f"screening-{body.screening_id}")
        screening = screened[0].payload() if screened else None
        assert screening is None or isinstance(screening, PatientScreened)
        if screening is not None:
            _require_site_role(who, screening.site_id)
        patient = await _load_patient(tx, patient_id)
        event = domain.decide_enrol(screening, patient, patient_id, utcnow())
        await tx.append(f"patient-{patient_id}", [NewEvent.of(event, metadata_for(who))], 0)
    return {"patient_id": patient_id, "site_id": event.site_id, "status": "enrolled"}


@router.post("/patients/{patient_id}/randomization", status_code=201)
async def randomize(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime,
                    response: Response) -> dict[str, object]:
    protocol = default_protocol()
    async with rt.store.transaction() as tx:
        stream = await tx.read_stream(f"patient-{patient_id}")
        patient = _visible(domain.fold([e.payload() for e in stream]), who)
        _require_site_role(who, patient.site_id or "")
        if patient.assignment is not None:
            response.status_code = 200
            return _assignment_body(patient.assignment)
        if patient.status == "withdrawn":
            raise Problem(409, "withdrawn", "The patient has withdrawn")
        # Under the store's write lock the count is exact, so numbers are gapless trial-wide.
        number = await tx.count_of_type("ArmAssigned") + 1
        if number > protocol.enrollment_cap:
            raise Problem(409, "enrollment_closed", "The enrolment cap is reached",
                          cap=protocol.enrollment_cap)
        event = ArmAssigned(
            patient_id=patient_id, site_id=patient.site_id or "", arm=domain.placeholder_arm(number),
            randomization_number=number, stratum=domain.stratum_of(patient, protocol),
            baseline_weight_kg=patient.baseline_weight_kg, assigned_at=utcnow())
        await tx.append(f"patient-{patient_id}", [NewEvent.of(event, metadata_for(who))],
                        len(stream))
    return _assignment_body(event)


def _assignment_body(a: ArmAssigned) -> dict[str, object]:
    return {"patient_id": a.patient_id, "arm": a.arm,
            "randomization_number": a.randomization_number, "stratum": a.stratum,
            "assigned_at": a.assigned_at}


@router.get("/patients/{patient_id}")
async def get_patient(patient_id: str, who: CurrentPrincipal,
                      rt: CurrentRuntime) -> dict[str, object]:
    return patient_view(_visible(await _load_patient(rt.store, patient_id), who))


@router.post("/patients/{patient_id}/withdrawal")
async def withdraw(patient_id: str, body: WithdrawalRequest, who: CurrentPrincipal,
                   rt: CurrentRuntime) -> dict[str, object]:
    async with rt.store.transaction() as tx:
        stream = await tx.read_stream(f"patient-{patient_id}")
        patient = _visible(domain.fold([e.payload() for e in stream]), who)
        _require_site_role(who, patient.site_id or "")
        if patient.status == "withdrawn":
            raise Problem(409, "withdrawn", "The patient has withdrawn already")
        event = PatientWithdrawn(patient_id=patient_id, site_id=patient.site_id or "",
                                 reason=body.reason, withdrawn_at=utcnow())
        await tx.append(f"patient-{patient_id}",
                        [NewEvent.of(event, metadata_for(who, reason=body.reason))], len(stream))
    return patient_view(domain.evolve(patient, event))
