"""The FHIR R4 views of the ledger: a scripted cohort's ResearchStudy, ResearchSubjects and
AdverseEvents, validated against the fhir.resources R4B models, checked by hand, and free of
anything that could identify a person."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.adverseevent import AdverseEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.group import Group
from fhir.resources.R4B.location import Location
from fhir.resources.R4B.researchstudy import ResearchStudy
from fhir.resources.R4B.researchsubject import ResearchSubject
from pydantic import ValidationError

from services.audit import fhir
from services.audit.history import Fact, History
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    ArmSuspended,
    DeathRecorded,
    EnrollmentPaused,
    EventData,
    LostToFollowUp,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    Reason,
    SafetyHoldLifted,
    StudyCompleted,
    TreatmentDiscontinued,
    TrialHalted,
)
from shared.protocol import ProtocolConfig, default_protocol

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
SHANGHAI = timezone(timedelta(hours=8))
# Every free text and local number of the cohort carries this marker: none may reach FHIR.
SECRET = "SECRET"
MODELS: dict[str, Any] = {"ResearchStudy": ResearchStudy, "ResearchSubject": ResearchSubject,
                          "AdverseEvent": AdverseEvent, "Bundle": Bundle, "Group": Group,
                          "Location": Location}
# The R4 value sets (required bindings) the codes must come from: fhir.resources checks none.
STUDY_STATUS = {"active", "administratively-completed", "approved", "closed-to-accrual",
                "closed-to-accrual-and-intervention", "completed", "disapproved", "in-review",
                "temporarily-closed-to-accrual", "temporarily-closed-to-accrual-and-intervention",
                "withdrawn"}
SUBJECT_STATUS = {"candidate", "eligible", "follow-up", "ineligible", "not-registered",
                  "off-study", "on-study", "on-study-intervention", "on-study-observation",
                  "pending-on-study", "potential-candidate", "screening", "withdrawn"}
AE_OUTCOME = {"resolved", "recovering", "ongoing", "resolvedWithSequelae", "fatal", "unknown"}


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def screened(sid: str, site: str, at: datetime, eligible: bool = True) -> PatientScreened:
    reasons = () if eligible else (Reason(criterion="pasi", message=f"PASI below 10 {SECRET}"),)
    return PatientScreened(screening_id=sid, site_id=site, screening_number=f"{site}-{SECRET}-{sid}",
                           eligible=eligible, reasons=reasons, age_years=41, weight_kg=72.5,
                           pasi=18.0 if eligible else 6.0, protocol_version="1.2.0",
                           screened_at=at, consent_signed_at=at - timedelta(hours=1))


def enrolled(pid: str, sid: str, site: str, at: datetime) -> PatientEnrolled:
    return PatientEnrolled(patient_id=pid, site_id=site, screening_id=sid, baseline_weight_kg=72.5,
                           baseline_pasi=18.0, enrolled_at=at)


def assigned(pid: str, site: str, arm: Arm, number: int, at: datetime) -> ArmAssigned:
    return ArmAssigned(patient_id=pid, site_id=site, arm=arm, randomization_number=number,
                       stratum=f"{site}:pasi_lt20", baseline_weight_kg=72.5, assigned_at=at)


def patient(pid: str, sid: str, site: str, arm: Arm, number: int, at: datetime) -> list[EventData]:
    return [screened(sid, site, at), enrolled(pid, sid, site, at),
            assigned(pid, site, arm, number, at + timedelta(hours=1))]


def hold_lifted(hold_id: str, at_note: str) -> SafetyHoldLifted:
    return SafetyHoldLifted(hold_id=hold_id, scope="trial", target="NCT03424629",
                            rationale=f"DSMB reviewed {at_note} {SECRET}", decided_by=f"dsmb-{SECRET}")


# The cohort, in ledger order: (the event, its time, a label for the moments the tests look at).
SCRIPT: list[tuple[EventData, datetime, str]] = [
    *((e, day(0), "") for e in patient("P-001", "SCR-1", "S1", "msc_low", 1, day(0))),
    *((e, day(1), "") for e in patient("P-002", "SCR-2", "S1", "msc_high", 2, day(1))),
    *((e, day(2), "") for e in patient("P-003", "SCR-3", "S2", "mtx", 3, day(2))),
    *((e, day(3), "four randomized") for e in patient("P-004", "SCR-4", "S2", "msc_low", 4, day(3))),
    (AdverseEventReported(adverse_event_id="AE-1", patient_id="P-004", site_id="S2", arm="msc_low",
                          term="Pyrexia", onset_at=day(9), ctcae_grade=2, serious=False,
                          relatedness="possible", expected=True, reported_at=day(9.5),
                          outcome="recovering"), day(10), ""),
    (EnrollmentPaused(hold_id="H-1", rule_id="R3", trial_id="NCT03424629"), day(11), "paused"),
    # A fatal adverse event, without its arm (safety had not learnt it): the arm comes from the
    # ledger. Efficacy records the death from it.
    (AdverseEventReported(adverse_event_id="AE-2", patient_id="P-003", site_id="S2",
                          term="Hepatic failure", onset_at=day(12).astimezone(SHANGHAI),
                          ctcae_grade=5, serious=True, relatedness="probable", expected=False,
                          reported_at=day(13), outcome="fatal"), day(13), ""),
    (DeathRecorded(patient_id="P-003", site_id="S2", adverse_event_id="AE-2",
                   reported_at=day(13), source_event_id="ev-ae-2"), day(13), "died"),
    (AdverseEventFollowedUp(follow_up_id="FU-1", adverse_event_id="AE-1", patient_id="P-004",
                            site_id="S2", ctcae_grade=3, serious=True, relatedness="probable",
                            reported_at=day(14)), day(14), "graded up"),
    (PatientWithdrawn(patient_id="P-002", site_id="S1", reason=f"moved away {SECRET}",
                      withdrawn_at=day(15).astimezone(SHANGHAI)), day(15), "withdrawn"),
    (ArmCrossedOver(patient_id="P-001", site_id="S1", from_arm="msc_low", to_arm="mtx",
                    reason=f"no response {SECRET}", crossed_over_at=day(20)), day(20), "crossed"),
    (AdverseEventReported(adverse_event_id="AE-3", patient_id="P-001", site_id="S1",
                          term="Headache", onset_at=day(21), ctcae_grade=1, serious=False,
                          relatedness="not_related", expected=True), day(21), ""),
    # Reported late, without its arm: its onset came before the crossover.
    (AdverseEventReported(adverse_event_id="AE-4", patient_id="P-001", site_id="S1",
                          term="Nausea", onset_at=day(18), ctcae_grade=1, serious=False,
                          relatedness="unlikely", expected=True, reported_at=day(21.5),
                          outcome="unknown"), day(21.5), ""),
    (TreatmentDiscontinued(patient_id="P-004", site_id="S2", reason=f"toxicity {SECRET}",
                           discontinued_at=day(22), decided_by=f"inv-{SECRET}"), day(22),
     "discontinued"),
    (AdverseEventFollowedUp(follow_up_id="FU-2", adverse_event_id="AE-1", patient_id="P-004",
                            site_id="S2", outcome="recovered", resolved_at=day(24),
                            reported_at=day(24)), day(24), "resolved"),
    (hold_lifted("H-1", "the pause"), day(25), "lifted"),
    (screened("SCR-5", "S1", day(26)), day(26), ""),
    (enrolled("P-005", "SCR-5", "S1", day(26)), day(26), "five enrolled"),
    (screened("SCR-6", "S2", day(27), eligible=False), day(27), ""),
    (screened("SCR-7", "S1", day(28)), day(28), "end"),
]


def facts_of(script: list[tuple[EventData, datetime, str]], first: int = 1) -> list[Fact]:
    return [Fact(position=first + i, event_id=f"ev-{first + i}", time=at,
                 source=f"/services/{type(e).topic.split('.')[-1]}", data=e)
            for i, (e, at, _) in enumerate(script)]


FACTS = facts_of(SCRIPT)
COHORT = History.of_facts(FACTS)
PROTOCOL = default_protocol()
CAP4 = PROTOCOL.model_copy(update={"enrollment_cap": 4})


def upto(label: str) -> History:
    """The cohort's history up to the last fact labelled `label`."""
    last = max(i for i, (_, _, lab) in enumerate(SCRIPT) if lab == label)
    return History(tuple(FACTS[: last + 1]))


