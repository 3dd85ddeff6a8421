"""Pure randomization domain: eligibility, the patient's life cycle, allocation. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

from shared.events import (
    ARMS,
    Arm,
    ArmAssigned,
    EventData,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    Reason,
)
from shared.protocol import ProtocolConfig
from shared.web import Problem

EXCLUDED_TYPES = {"pustular", "erythrodermic", "guttate"}


@dataclass(frozen=True)
class ScreeningFacts:
    site_id: str
    screening_number: str
    birth_date: date
    sex: str
    weight_kg: float
    diagnosis_date: date
    psoriasis_type: str
    pasi: float
    bsa_percent: float
    dlqi: int
    conventional_therapy_failed: bool
    drug_induced: bool
    ongoing_psoriasis_treatment: bool
    prior_biologic_targets: tuple[str, ...]
    active_infection: bool
    recurrent_infections: bool
    malignancy_history: bool
    hiv: bool
    hbv: bool
    hcv: bool
    pregnant_or_lactating: bool
    planning_pregnancy: bool
    can_attend_follow_up: bool
    consent_signed: bool


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def months_before(day: date, months: int) -> date:
    year, month = divmod(day.month - 1 - months, 12)
    target_year, target_month = day.year + year, month + 1
    for d in (day.day, 30, 29, 28):  # the same day of the month, or that month's last day
        try:
            return date(target_year, target_month, d)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def eligibility(facts: ScreeningFacts, today: date) -> list[Reason]:
    """Every failing criterion, each with a stable id (the full table grows with issue 3)."""
    age = age_on(facts.birth_date, today)
    checks: list[tuple[str, bool, str]] = [
        ("INC-AGE", 18 <= age <= 60, f"age {age} is outside 18 to 60"),
        ("INC-DIAGNOSIS-6M", facts.diagnosis_date <= months_before(today, 6),
         "plaque psoriasis diagnosed less than 6 months before screening"),
        ("INC-SEVERITY", facts.pasi >= 10 or (facts.bsa_percent >= 10 and facts.dlqi >= 10),
         "needs PASI >= 10, or BSA >= 10 % and DLQI >= 10"),
        ("INC-CONVENTIONAL-FAILED", facts.conventional_therapy_failed,
         "conventional therapy has not failed"),
        ("INC-CONSENT", facts.consent_signed, "informed consent not signed"),
        ("INC-FOLLOW-UP", facts.can_attend_follow_up, "cannot be followed up on time"),
        ("EXC-PSORIASIS-TYPE", facts.psoriasis_type == "plaque",
         f"psoriasis type {facts.psoriasis_type} is excluded"),
        ("EXC-DRUG-INDUCED", not facts.drug_induced, "drug-induced psoriasis"),
        ("EXC-OTHER-TREATMENT", not facts.ongoing_psoriasis_treatment,
         "ongoing other psoriasis treatment"),
        ("EXC-PRIOR-BIOLOGIC", not facts.prior_biologic_targets,
         "prior biologic targeting " + ", ".join(facts.prior_biologic_targets)),
        ("EXC-INFECTION", not (facts.active_infection or facts.recurrent_infections),
         "active or recurrent infection"),
        ("EXC-MALIGNANCY", not facts.malignancy_history, "history of malignancy"),
        ("EXC-HIV-HBV-HCV", not (facts.hiv or facts.hbv or facts.hcv), "HIV, HBV or HCV"),
        ("EXC-PREGNANCY", not (facts.pregnant_or_lactating or facts.planning_pregnancy),
         "pregnant, lactating or planning pregnancy"),
    ]
    return [Reason(criterion=cid, message=msg) for cid, ok, msg in checks if not ok]


@dataclass(frozen=True)
class Patient:
    """A patient's state, folded from its stream."""

    patient_id: str | None = None
    site_id: str | None = None
    status: str = "new"  # new, enrolled, randomized, withdrawn
    baseline_weight_kg: float = 0.0
    baseline_pasi: float = 0.0
    assignment: ArmAssigned | None = None


def evolve(state: Patient, event: EventData) -> Patient:
    match event:
        case PatientEnrolled():
            return Patient(event.patient_id, event.site_id, "enrolled",
                           event.baseline_weight_kg, event.baseline_pasi)
        case ArmAssigned():
            return replace(state, status="randomized", assignment=event)
        case PatientWithdrawn():
            return replace(state, status="withdrawn")
    return state


def fold(events: list[EventData]) -> Patient:
    state = Patient()
    for event in events:
        state = evolve(state, event)
    return state


def decide_enrol(screening: PatientScreened | None, patient: Patient, patient_id: str,
                 enrolled_at: object) -> PatientEnrolled:
    if screening is None:
        raise Problem(404, "screening_not_found", "No such screening")
    if not screening.eligible:
        raise Problem(422, "not_eligible", "The screening found the patient not eligible",
                      reasons=[r.model_dump() for r in screening.reasons])
    if patient.status != "new":
        raise Problem(409, "already_enrolled", "This screening was enrolled already",
                      patient_id=patient.patient_id)
    return PatientEnrolled.model_validate({
        "patient_id": patient_id, "site_id": screening.site_id,
        "screening_id": screening.screening_id, "baseline_weight_kg": screening.weight_kg,
        "baseline_pasi": screening.pasi, "enrolled_at": enrolled_at})


def stratum_of(patient: Patient, protocol: ProtocolConfig) -> str:
    band = "pasi_ge20" if patient.baseline_pasi >= protocol.pasi_band_threshold else "pasi_lt20"
    return f"{patient.site_id}:{band}"


def placeholder_arm(randomization_number: int) -> Arm:
    """Round robin: a stand-in until concealed block randomization lands (issue 3)."""
    return ARMS[(randomization_number - 1) % len(ARMS)]
