"""Read-only FHIR R4 views of the trial (ResearchStudy, ResearchSubject, AdverseEvent and searchset
Bundles), built as plain JSON dicts from the audit ledger's `History` and the protocol.

Pure: the standard library, the event catalogue and the protocol only. Every resource names a
person by a pseudonymous reference (`Patient/<patient id>`) and nothing else: no name, birth date,
address, free-text reason or actor. Times are UTC (`Z`). FHIR JSON has no empty arrays, objects or
nulls, so a value that is not known is left out.

ResearchStudy.status, from the ledger (first that applies):
- `completed`: the enrolment cap is reached and every randomized patient has a final disposition
  (withdrawn, lost to follow-up, died, completed);
- `temporarily-closed-to-accrual-and-intervention`: a `TrialHalted` hold not yet lifted (a halt
  stops dosing as well as randomization);
- `closed-to-accrual`: the enrolment cap is reached (as randomization counts it: patients
  randomized);
- `temporarily-closed-to-accrual`: an `EnrollmentPaused` hold not yet lifted;
- `active` otherwise. An arm suspension does not close accrual (patients go to the open arms).

ResearchSubject.status (R4 research-subject-status), per patient:
- a screening never enrolled (its id is the screening id): `eligible` or `ineligible`;
- enrolled, not randomized: `on-study`;
- randomized: `on-study-intervention`;
- treatment discontinued (`TreatmentDiscontinued`), still followed: `follow-up`;
- withdrawn, lost to follow-up, died (`DeathRecorded`) or completed (`StudyCompleted`):
  `off-study`, the period ending at that fact; the disposition is kept in an extension.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from services.audit.history import Fact, History
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventOutcome,
    AdverseEventReported,
    ArmAssigned,
    ArmCrossedOver,
    DeathRecorded,
    EnrollmentPaused,
    LostToFollowUp,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    SafetyHoldLifted,
    StudyCompleted,
    TreatmentDiscontinued,
    TrialHalted,
)
from shared.protocol import ProtocolConfig

Resource = dict[str, Any]

# The registry's identity of the trial; the protocol configuration holds none of it (only trial_id).
STUDY_ID: Final = "NCT03424629"
TITLE: Final = "Safety and Efficacy of UC-MSCs in Patients With Plaque Psoriasis"
REGISTRY: Final = "https://clinicaltrials.gov"
BASE: Final = "https://nct03424629.example/fhir"  # fullUrl base when the caller names none
DEFINITIONS: Final = "https://nct03424629.example/fhir/StructureDefinition"
CTCAE_GRADE_URL: Final = f"{DEFINITIONS}/ctcae-grade"
EXPECTED_URL: Final = f"{DEFINITIONS}/adverse-event-expected"
DISPOSITION_URL: Final = f"{DEFINITIONS}/disposition"
RELATEDNESS_SYSTEM: Final = "https://nct03424629.example/fhir/CodeSystem/relatedness"
TERMINOLOGY: Final = "http://terminology.hl7.org/CodeSystem"
SNOMED: Final = "http://snomed.info/sct"

# An arm's role in the study, from the kind of product it gives (the registry: both UC-MSC arms
# experimental, methotrexate the active comparator). R4 binds no code system to arm.type; this is
# the one FHIR R5 defines.
ARM_TYPE_SYSTEM: Final = "http://hl7.org/fhir/research-study-arm-type"
ARM_TYPE: Final = {"infusion": ("experimental", "Experimental"),
                   "methotrexate": ("active-comparator", "Active Comparator")}
OUTCOME: Final[dict[AdverseEventOutcome, tuple[str, str]]] = {
    "recovered": ("resolved", "Resolved"),
    "recovering": ("recovering", "Recovering"),
    "not_recovered": ("ongoing", "Ongoing"),
    "recovered_with_sequelae": ("resolvedWithSequelae", "Resolved with Sequelae"),
    "fatal": ("fatal", "Fatal"),
    "unknown": ("unknown", "Unknown"),
}
# CTCAE grade to the three-level R4 severity: 1 mild, 2 moderate, 3-5 severe (the grade itself is
# kept exactly in its extension).
SEVERITY: Final = {1: "mild", 2: "moderate", 3: "severe", 4: "severe", 5: "severe"}
FINAL = ("withdrawn", "lost_to_follow_up", "died", "completed")


def instant(at: datetime) -> str:
    """A FHIR dateTime in UTC, written as fhir.resources writes it back (`Z`, microseconds only
    when there are any)."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)], **({"text": display} if display else {})}