def before(label: str) -> History:
    first = min(i for i, (_, _, lab) in enumerate(SCRIPT) if lab == label)
    return History(tuple(FACTS[:first]))


def then(history: History, *events: EventData) -> History:
    """`history` with `events` appended, a day apart after its last fact."""
    last = history.facts[-1]
    script = [(e, last.time + timedelta(days=i + 1), "") for i, e in enumerate(events)]
    return History((*history.facts, *facts_of(script, first=last.position + 1)))


def utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def subjects(history: History = COHORT, protocol: ProtocolConfig = PROTOCOL) -> dict[str, Any]:
    found = fhir.search_research_subjects(history, protocol)
    return {e["resource"]["id"]: e["resource"] for e in found.get("entry", [])}


def events(history: History = COHORT) -> dict[str, Any]:
    found = fhir.search_adverse_events(history)
    return {e["resource"]["id"]: e["resource"] for e in found.get("entry", [])}


def everything(history: History = COHORT, protocol: ProtocolConfig = PROTOCOL) -> list[dict[str, Any]]:
    return [fhir.research_study(history, protocol), *subjects(history, protocol).values(),
            *events(history).values()]


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) of a JSON document, containers included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")


# --- the study --------------------------------------------------------------------------------


def test_the_study_names_the_trial_its_phase_condition_arms_and_sites() -> None:
    study = fhir.research_study(COHORT, PROTOCOL)
    assert study["id"] == "NCT03424629"
    assert study["identifier"] == [{"system": "https://clinicaltrials.gov", "value": "NCT03424629"}]
    assert study["title"] == "Safety and Efficacy of UC-MSCs in Patients With Plaque Psoriasis"
    assert study["phase"]["coding"] == [{
        "system": "http://terminology.hl7.org/CodeSystem/research-study-phase", "code": "phase-1",
        "display": "Phase 1"}]
    assert study["condition"][0]["coding"][0] == {"system": "http://snomed.info/sct",
                                                  "code": "200965009", "display": "Plaque psoriasis"}
    assert [(a["name"], a["type"]["coding"][0]["code"], a["description"]) for a in study["arm"]] == [
        ("msc_low", "experimental", "Low-Dose UC-MSCs"),
        ("msc_high", "experimental", "High-Dose UC-MSCs"),
        ("mtx", "active-comparator", "Methotrexate")]
    contained = {c["id"]: c for c in study["contained"]}
    assert [contained[s["reference"][1:]]["identifier"][0]["value"] for s in study["site"]] == [
        "S1", "S2"]
    assert study["period"] == {"start": utc(day(0))}


