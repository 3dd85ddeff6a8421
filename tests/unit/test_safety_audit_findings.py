"""The safety defects of issue 10's audit, as given events / when command / then events (or refusal).

Each test is named after the defect it pins; helpers come from test_safety_rules.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from services.safety import domain, rules
from shared.decider import Identified
from shared.errors import Refused
from shared.events import (
    AdverseEventFollowedUp,
    ArmAssigned,
    ArmCrossedOver,
    InfusionGiven,
    LabResult,
    StoppingRuleTriggered,
)
from shared.protocol import default_protocol
from shared.web import REFUSAL_STATUS
from tests.unit.test_safety_rules import (
    CONFIG,
    T0,
    Given,
    ae,
    fired,
    given,
    new_id,
    patient,
)

NOW = T0 + timedelta(days=2)


def refusal(call: object) -> Refused:
    assert callable(call)
    with pytest.raises(Refused) as err:
        call()
    return err.value


def fields(refused: Refused) -> set[str]:
    return {e["field"] for e in refused.details["errors"]}


def follow_up(ae_id: str, days: float = 1, **changes: object) -> Given:
    return Identified(new_id(), AdverseEventFollowedUp.model_validate({
        "follow_up_id": new_id(), "adverse_event_id": ae_id, "patient_id": "P1",
        "site_id": "S1", "reported_at": T0 + timedelta(days=days), **changes}))


# --- item 12: a death need not halt the trial ---------------------------------------------------


@pytest.mark.parametrize(("grade", "serious", "wrong"), [
    (3, False, {"body.ctcae_grade", "body.serious"}), (4, True, {"body.ctcae_grade"}),
    (5, False, {"body.serious"})])
def test_a_fatal_outcome_that_is_not_grade_5_and_serious_is_refused_naming_the_fields(
        grade: int, serious: bool, wrong: set[str]) -> None:
    state = given(patient("P1", "mtx"))
    cmd = domain.ReportAdverseEvent("P1", "sepsis", T0, grade, serious, "not_related", True,
                                    outcome="fatal")
    err = refusal(lambda: domain.decide_report(CONFIG, state, cmd, "AE-1", NOW))
    assert err.code == "inconsistent_adverse_event"
    assert REFUSAL_STATUS[err.code] == 422
    assert fields(err) == wrong


def test_a_fatal_outcome_with_grade_5_and_serious_is_accepted_and_halts_the_trial() -> None:
    state = given(patient("P1", "mtx"))
    cmd = domain.ReportAdverseEvent("P1", "sepsis", T0, 5, True, "not_related", True,
                                    outcome="fatal")
    emitted = domain.decide_report(CONFIG, state, cmd, "AE-1", NOW)
    assert "R1-death" in [e.rule_id for _, e in emitted if isinstance(e, StoppingRuleTriggered)]


def test_a_follow_up_reporting_a_death_must_leave_the_event_grade_5_and_serious() -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 3, "not_related", serious=True,
                                          ae_id="AE-1"))
    only_outcome = domain.FollowUp("P1", "AE-1", outcome="fatal")
    err = refusal(lambda: domain.decide_follow_up(CONFIG, state, only_outcome, "FU-1", NOW))
    assert err.code == "inconsistent_adverse_event" and fields(err) == {"body.ctcae_grade"}
    not_serious = domain.FollowUp("P1", "AE-1", outcome="fatal", ctcae_grade=5, serious=False)
    err = refusal(lambda: domain.decide_follow_up(CONFIG, state, not_serious, "FU-1", NOW))
    assert fields(err) == {"body.serious"}
    death = domain.FollowUp("P1", "AE-1", outcome="fatal", ctcae_grade=5)
    emitted = domain.decide_follow_up(CONFIG, state, death, "FU-1", NOW)
    assert "R1-death" in [e.rule_id for _, e in emitted if isinstance(e, StoppingRuleTriggered)]
    # ...and once fatal, a later follow-up cannot make it a lesser grade
    state = domain.apply(state, emitted)
    lesser = domain.FollowUp("P1", "AE-1", ctcae_grade=4)
    err = refusal(lambda: domain.decide_follow_up(CONFIG, state, lesser, "FU-2", NOW))
    assert err.code == "inconsistent_adverse_event" and fields(err) == {"body.ctcae_grade"}


def test_r1_fires_on_any_fatal_outcome_even_one_recorded_as_not_serious() -> None:
    # such a record could be made before the intake refused it: the rule must not depend on it
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 3, "not_related", serious=False,
                                          outcome="fatal"))
    assert "R1-death" in fired(state)


def test_r1_fires_once_when_a_follow_up_reports_the_death() -> None:
    first = ae("P1", "mtx", 3, "not_related", serious=True, ae_id="AE-1")
    state = given(patient("P1", "mtx"), first)
    state = domain.apply(state, rules.evaluate(CONFIG, state))
    assert "R1-death" not in {f.rule_id for f in state.firings}
    death = follow_up("AE-1", outcome="fatal")
    emitted = rules.evaluate(CONFIG, domain.apply(state, [death]))
    r1 = [e for _, e in emitted if isinstance(e, StoppingRuleTriggered) and e.rule_id == "R1-death"]
    assert len(r1) == 1 and set(r1[0].evidence) == {first.event_id, death.event_id}
    assert rules.evaluate(CONFIG, domain.apply(state, [death, *emitted])) == []


# --- item 10: R4 can be missed for good ---------------------------------------------------------


def infusion(pid: str, at: datetime, arm: str = "msc_low") -> InfusionGiven:
    return InfusionGiven.model_validate({
        "infusion_id": new_id(), "patient_id": pid, "site_id": "S1", "arm": arm, "week": 0,
        "cells_administered": 70_000_000, "cells_per_kg": 1_000_000, "weight_kg": 70.0,
        "lot_number": "L-1", "given_at": at})


def firings(emitted: list[Given], rule_id: str) -> list[StoppingRuleTriggered]:
    return [e for _, e in emitted if isinstance(e, StoppingRuleTriggered) and e.rule_id == rule_id]


def chills(grade: int = 3, infusion_related: bool | None = None) -> domain.ReportAdverseEvent:
    return domain.ReportAdverseEvent("P1", "chills", T0 + timedelta(hours=2), grade, False,
                                     "not_related", True, infusion_related=infusion_related)


def test_r4_fires_when_the_infusion_arrives_after_the_adverse_event() -> None:
    state = given(patient("P1", "msc_low", dosed=False))  # the infusion is not recorded yet
    emitted = domain.decide_report(CONFIG, state, chills(), "AE-1", NOW)
    report = emitted[0]
    assert report.event.infusion_related is False  # type: ignore[attr-defined]
    assert firings(emitted, "R4-infusion-reaction") == []
    state = domain.apply(state, emitted)
    # the infusion, given an hour before the onset, is recorded now
    emitted = domain.decide_fact(CONFIG, state, "SRC-1", infusion("P1", T0 + timedelta(hours=1)))
    (r4,) = firings(emitted, "R4-infusion-reaction")
    fact_id = emitted[0].event_id
    assert set(r4.evidence) == {report.event_id, fact_id}
    assert ("PatientDosingHeld", "R4-infusion-reaction", "P1") in [
        (e.event_type(), getattr(e, "rule_id", ""), getattr(e, "patient_id", "")) for _, e in emitted]
    state = domain.apply(state, emitted)
    assert rules.evaluate(CONFIG, state) == []  # exactly once
    # another infusion in the window, recorded later still, is no new evidence
    later = domain.decide_fact(CONFIG, state, "SRC-2", infusion("P1", T0 + timedelta(hours=1.5)))
    assert firings(later, "R4-infusion-reaction") == []


def test_an_infusion_after_the_onset_or_a_relation_the_reporter_denied_fires_nothing() -> None:
    state = given(patient("P1", "msc_low", dosed=False))
    for relation, given_at in ((None, T0 + timedelta(hours=3)), (None, T0 - timedelta(hours=30)),
                               (False, T0 + timedelta(hours=1))):
        after = domain.apply(state, domain.decide_report(
            CONFIG, state, chills(infusion_related=relation), "AE-1", NOW))
        emitted = domain.decide_fact(CONFIG, after, "SRC-1", infusion("P1", given_at))
        assert firings(emitted, "R4-infusion-reaction") == [], (relation, given_at)


def test_a_follow_up_may_set_infusion_related_and_r4_fires_once() -> None:
    state = given(patient("P1", "msc_low", dosed=False))
    emitted = domain.decide_report(CONFIG, state, chills(infusion_related=False), "AE-1", NOW)
    state = domain.apply(state, emitted)
    change = domain.FollowUp("P1", "AE-1", infusion_related=True)
    emitted = domain.decide_follow_up(CONFIG, state, change, "FU-1", NOW)
    assert emitted[0].event.infusion_related is True  # type: ignore[attr-defined]
    (r4,) = firings(emitted, "R4-infusion-reaction")
    assert emitted[0].event_id in r4.evidence
    state = domain.apply(state, emitted)
    again = domain.decide_follow_up(CONFIG, state, domain.FollowUp("P1", "AE-1", ctcae_grade=4),
                                    "FU-2", NOW)
    assert firings(again, "R4-infusion-reaction") == []


# --- item 14: an adverse event's arm fixed at intake --------------------------------------------


def enrolled_only(pid: str) -> list[Given]:
    """Safety has consumed the enrolment, not yet the assignment."""
    return patient(pid, "mtx", dosed=False)[:1]


def assigned(pid: str, arm: str) -> ArmAssigned:
    return ArmAssigned.model_validate({
        "patient_id": pid, "site_id": "S1", "arm": arm, "randomization_number": 1,
        "stratum": "S1:pasi_lt20", "baseline_weight_kg": 70.0, "assigned_at": T0})


def test_an_adverse_event_reported_before_the_assignment_counts_for_its_arm_once_assigned() -> None:
    others = [patient(f"D{i}", "msc_high") for i in range(9)]  # R6 stays below its bound
    state = given(*others, enrolled_only("P1"))
    cmd = domain.ReportAdverseEvent("P1", "anaphylaxis", T0 + timedelta(hours=2), 4, False,
                                    "definite", True, infusion_related=False)
    emitted = domain.decide_report(CONFIG, state, cmd, "AE-1", NOW)
    report = emitted[0]
    assert report.event.arm is None  # type: ignore[attr-defined]
    assert firings(emitted, "R2-related-grade4") == []
    state = domain.apply(state, emitted)
    emitted = domain.decide_fact(CONFIG, state, "SRC-A", assigned("P1", "msc_high"))
    (r2,) = firings(emitted, "R2-related-grade4")
    assert (r2.target, set(r2.evidence)) == ("msc_high", {report.event_id, emitted[0].event_id})
    assert ("ArmSuspended", "msc_high") in [(e.event_type(), getattr(e, "arm", None))
                                             for _, e in emitted]
    state = domain.apply(state, emitted)
    assert rules.evaluate(CONFIG, state) == []  # once
    bayes = next(r.bayes for r in CONFIG.rules if r.bayes is not None)
    assert rules.arm_toxicity(CONFIG, bayes, state, "msc_high").toxicities == 1


def test_a_lab_result_reported_before_the_assignment_holds_methotrexate_once_assigned() -> None:
    state = given(enrolled_only("P1"))
    emitted = domain.decide_lab(CONFIG, state, "P1", T0, (
        LabResult(analyte="platelets", value=80.0, unit="10^9/L"),), "LAB-1", NOW)
    assert firings(emitted, "R8-mtx-marrow") == []
    state = domain.apply(state, emitted)
    emitted = domain.decide_fact(CONFIG, state, "SRC-A", assigned("P1", "mtx"))
    (r8,) = firings(emitted, "R8-mtx-marrow")
    assert r8.target == "P1"
    state = domain.apply(state, emitted)
    assert rules.evaluate(CONFIG, state) == []


# --- item 11: reporting clocks ------------------------------------------------------------------


def of_type(emitted: list[Given], kind: str) -> list[Any]:
    return [e for _, e in emitted if e.event_type() == kind]


def susar(grade: int, serious: bool = True, outcome: str | None = None
          ) -> domain.ReportAdverseEvent:
    return domain.ReportAdverseEvent("P1", "pneumonitis", T0, grade, serious, "probable", False,
                                     infusion_related=False, outcome=outcome)


def test_a_follow_up_that_makes_a_susar_life_threatening_moves_its_deadline_to_7_days() -> None:
    state = given(patient("P1", "msc_high"))
    emitted = domain.decide_report(CONFIG, state, susar(3), "AE-1", NOW)
    (first,) = of_type(emitted, "SusarReportDue")
    assert (first.days, first.due_at) == (15, NOW + timedelta(days=15))
    state = domain.apply(state, emitted)
    later = NOW + timedelta(days=2)
    emitted = domain.decide_follow_up(CONFIG, state, domain.FollowUp("P1", "AE-1", ctcae_grade=4),
                                      "FU-1", later)
    (moved,) = of_type(emitted, "SusarReportDue")
    assert (moved.days, moved.aware_at, moved.due_at) == (7, later, later + timedelta(days=7))
    assert moved.previous_due_at == first.due_at
    (follow,) = of_type(emitted, "SusarFollowUpReportDue")
    assert follow.due_at == moved.due_at + timedelta(days=8)
    state = domain.apply(state, emitted)
    view = domain.status(CONFIG, state, 57, now=later + timedelta(hours=1))
    dues = {d["days"]: d for d in view["susar_reports_due"]}  # type: ignore[attr-defined]
    assert dues[15]["superseded"] is True and dues[15]["overdue"] is False
    assert dues[7]["superseded"] is False and dues[7]["due_at"] == later + timedelta(days=7)
    # a death reported later moves nothing again: the clock is already 7 days
    death = domain.decide_follow_up(CONFIG, state, domain.FollowUp(
        "P1", "AE-1", ctcae_grade=5, outcome="fatal"), "FU-2", later + timedelta(days=1))
    assert of_type(death, "SusarReportDue") == [] and of_type(death, "SusarFollowUpReportDue") == []


def test_a_7_day_susar_gets_its_8_day_follow_up_report_clock() -> None:
    state = given(patient("P1", "msc_high"))
    emitted = domain.decide_report(CONFIG, state, susar(4), "AE-1", NOW)
    (due,) = of_type(emitted, "SusarReportDue")
    (follow,) = of_type(emitted, "SusarFollowUpReportDue")
    assert (due.days, follow.days) == (7, 8)
    assert (follow.initial_due_at, follow.due_at) == (NOW + timedelta(days=7),
                                                       NOW + timedelta(days=15))
    state = domain.apply(state, emitted)
    assert rules.clocks_due(CONFIG, state) == []  # once


def test_a_serious_adverse_event_gets_a_24_hour_initial_report_clock_flagged_when_overdue() -> None:
    state = given(patient("P1", "msc_low"))
    cmd = domain.ReportAdverseEvent("P1", "fever", T0, 2, False, "not_related", True,
                                    infusion_related=False)
    emitted = domain.decide_report(CONFIG, state, cmd, "AE-1", NOW)
    assert of_type(emitted, "SeriousAdverseEventReportDue") == []  # not serious, no clock
    state = domain.apply(state, emitted)
    hospitalised = NOW + timedelta(hours=5)
    emitted = domain.decide_follow_up(CONFIG, state, domain.FollowUp("P1", "AE-1", serious=True),
                                      "FU-1", hospitalised)
    (clock,) = of_type(emitted, "SeriousAdverseEventReportDue")
    assert (clock.hours, clock.aware_at, clock.due_at) == (
        24, hospitalised, hospitalised + timedelta(hours=24))
    state = domain.apply(state, emitted)
    assert rules.clocks_due(CONFIG, state) == []  # once
    for now, overdue in ((clock.due_at, False), (clock.due_at + timedelta(minutes=1), True)):
        view = domain.status(CONFIG, state, 57, now=now)
        (listed,) = [c for c in view["reporting_clocks"]  # type: ignore[attr-defined]
                     if c["kind"] == "sae_initial_report"]
        assert (listed["adverse_event_id"], listed["due_at"], listed["overdue"]) == (
            "AE-1", clock.due_at, overdue)


# --- item 15: R7 by adverse event matches four exact terms --------------------------------------


@pytest.mark.parametrize("term", [
    "Transaminases increased", "HEPATOTOXICITY", "Hepatic failure", "hepatic necrosis",
    "Blood bilirubin increased", "Alanine Aminotransferase Increased",
    "aspartate aminotransferase increased", "Drug-induced liver injury", "  Hepatic   failure ",
    "Hepatobiliary disorders - Other, specify",
    "Hepatobiliary disorders - Other, specify: methotrexate hepatitis", "ALT increased"])
def test_r7_holds_methotrexate_on_ctcae_liver_terms_and_synonyms_whatever_the_case(
        term: str) -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 2, "possible", term=term))
    assert "R7-mtx-liver" in fired(state)


@pytest.mark.parametrize("term", ["Rash maculo-papular", "Investigations - Other, specify",
                                  "Creatinine increased", "Hepatic failure and more"])
def test_r7_does_not_hold_methotrexate_on_other_terms(term: str) -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 2, "possible", term=term))
    assert "R7-mtx-liver" not in fired(state)


def test_r7_terms_are_protocol_configuration() -> None:
    (r7,) = [r for r in CONFIG.rules if r.id == "R7-mtx-liver"]
    terms = {t.lower() for c in r7.adverse_events for t in c.terms or ()}
    assert {"alanine aminotransferase increased", "aspartate aminotransferase increased",
            "blood bilirubin increased", "hepatic failure", "hepatotoxicity",
            "transaminases increased"} <= terms


# --- item 13: arm rules count by randomized arm --------------------------------------------------

CROSSED = T0 + timedelta(weeks=16)


def crossover(pid: str, to_arm: str = "msc_low", at: datetime = CROSSED) -> ArmCrossedOver:
    return ArmCrossedOver.model_validate({
        "patient_id": pid, "site_id": "S1", "from_arm": "mtx", "to_arm": to_arm,
        "reason": "no response at week 16", "crossed_over_at": at})


def crossed_patient(*others: list[Given]) -> tuple[domain.SafetyState, str]:
    """P1: randomized to methotrexate and dosed, crossed over to msc_low at week 16; nine dosed
    patients in each arm keep R6 below its bound."""
    state = given(patient("P1", "mtx"),
                  *[patient(f"{arm}{i}", arm) for arm in ("mtx", "msc_low") for i in range(9)],
                  *others)
    emitted = domain.decide_fact(CONFIG, state, "SRC-X", crossover("P1"))
    return domain.apply(state, emitted), emitted[0].event_id


def grade_4(onset: datetime) -> domain.ReportAdverseEvent:
    return domain.ReportAdverseEvent("P1", "anaphylaxis", onset, 4, False, "definite", True,
                                     infusion_related=False)


def test_arm_rules_count_an_event_after_a_crossover_for_the_arm_the_patient_crossed_into() -> None:
    state, _ = crossed_patient()
    emitted = domain.decide_report(CONFIG, state, grade_4(CROSSED + timedelta(days=2)), "AE-1",
                                   CROSSED + timedelta(days=3))
    assert [f.target for f in firings(emitted, "R2-related-grade4")] == ["msc_low"]


def test_an_event_before_the_crossover_reported_after_it_counts_for_the_arm_it_happened_in(
        ) -> None:
    state, _ = crossed_patient()
    emitted = domain.decide_report(CONFIG, state, grade_4(CROSSED - timedelta(days=2)), "AE-1",
                                   CROSSED + timedelta(days=3))
    assert emitted[0].event.arm == "mtx"  # type: ignore[attr-defined]
    assert [f.target for f in firings(emitted, "R2-related-grade4")] == ["mtx"]
    state = domain.apply(state, emitted)
    bayes = next(r.bayes for r in CONFIG.rules if r.bayes is not None)
    assert rules.arm_toxicity(CONFIG, bayes, state, "mtx").toxicities == 1
    assert rules.arm_toxicity(CONFIG, bayes, state, "msc_low").toxicities == 0


def test_a_crossover_learnt_of_after_the_event_moves_it_to_the_arm_it_happened_in() -> None:
    state = given(patient("P1", "mtx"),
                  *[patient(f"{arm}{i}", arm) for arm in ("mtx", "msc_low") for i in range(9)])
    emitted = domain.decide_report(CONFIG, state, grade_4(CROSSED + timedelta(days=2)), "AE-1",
                                   CROSSED + timedelta(days=3))
    assert [f.target for f in firings(emitted, "R2-related-grade4")] == ["mtx"]
    state = domain.apply(state, emitted)
    emitted = domain.decide_fact(CONFIG, state, "SRC-X", crossover("P1"))
    (r2,) = firings(emitted, "R2-related-grade4")
    assert r2.target == "msc_low" and emitted[0].event_id in r2.evidence
    state = domain.apply(state, emitted)
    assert rules.evaluate(CONFIG, state) == []  # once


def test_r6_counts_each_patient_as_dosed_in_the_arms_of_the_doses_they_received() -> None:
    state, _ = crossed_patient()
    bayes = next(r.bayes for r in CONFIG.rules if r.bayes is not None)
    # P1 had methotrexate, and no cells yet
    assert rules.arm_toxicity(CONFIG, bayes, state, "mtx").patients_dosed == 10
    assert rules.arm_toxicity(CONFIG, bayes, state, "msc_low").patients_dosed == 9
    infused = domain.decide_fact(CONFIG, state, "SRC-I", infusion("P1", CROSSED + timedelta(days=1)))
    state = domain.apply(state, infused)
    assert rules.arm_toxicity(CONFIG, bayes, state, "msc_low").patients_dosed == 10
    assert rules.arm_toxicity(CONFIG, bayes, state, "mtx").patients_dosed == 10
    view = domain.status(CONFIG, state, 57)
    assert view["arms"]["msc_low"]["patients_dosed"] == 10  # type: ignore[index]


# --- item 16: the DSMB can only lift holds, never impose one ------------------------------------

TRIAL = "NCT03424629"
RATIONALE = "Three grade 3 infections in two weeks: hold pending review."


@pytest.mark.parametrize(("scope", "target", "kind", "lift_scope"), [
    ("patient", "P1", "PatientDosingHeld", "patient"), ("arm", "msc_high", "ArmSuspended", "arm"),
    ("enrollment", TRIAL, "EnrollmentPaused", "trial"), ("trial", TRIAL, "TrialHalted", "trial")])
def test_the_dsmb_imposes_a_hold_on_a_patient_an_arm_enrolment_or_the_trial_lifted_like_any(
        scope: str, target: str, kind: str, lift_scope: str) -> None:
    decider = domain.safety(default_protocol())
    state = given(patient("P1", "msc_low"))
    emitted = decider.decide(state, domain.Impose(scope, target, RATIONALE, "dsmb-1", "DEC-1"))
    (hold,) = [e for _, e in emitted]
    assert hold.event_type() == kind
    assert (hold.rule_id, hold.decision_id, hold.rationale, hold.decided_by) == (  # type: ignore[attr-defined]
        "DSMB", "DEC-1", RATIONALE, "dsmb-1")
    state = domain.apply(state, emitted)
    (held,) = state.holds_on(lift_scope, target)
    assert held.rule_id == "DSMB" and held.decision_id == "DEC-1"
    lifted = decider.decide(state, domain.Lift(lift_scope, target, None, "reviewed: resume",
                                               "dsmb-2"))
    assert [e.hold_id for _, e in lifted] == [hold.hold_id]  # type: ignore[attr-defined]
    assert domain.apply(state, lifted).holds_on(lift_scope, target) == []


def test_a_dsmb_hold_on_a_target_that_does_not_exist_is_refused() -> None:
    decider = domain.safety(default_protocol())
    state = given(patient("P1", "msc_low"))
    for scope, target, code in (("patient", "P-NOBODY", "patient_not_found"),
                                ("arm", "placebo", "hold_target_not_found"),
                                ("trial", "NCT00000000", "hold_target_not_found"),
                                ("enrollment", "S1", "hold_target_not_found")):
        err = refusal(lambda s=scope, t=target: decider.decide(
            state, domain.Impose(s, t, RATIONALE, "dsmb-1", "DEC-1")))
        assert err.code == code and REFUSAL_STATUS[code] == 404


def test_a_clock_starts_with_the_report_that_starts_it_not_in_a_later_unrelated_decision(
        ) -> None:
    # a serious event recorded before clocks existed, then a lab result of another patient
    state = given(patient("P1", "msc_low"), patient("P2", "mtx"),
                  ae("P1", "msc_low", 3, "not_related", serious=True, ae_id="AE-OLD"))
    emitted = domain.decide_lab(CONFIG, state, "P2", T0, (
        LabResult(analyte="WBC", value=6.0, unit="10^9/L"),), "LAB-1", NOW)
    assert of_type(emitted, "SeriousAdverseEventReportDue") == []
    assert [c.event.adverse_event_id for c in rules.clocks_due(CONFIG, state)] == [  # type: ignore[attr-defined]
        "AE-OLD"]  # (all of them, when asked)


@pytest.mark.parametrize(("serious", "outcome", "wrong"), [
    (False, None, {"body.serious"}), (True, "recovered", {"body.outcome"}),
    (False, "recovering", {"body.serious", "body.outcome"})])
def test_a_grade_5_event_is_a_death_serious_and_fatal_or_refused(
        serious: bool, outcome: str | None, wrong: set[str]) -> None:
    state = given(patient("P1", "mtx"))
    cmd = domain.ReportAdverseEvent("P1", "sepsis", T0, 5, serious, "not_related", True,
                                    outcome=outcome)
    err = refusal(lambda: domain.decide_report(CONFIG, state, cmd, "AE-1", NOW))
    assert err.code == "inconsistent_adverse_event" and fields(err) == wrong
    unknown_yet = domain.ReportAdverseEvent("P1", "sepsis", T0, 5, True, "not_related", True)
    assert domain.decide_report(CONFIG, state, unknown_yet, "AE-1", NOW)  # outcome to follow


def test_every_rule_firing_names_the_protocol_version_it_applied() -> None:
    """Defect 18: firings named the rule set's version only, not the protocol version."""
    protocol = default_protocol()
    state = given(patient("P1", "msc_high"))
    cmd = domain.ReportAdverseEvent("P1", "anaphylaxis", T0, 4, True, "definite", True)
    emitted = domain.safety(protocol).decide(state, domain.Report(cmd, "AE-1", NOW))
    firings = [e for _, e in emitted if isinstance(e, StoppingRuleTriggered)]
    assert firings and {f.protocol_version for f in firings} == {protocol.version}