# --- what the ledger says about patients and the trial -----------------------------------------


def _enrolment(history: History, patient_id: str) -> PatientEnrolled | None:
    return next((e for e in history.data(PatientEnrolled) if e.patient_id == patient_id), None)


def _assignment(history: History, patient_id: str) -> ArmAssigned | None:
    return next((e for e in history.data(ArmAssigned) if e.patient_id == patient_id), None)


def _crossovers(history: History, patient_id: str) -> list[ArmCrossedOver]:
    return [e for e in history.data(ArmCrossedOver) if e.patient_id == patient_id]


def arm_at(history: History, patient_id: str, at: datetime) -> str | None:
    """The arm the patient was on at `at` (the randomized arm before any crossover)."""
    assigned = _assignment(history, patient_id)
    if assigned is None:
        return None
    arm: str = assigned.arm
    for crossed in sorted(_crossovers(history, patient_id), key=lambda c: c.crossed_over_at):
        if crossed.crossed_over_at <= at:
            arm = crossed.to_arm
    return arm


def disposition(history: History, patient_id: str) -> tuple[str, datetime] | None:
    """The patient's final disposition and when: the first in ledger order (the one that ended
    the study for them), else a treatment discontinuation, else None."""
    discontinued: tuple[str, datetime] | None = None
    for fact in history.facts:
        match fact.data:
            case PatientWithdrawn(patient_id=p, withdrawn_at=at) if p == patient_id:
                return "withdrawn", at
            case LostToFollowUp(patient_id=p, at=at) if p == patient_id:
                return "lost_to_follow_up", at
            case DeathRecorded(patient_id=p, reported_at=at) if p == patient_id:
                return "died", at
            case StudyCompleted(patient_id=p, completed_at=at) if p == patient_id:
                return "completed", at
            case TreatmentDiscontinued(patient_id=p, discontinued_at=at) if (
                    p == patient_id and discontinued is None):
                discontinued = ("treatment_discontinued", at)
    return discontinued


def _active_trial_holds(history: History) -> list[EnrollmentPaused | TrialHalted]:
    """The enrolment pauses and trial halts no DSMB decision has lifted (by hold id)."""
    lifted = {e.hold_id for e in history.data(SafetyHoldLifted)}
    return [h for f in history.facts if isinstance(h := f.data, EnrollmentPaused | TrialHalted)
            and h.hold_id not in lifted]


def _randomized(history: History) -> list[str]:
    return list(dict.fromkeys(e.patient_id for e in history.data(ArmAssigned)))


def study_status(history: History, protocol: ProtocolConfig) -> str:
    """ResearchStudy.status (the module's docstring gives the order)."""
    randomized = _randomized(history)
    cap_reached = len(randomized) >= protocol.enrollment_cap
    if cap_reached and all((d := disposition(history, p)) is not None and d[0] in FINAL
                           for p in randomized):
        return "completed"
    holds = _active_trial_holds(history)
    if any(isinstance(h, TrialHalted) for h in holds):
        return "temporarily-closed-to-accrual-and-intervention"
    if cap_reached:
        return "closed-to-accrual"
    if holds:
        return "temporarily-closed-to-accrual"
    return "active"


# --- resources --------------------------------------------------------------------------------