def test_the_enrolment_is_the_randomized_count_beside_the_cap() -> None:
    def quantities(history: History) -> dict[str, tuple[bool, int]]:
        study = fhir.research_study(history, PROTOCOL)
        contained = {c["id"]: c for c in study["contained"]}
        groups = [contained[r["reference"][1:]] for r in study["enrollment"]]
        return {g["id"]: (g["actual"], g["quantity"]) for g in groups}

    assert quantities(COHORT) == {"randomized": (True, 4), "planned": (False, 57)}
    # P-005 is enrolled, not randomized: the cap counts randomizations, as randomization does.
    assert quantities(before("four randomized")) == {"randomized": (True, 3), "planned": (False, 57)}


@pytest.mark.parametrize(("history", "protocol", "status"), [
    (before("paused"), PROTOCOL, "active"),
    (upto("paused"), PROTOCOL, "temporarily-closed-to-accrual"),
    (upto("resolved"), PROTOCOL, "temporarily-closed-to-accrual"),
    (upto("lifted"), PROTOCOL, "active"),
    (COHORT, PROTOCOL, "active"),
    # The cap reached: closed, also through a pause (the pause's lifting changes nothing).
    (COHORT, CAP4, "closed-to-accrual"),
    (upto("paused"), CAP4, "closed-to-accrual"),
    # A halt stops dosing too, whatever the cap.
    (then(COHORT, TrialHalted(hold_id="H-2", rule_id="R5", trial_id="NCT03424629")), PROTOCOL,
     "temporarily-closed-to-accrual-and-intervention"),
    (then(COHORT, TrialHalted(hold_id="H-2", rule_id="R5", trial_id="NCT03424629")), CAP4,
     "temporarily-closed-to-accrual-and-intervention"),
    (then(COHORT, TrialHalted(hold_id="H-2", rule_id="R5", trial_id="NCT03424629"),
          hold_lifted("H-2", "the halt")), PROTOCOL, "active"),
    # Lifting another hold lifts not this one.
    (then(upto("paused"), hold_lifted("H-9", "another")), PROTOCOL, "temporarily-closed-to-accrual"),
    # An arm suspension: patients go to the open arms.
    (then(COHORT, ArmSuspended(hold_id="H-3", rule_id="R2", arm="msc_high")), PROTOCOL, "active"),
])
def test_the_study_status_follows_holds_and_the_cap(history: History, protocol: ProtocolConfig,
                                                    status: str) -> None:
    assert fhir.research_study(history, protocol)["status"] == status


def lost(pid: str, site: str) -> LostToFollowUp:
    return LostToFollowUp(patient_id=pid, site_id=site, declared_by="efficacy-sweep",
                          reason=f"two missed {SECRET}", missed_weeks=(24, 36), at=day(300))


def completed(pid: str, site: str) -> StudyCompleted:
    return StudyCompleted(patient_id=pid, site_id=site, assessment_id="A-52",
                          completed_at=day(370))


def test_the_study_is_completed_once_the_cap_is_reached_and_every_randomized_patient_has_ended() -> None:
    # P-002 withdrew, P-003 died; P-004 only stopped treatment, which does not end the study.
    ended = then(COHORT, lost("P-001", "S1"))
    assert fhir.research_study(ended, CAP4)["status"] == "closed-to-accrual"
    done = then(ended, completed("P-004", "S2"))
    study = fhir.research_study(done, CAP4)
    assert study["status"] == "completed"
    assert study["period"] == {"start": utc(day(0)), "end": utc(day(370))}
    # Everyone randomized so far has ended, but the cap is far: the trial still recruits.
    assert fhir.research_study(done, PROTOCOL)["status"] == "active"
    assert "end" not in fhir.research_study(done, PROTOCOL)["period"]


def test_an_empty_ledger_is_an_active_study_with_nobody_randomized() -> None:
    study = fhir.research_study(History(()), PROTOCOL)
    assert study["status"] == "active" and "period" not in study
    assert {c["id"]: c.get("quantity") for c in study["contained"]}["randomized"] == 0


# --- the subjects -----------------------------------------------------------------------------


def test_each_subject_has_the_status_its_history_gives() -> None:
    found = subjects()
    assert {i: s["status"] for i, s in found.items()} == {
        "P-001": "on-study-intervention",  # randomized, crossed over, treated
        "P-002": "off-study",  # withdrawn
        "P-003": "off-study",  # died
        "P-004": "follow-up",  # treatment discontinued, still assessed
        "P-005": "on-study",  # enrolled, not randomized
        "SCR-6": "ineligible",  # a screening failure
        "SCR-7": "eligible",  # screened eligible, not enrolled
    }
    assert list(found) == ["P-001", "P-002", "P-003", "P-004", "P-005", "SCR-6", "SCR-7"]
    dispositions = {i: [x["valueCode"] for x in s.get("extension", [])] for i, s in found.items()}
    assert dispositions == {"P-001": [], "P-002": ["withdrawn"], "P-003": ["died"],
                            "P-004": ["treatment_discontinued"], "P-005": [], "SCR-6": [],
                            "SCR-7": []}