def research_study(history: History, protocol: ProtocolConfig) -> Resource:
    """The trial as a ResearchStudy: status from the ledger, arms and sites from the protocol,
    the randomized count (contained Group, actual) beside the planned one (the cap)."""
    randomized = _randomized(history)
    status = study_status(history, protocol)
    sites = [{"resourceType": "Location", "id": f"site-{site_id}",
              "identifier": [{"system": f"{BASE}/site", "value": site_id}], "name": site.name}
             for site_id, site in protocol.sites.items()]
    groups = [
        {"resourceType": "Group", "id": "randomized", "type": "person", "actual": True,
         "name": "Patients randomized", "quantity": len(randomized)},
        {"resourceType": "Group", "id": "planned", "type": "person", "actual": False,
         "name": "Planned enrolment (the protocol's cap)", "quantity": protocol.enrollment_cap},
    ]
    study: Resource = {
        "resourceType": "ResearchStudy",
        "id": protocol.trial_id,
        "contained": [*groups, *sites],
        "identifier": [{"system": REGISTRY, "value": protocol.trial_id}],
        "title": TITLE,
        "status": status,
        "primaryPurposeType": _concept(f"{TERMINOLOGY}/research-study-prim-purp-type",
                                       "treatment", "Treatment"),
        "phase": _concept(f"{TERMINOLOGY}/research-study-phase", "phase-1", "Phase 1"),
        "condition": [_concept(SNOMED, "200965009", "Plaque psoriasis")],
        "enrollment": [{"reference": f"#{g['id']}", "display": g["name"]} for g in groups],
        "site": [{"reference": f"#{s['id']}", "display": s["name"]} for s in sites],
        "arm": [{"name": arm_id,
                 "type": _concept(ARM_TYPE_SYSTEM, *ARM_TYPE[arm.kind]),
                 "description": arm.name}
                for arm_id, arm in protocol.arms.items()],
    }
    enrolled = history.data(PatientEnrolled)
    if enrolled:
        period = {"start": instant(min(e.enrolled_at for e in enrolled))}
        if status == "completed":
            ends = [d[1] for p in randomized if (d := disposition(history, p)) is not None]
            period["end"] = instant(max(ends))
        study["period"] = period
    return study


def _subject(subject_id: str, status: str, study_id: str) -> Resource:
    return {"resourceType": "ResearchSubject", "id": subject_id, "status": status,
            "study": {"reference": f"ResearchStudy/{study_id}"},
            "individual": {"reference": f"Patient/{subject_id}"}}


def research_subject(history: History, patient_id: str, protocol: ProtocolConfig) -> Resource | None:
    """The patient as a ResearchSubject (the module's docstring gives the status mapping); a
    screening never enrolled, by its screening id; None for an id the ledger does not know."""
    enrolled = _enrolment(history, patient_id)
    if enrolled is None:
        screened = next((s for s in history.data(PatientScreened) if s.screening_id == patient_id),
                        None)
        if screened is None or any(e.screening_id == patient_id
                                   for e in history.data(PatientEnrolled)):
            return None
        return _subject(patient_id, "eligible" if screened.eligible else "ineligible",
                        protocol.trial_id)
    assigned = _assignment(history, patient_id)
    ended = disposition(history, patient_id)
    if ended is not None and ended[0] in FINAL:
        status = "off-study"
    elif ended is not None:
        status = "follow-up"
    elif assigned is not None:
        status = "on-study-intervention"
    else:
        status = "on-study"
    subject = _subject(patient_id, status, protocol.trial_id)
    if ended is not None:
        subject["extension"] = [{"url": DISPOSITION_URL, "valueCode": ended[0]}]
    subject["period"] = {"start": instant(enrolled.enrolled_at),
                         **({"end": instant(ended[1])} if status == "off-study" and ended else {})}
    if assigned is not None:
        crossovers = _crossovers(history, patient_id)
        subject["assignedArm"] = assigned.arm
        subject["actualArm"] = crossovers[-1].to_arm if crossovers else assigned.arm
    return subject