def test_a_subject_moves_through_its_statuses_as_the_ledger_grows() -> None:
    def status(history: History, pid: str) -> str | None:
        found = fhir.research_subject(history, pid, PROTOCOL)
        return None if found is None else found["status"]

    assert [status(h, "P-004") for h in (before("four randomized"), upto("four randomized"),
                                         before("discontinued"), upto("discontinued"))] == [
        None, "on-study-intervention", "on-study-intervention", "follow-up"]
    assert [status(h, "P-002") for h in (before("withdrawn"), upto("withdrawn"))] == [
        "on-study-intervention", "off-study"]
    assert status(then(COHORT, completed("P-001", "S1")), "P-001") == "off-study"
    # A discontinued patient who then completes is off study, the completion ending the period.
    later = fhir.research_subject(then(COHORT, completed("P-004", "S2")), "P-004", PROTOCOL)
    assert later is not None and later["status"] == "off-study"
    assert later["period"] == {"start": utc(day(3)), "end": utc(day(370))}
    assert later["extension"][0]["valueCode"] == "completed"


def test_the_period_runs_from_enrolment_to_the_end_of_the_study_in_utc() -> None:
    found = subjects()
    assert found["P-001"]["period"] == {"start": utc(day(0))}
    assert found["P-002"]["period"] == {"start": utc(day(1)), "end": "2026-03-17T01:00:00Z"}
    assert found["P-003"]["period"] == {"start": utc(day(2)), "end": utc(day(13))}
    assert found["P-004"]["period"] == {"start": utc(day(3))}  # discontinued: still on study
    assert "period" not in found["SCR-7"]


def test_the_assigned_arm_is_the_randomized_one_and_the_actual_arm_follows_the_crossover() -> None:
    found = subjects()
    arms = {i: (s.get("assignedArm"), s.get("actualArm")) for i, s in found.items()}
    assert arms == {"P-001": ("msc_low", "mtx"), "P-002": ("msc_high", "msc_high"),
                    "P-003": ("mtx", "mtx"), "P-004": ("msc_low", "msc_low"),
                    "P-005": (None, None), "SCR-6": (None, None), "SCR-7": (None, None)}
    before_crossover = fhir.research_subject(before("crossed"), "P-001", PROTOCOL)
    assert before_crossover is not None and before_crossover["actualArm"] == "msc_low"
    # The arms name arms of the study.
    arm_names = {a["name"] for a in fhir.research_study(COHORT, PROTOCOL)["arm"]}
    assert {a for pair in arms.values() for a in pair if a} <= arm_names


def test_a_subject_points_at_the_study_and_a_pseudonymous_patient() -> None:
    for sid, subject in subjects().items():
        assert subject["study"] == {"reference": "ResearchStudy/NCT03424629"}
        assert subject["individual"] == {"reference": f"Patient/{sid}"}


def test_an_unknown_id_or_an_enrolled_screening_has_no_subject() -> None:
    assert fhir.research_subject(COHORT, "P-999", PROTOCOL) is None
    assert fhir.research_subject(COHORT, "SCR-1", PROTOCOL) is None  # it is P-001 now
    assert fhir.research_subject(before("five enrolled"), "SCR-5", PROTOCOL) is not None


def test_the_subject_search_finds_one_patient_or_none() -> None:
    one = fhir.search_research_subjects(COHORT, PROTOCOL, patient="P-002")
    assert one["total"] == 1 and [e["resource"]["id"] for e in one["entry"]] == ["P-002"]
    assert one["link"] == [{"relation": "self",
                            "url": "https://nct03424629.example/fhir/ResearchSubject?patient=P-002"}]
    none = fhir.search_research_subjects(COHORT, PROTOCOL, patient="P-999")
    assert none["total"] == 0 and "entry" not in none


# --- adverse events ---------------------------------------------------------------------------


def test_an_adverse_event_carries_the_latest_follow_up_values() -> None:
    ae = events()["AE-1"]
    assert ae["extension"] == [
        {"url": "https://nct03424629.example/fhir/StructureDefinition/ctcae-grade", "valueInteger": 3},
        {"url": "https://nct03424629.example/fhir/StructureDefinition/adverse-event-expected",
         "valueBoolean": True}]
    assert ae["seriousness"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
        "code": "serious", "display": "Serious"}
    assert ae["outcome"]["coding"][0]["code"] == "resolved"  # the second follow-up's
    assert ae["severity"]["coding"][0]["code"] == "severe"
    assert ae["suspectEntity"][0]["causality"][0]["assessment"]["text"] == "probable"
    # Dates stay the first report's: onset and when it was recorded.
    assert (ae["date"], ae["recordedDate"]) == (utc(day(9)), utc(day(9.5)))  # not the ledger's


def test_an_adverse_event_before_its_follow_ups_is_as_first_reported() -> None:
    ae = events(before("graded up"))["AE-1"]
    grade = next(x["valueInteger"] for x in ae["extension"] if x["url"] == fhir.CTCAE_GRADE_URL)
    assert grade == 2
    assert ae["seriousness"]["coding"][0]["code"] == "non-serious"
    assert ae["outcome"]["coding"][0]["code"] == "recovering"
    assert ae["severity"]["coding"][0]["code"] == "moderate"
    assert ae["suspectEntity"][0]["causality"][0]["assessment"]["text"] == "possible"
    graded = events(upto("graded up"))["AE-1"]  # the first follow-up only: outcome unchanged
    assert graded["outcome"]["coding"][0]["code"] == "recovering"
    assert graded["extension"][0]["valueInteger"] == 3


def test_a_grade_5_adverse_event_is_fatal_and_serious() -> None:
    ae = events()["AE-2"]
    assert ae["extension"][0]["valueInteger"] == 5
    assert ae["outcome"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/adverse-event-outcome", "code": "fatal",
        "display": "Fatal"}
    assert ae["seriousness"]["coding"][0]["code"] == "serious"
    assert ae["date"] == utc(day(12))  # sent in +08:00, written in UTC
    # Reported without its arm: the arm the patient was on then, from the ledger.
    assert ae["suspectEntity"][0]["instance"] == {"display": "Study intervention, arm mtx"}


def test_an_adverse_event_reports_identity_subject_study_and_what_is_not_known() -> None:
    ae = events()["AE-3"]
    assert (ae["id"], ae["actuality"], ae["event"]) == ("AE-3", "actual", {"text": "Headache"})
    assert ae["subject"] == {"reference": "Patient/P-001"}
    assert ae["study"] == [{"reference": "ResearchStudy/NCT03424629"}]
    assert "outcome" not in ae  # none reported yet
    assert ae["recordedDate"] == utc(day(21))  # no reported_at: the ledger's time
    # After the crossover the suspected intervention is the new arm's.
    assert ae["suspectEntity"][0]["instance"]["display"] == "Study intervention, arm mtx"
    assert ae["suspectEntity"][0]["causality"][0]["assessment"]["coding"][0]["code"] == "not_related"
    late = events()["AE-4"]  # its onset before the crossover: the arm then
    assert late["suspectEntity"][0]["instance"]["display"] == "Study intervention, arm msc_low"
    assert late["outcome"]["coding"][0]["code"] == "unknown"