def adverse_event(fact: Fact, data: AdverseEventReported,
                  followups: Iterable[AdverseEventFollowedUp], *, study_id: str = STUDY_ID,
                  arm: str | None = None) -> Resource:
    """An adverse event as it stands after its follow-ups (applied in the order given, ledger
    order: each sets only the fields it names). `arm` names the suspected intervention when the
    report carries none."""
    grade, serious, relatedness = data.ctcae_grade, data.serious, data.relatedness
    expected, outcome = data.expected, data.outcome
    for f in followups:
        if f.adverse_event_id != data.adverse_event_id:
            raise ValueError(f"follow-up {f.follow_up_id} is not of {data.adverse_event_id}")
        grade = f.ctcae_grade if f.ctcae_grade is not None else grade
        serious = f.serious if f.serious is not None else serious
        relatedness = f.relatedness if f.relatedness is not None else relatedness
        expected = f.expected if f.expected is not None else expected
        outcome = f.outcome if f.outcome is not None else outcome
    suspect = data.arm or arm
    resource: Resource = {
        "resourceType": "AdverseEvent",
        "id": data.adverse_event_id,
        "extension": [{"url": CTCAE_GRADE_URL, "valueInteger": grade},
                      {"url": EXPECTED_URL, "valueBoolean": expected}],
        "identifier": {"system": f"{BASE}/adverse-event", "value": data.adverse_event_id},
        "actuality": "actual",
        "event": {"text": data.term},
        "subject": {"reference": f"Patient/{data.patient_id}"},
        "date": instant(data.onset_at),
        "recordedDate": instant(data.reported_at or fact.time),
        "seriousness": _concept(f"{TERMINOLOGY}/adverse-event-seriousness",
                                *(("serious", "Serious") if serious
                                  else ("non-serious", "Non-serious"))),
        "severity": _concept(f"{TERMINOLOGY}/adverse-event-severity", SEVERITY[grade],
                             SEVERITY[grade].capitalize()),
        "suspectEntity": [{
            "instance": {"display": f"Study intervention, arm {suspect}" if suspect
                         else "Study intervention"},
            "causality": [{"assessment": {
                "coding": [_coding(RELATEDNESS_SYSTEM, relatedness)],
                "text": relatedness.replace("_", " ")}}]}],
        "study": [{"reference": f"ResearchStudy/{study_id}"}],
    }
    if outcome is not None:
        resource["outcome"] = _concept(f"{TERMINOLOGY}/adverse-event-outcome", *OUTCOME[outcome])
    return resource


def bundle(resources: Sequence[Resource], total: int | None = None, link_self: str | None = None,
           *, base: str = BASE, timestamp: datetime | None = None) -> Resource:
    """A searchset Bundle of `resources` (every one a match), `total` by default their number."""
    result: Resource = {"resourceType": "Bundle", "type": "searchset",
                        "total": len(resources) if total is None else total}
    if timestamp is not None:
        result["timestamp"] = instant(timestamp)
    if link_self is not None:
        result["link"] = [{"relation": "self", "url": link_self}]
    if resources:
        result["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                            "search": {"mode": "match"}} for r in resources]
    return result


def _search_url(base: str, resource_type: str, params: Mapping[str, str | None]) -> str:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items() if v is not None)
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def _time(history: History) -> datetime | None:
    return history.facts[-1].time if history.facts else None


def search_research_subjects(history: History, protocol: ProtocolConfig,
                             patient: str | None = None, *, base: str = BASE) -> Resource:
    """`GET ResearchSubject[?patient=]`: every enrolled patient (enrolment order), then every
    screening never enrolled; or the one whose individual is `patient`."""
    if patient is not None:
        found = research_subject(history, patient, protocol)
        subjects = [found] if found is not None else []
    else:
        enrolled = {e.screening_id for e in history.data(PatientEnrolled)}
        ids = [*dict.fromkeys(e.patient_id for e in history.data(PatientEnrolled)),
               *(s.screening_id for s in history.data(PatientScreened)
                 if s.screening_id not in enrolled)]
        subjects = [s for i in ids if (s := research_subject(history, i, protocol)) is not None]
    return bundle(subjects, link_self=_search_url(base, "ResearchSubject", {"patient": patient}),
                  base=base, timestamp=_time(history))


def adverse_events(history: History, patient: str | None = None, *,
                   study_id: str = STUDY_ID) -> list[Resource]:
    """Every adverse event reported (ledger order), or the patient's, with its follow-ups."""
    followups: dict[str, list[AdverseEventFollowedUp]] = {}
    for f in history.data(AdverseEventFollowedUp):
        followups.setdefault(f.adverse_event_id, []).append(f)
    found: list[Resource] = []
    seen: set[str] = set()
    for fact, e in history.of(AdverseEventReported):
        if (patient is not None and e.patient_id != patient) or e.adverse_event_id in seen:
            continue
        seen.add(e.adverse_event_id)
        found.append(adverse_event(fact, e, followups.get(e.adverse_event_id, ()),
                                   study_id=study_id,
                                   arm=e.arm or arm_at(history, e.patient_id, e.onset_at)))
    return found


def search_adverse_events(history: History, patient: str | None = None, *,
                          study_id: str = STUDY_ID, base: str = BASE) -> Resource:
    """`GET AdverseEvent[?patient=]` as a searchset Bundle."""
    return bundle(adverse_events(history, patient, study_id=study_id),
                  link_self=_search_url(base, "AdverseEvent", {"patient": patient}),
                  base=base, timestamp=_time(history))