def test_every_outcome_maps_to_its_r4_code() -> None:
    assert {k: v[0] for k, v in fhir.OUTCOME.items()} == {
        "recovered": "resolved", "recovering": "recovering", "not_recovered": "ongoing",
        "recovered_with_sequelae": "resolvedWithSequelae", "fatal": "fatal", "unknown": "unknown"}


def test_a_follow_up_of_another_event_is_refused() -> None:
    fact, first = next(COHORT.of(AdverseEventReported))
    other = AdverseEventFollowedUp(follow_up_id="FU-X", adverse_event_id="AE-2", patient_id="P-003",
                                   site_id="S2", ctcae_grade=1, reported_at=day(30))
    with pytest.raises(ValueError, match="FU-X"):
        fhir.adverse_event(fact, first, [other])


def test_the_adverse_event_search_filters_by_patient() -> None:
    assert [e["resource"]["id"] for e in fhir.search_adverse_events(COHORT)["entry"]] == [
        "AE-1", "AE-2", "AE-3", "AE-4"]
    mine = fhir.search_adverse_events(COHORT, patient="P-004")
    assert mine["total"] == 1 and mine["entry"][0]["resource"]["id"] == "AE-1"
    assert fhir.search_adverse_events(COHORT, patient="P-005")["total"] == 0


# --- bundles ----------------------------------------------------------------------------------


def test_a_bundle_is_a_searchset_of_matches_with_absolute_urls() -> None:
    found = fhir.search_adverse_events(COHORT)
    assert (found["resourceType"], found["type"], found["total"]) == ("Bundle", "searchset", 4)
    assert found["timestamp"] == utc(day(28))  # the ledger's last fact
    assert found["entry"][0]["fullUrl"] == "https://nct03424629.example/fhir/AdverseEvent/AE-1"
    assert all(e["search"] == {"mode": "match"} for e in found["entry"])
    other = fhir.bundle([events()["AE-2"]], total=7, link_self="https://h.example/fhir/AdverseEvent",
                        base="https://h.example/fhir")
    assert other["total"] == 7 and other["entry"][0]["fullUrl"] == "https://h.example/fhir/AdverseEvent/AE-2"
    assert fhir.bundle([]) == {"resourceType": "Bundle", "type": "searchset", "total": 0}


def test_the_cohort_bundle_round_trips_through_the_fhir_models() -> None:
    resources = everything()
    document = fhir.bundle(resources, link_self="https://nct03424629.example/fhir/everything")
    model = Bundle.model_validate(document)
    again = Bundle.model_validate_json(model.model_dump_json())
    assert json.loads(again.model_dump_json()) == document
    parsed = [e.resource for e in again.entry or []]
    assert [(type(r).__name__, r.id if r else None) for r in parsed] == [
        (r["resourceType"], r["id"]) for r in resources]
    by_id = {r.id: r for r in parsed if r is not None}
    study, p1, ae2 = by_id["NCT03424629"], by_id["P-001"], by_id["AE-2"]
    assert isinstance(study, ResearchStudy) and isinstance(p1, ResearchSubject)
    assert isinstance(ae2, AdverseEvent)
    assert study.status == "active" and study.identifier and study.identifier[0].value == "NCT03424629"
    assert (p1.status, p1.assignedArm, p1.actualArm) == ("on-study-intervention", "msc_low", "mtx")
    assert ae2.extension and ae2.extension[0].valueInteger == 5
    assert ae2.outcome and ae2.outcome.coding and ae2.outcome.coding[0].code == "fatal"


# --- validity at every moment, and privacy ----------------------------------------------------


PREFIXES = [History(tuple(FACTS[:n])) for n in range(len(FACTS) + 1)]


@pytest.mark.parametrize("history", PREFIXES, ids=[f"after-{n}" for n in range(len(PREFIXES))])
def test_every_resource_at_every_moment_validates_and_uses_r4_codes(history: History) -> None:
    for protocol in (PROTOCOL, CAP4):
        documents = [*everything(history, protocol),
                     fhir.search_research_subjects(history, protocol),
                     fhir.search_research_subjects(history, protocol, patient="P-001"),
                     fhir.search_adverse_events(history),
                     fhir.search_adverse_events(history, patient="P-004")]
        for document in documents:
            MODELS[document["resourceType"]].model_validate(document)
            for contained in document.get("contained", []):
                MODELS[contained["resourceType"]].model_validate(contained)
            for path, value in walk(document):
                # FHIR JSON: no nulls, no empty arrays, objects or strings.
                assert value not in (None, [], {}, ""), f"{document['resourceType']}{path}"
        study = documents[0]
        assert study["status"] in STUDY_STATUS
        assert {c["id"] for c in study["contained"]} == {r["reference"][1:] for r in
                                                         (*study["enrollment"], *study["site"])}
        for resource in documents[1:]:
            if resource["resourceType"] == "ResearchSubject":
                assert resource["status"] in SUBJECT_STATUS
            if resource["resourceType"] == "AdverseEvent" and "outcome" in resource:
                assert resource["outcome"]["coding"][0]["code"] in AE_OUTCOME


def test_the_validation_above_can_fail() -> None:
    subject = subjects()["P-001"]
    with pytest.raises(ValidationError):
        ResearchSubject.model_validate({**subject, "nickname": "x"})
    with pytest.raises(ValidationError):
        AdverseEvent.model_validate({**events()["AE-1"], "date": "last tuesday"})
    with pytest.raises(ValidationError):
        ResearchStudy.model_validate({k: v for k, v in fhir.research_study(COHORT, PROTOCOL).items()
                                      if k != "status"})


PERSONAL = {"birthDate", "address", "telecom", "gender", "photo", "deceasedBoolean",
            "deceasedDateTime", "maritalStatus", "contact", "communication", "given", "family"}


def test_no_resource_carries_anything_that_could_identify_a_person() -> None:
    documents = [*everything(then(COHORT, lost("P-001", "S1"))),
                 fhir.search_research_subjects(COHORT, PROTOCOL)]
    for document in documents:
        text = json.dumps(document)
        # No free text of the ledger (reasons, rationales, actors), no screening number.
        assert SECRET not in text, document["id"] if "id" in document else "bundle"
        for path, value in walk(document):
            key = path.rsplit(".", 1)[-1]
            assert key not in PERSONAL, path
            if key == "name":  # an arm's, a site's or a group's, never a person's
                assert ".arm[" in path or ".contained[" in path, path
            if isinstance(value, dict) and value.get("resourceType") in (
                    "Patient", "Person", "RelatedPerson", "Practitioner"):
                raise AssertionError(f"{path} holds a {value['resourceType']}")
            if isinstance(value, dict) and str(value.get("reference", "")).startswith("Patient/"):
                assert value == {"reference": value["reference"]}, path  # no display
    # The check sees a name where one would be.
    leaked = {**subjects()["P-001"], "individual": {"reference": "Patient/P-001", "display": "x"}}
    assert any(isinstance(v, dict) and "display" in v and str(v.get("reference")).startswith("Patient/")
               for _, v in walk(leaked))


# --- the module stays pure --------------------------------------------------------------------


ALLOWED = {"shared.events", "shared.protocol", "services.audit.history"}


def test_the_module_imports_only_the_standard_library_the_catalogue_and_the_protocol() -> None:
    tree = ast.parse((REPO / "services/audit/fhir.py").read_text())
    names = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
    assert outside == ALLOWED


def test_the_module_imports_without_fhir_resources_or_any_framework() -> None:
    blocker = ("import importlib.abc, sys\n"
               "class B(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('fhir', 'fastapi', 'starlette', 'sqlalchemy',"
               " 'aiokafka', 'httpx'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, B())\n")
    ok = subprocess.run([sys.executable, "-c", blocker + "import services.audit.fhir"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-c", blocker + "import fhir.resources"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "blocked: fhir" in refused.stderr
