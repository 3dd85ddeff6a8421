"""Stopping rules R1-R8 as given events / then events, each at its boundary, and the R6 table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from services.safety import domain, rules
from services.safety.state import SafetyState, fold
from shared.decider import Identified
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    EventData,
    LabResult,
    LabResultReported,
    PatientSafetyFactRecorded,
    SafetyHoldLifted,
    SusarReportDue,
)
from shared.protocol import default_protocol

CONFIG = default_protocol().safety
TRIAL = "NCT03424629"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
Given = Identified[EventData]


def new_id() -> str:
    return str(uuid.uuid4())


def patient(pid: str, arm: str, dosed: bool = True, site: str = "S1") -> list[Given]:
    events: list[Given] = [
        Identified(new_id(), PatientSafetyFactRecorded(
            patient_id=pid, site_id=site, fact="enrolled", at=T0, source_event_id=new_id())),
        Identified(new_id(), PatientSafetyFactRecorded.model_validate(
            {"patient_id": pid, "site_id": site, "fact": "assigned", "arm": arm, "at": T0,
             "source_event_id": new_id()}))]
    if dosed:
        kind = "methotrexate" if arm == "mtx" else "infusion"
        events.append(Identified(new_id(), PatientSafetyFactRecorded.model_validate(
            {"patient_id": pid, "site_id": site, "fact": kind, "arm": arm, "at": T0,
             "source_event_id": new_id()})))
    return events


def ae(pid: str, arm: str | None, grade: int, relatedness: str = "possible", serious: bool = False,
       expected: bool = True, infusion_related: bool = False, outcome: str | None = None,
       term: str = "rash", ae_id: str | None = None) -> Given:
    return Identified(new_id(), AdverseEventReported.model_validate({
        "adverse_event_id": ae_id or new_id(), "patient_id": pid, "site_id": "S1", "arm": arm,
        "term": term, "onset_at": T0, "ctcae_grade": grade, "serious": serious,
        "relatedness": relatedness, "expected": expected, "infusion_related": infusion_related,
        "reported_at": T0 + timedelta(hours=1), "outcome": outcome}))


def lab(pid: str, arm: str, **values: Any) -> Given:
    units = {"ALT": "U/L", "AST": "U/L"}
    results = tuple(LabResult(analyte=k, value=v[0] if isinstance(v, tuple) else v,
                              unit=units.get(k, "10^9/L"),
                              uln=v[1] if isinstance(v, tuple) else None)
                    for k, v in values.items())
    return Identified(new_id(), LabResultReported.model_validate({
        "lab_result_id": new_id(), "patient_id": pid, "site_id": "S1", "arm": arm,
        "collected_at": T0, "results": results, "reported_at": T0}))


def given(*groups: list[Given] | Given) -> SafetyState:
    flat: list[Given] = []
    for g in groups:
        flat.extend(g if isinstance(g, list) else [g])
    return fold(TRIAL, flat)


def then(state: SafetyState) -> list[tuple[str, str, str]]:
    """(event type, rule id, target) of everything the rules emit on this state."""
    out = []
    for _, e in rules.evaluate(CONFIG, state):
        data = e.model_dump()
        target = data.get("target") or data.get("arm") or data.get("trial_id") or data["patient_id"]
        out.append((e.event_type(), data["rule_id"], target))
    return out


def fired(state: SafetyState) -> set[str]:
    return {rule for kind, rule, _ in then(state) if kind == "StoppingRuleTriggered"}


# --- R1 --------------------------------------------------------------------------------------


def test_r1_a_grade_5_event_halts_the_trial() -> None:
    state = given(patient("P1", "msc_low"), ae("P1", "msc_low", 5, relatedness="not_related"))
    assert ("StoppingRuleTriggered", "R1-death", TRIAL) in then(state)
    assert ("TrialHalted", "R1-death", TRIAL) in then(state)


def test_r1_a_death_reported_as_serious_halts_even_below_grade_5() -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 4, relatedness="not_related",
                                          serious=True, outcome="fatal"))
    assert "R1-death" in fired(state)


def test_r1_grade_4_without_death_does_not_halt() -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 4, relatedness="not_related",
                                          serious=True, outcome="recovering"))
    assert "R1-death" not in fired(state)


# --- R2 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grade", "relatedness", "fires"), [
    (4, "possible", True), (4, "definite", True), (5, "probable", True),
    (4, "unlikely", False), (4, "not_related", False), (3, "definite", False)])
def test_r2_related_grade_4_suspends_the_arm(grade: int, relatedness: str, fires: bool) -> None:
    state = given(patient("P1", "msc_high"), ae("P1", "msc_high", grade, relatedness))
    assert (("ArmSuspended", "R2-related-grade4", "msc_high") in then(state)) is fires


def test_r2_a_follow_up_raising_the_grade_fires_once_and_a_later_one_does_not_fire_again() -> None:
    first = ae("P1", "msc_high", 3, "possible", ae_id="AE-1")
    up: Given = Identified(new_id(), AdverseEventFollowedUp(
        follow_up_id="F1", adverse_event_id="AE-1", patient_id="P1", site_id="S1", ctcae_grade=4,
        reported_at=T0 + timedelta(days=1)))
    state = given(patient("P1", "msc_high"), first, up)
    emitted = rules.evaluate(CONFIG, state)
    r2 = [e for _, e in emitted if getattr(e, "rule_id", "") == "R2-related-grade4"
          and e.event_type() == "StoppingRuleTriggered"]
    assert len(r2) == 1 and set(r2[0].evidence) == {first[0], up[0]}  # type: ignore[attr-defined]
    state = domain.apply(state, emitted)
    resolved: Given = Identified(new_id(), AdverseEventFollowedUp(
        follow_up_id="F2", adverse_event_id="AE-1", patient_id="P1", site_id="S1",
        outcome="recovered", reported_at=T0 + timedelta(days=9)))
    assert then(domain.apply(state, [resolved])) == []


# --- R3 --------------------------------------------------------------------------------------


def test_r3_two_related_grade_3_in_distinct_patients_of_one_arm() -> None:
    state = given(patient("P1", "msc_low"), patient("P2", "msc_low"),
                  ae("P1", "msc_low", 3), ae("P2", "msc_low", 3))
    assert ("ArmSuspended", "R3-related-grade3-cluster", "msc_low") in then(state)


def test_r3_one_patient_twice_or_two_arms_is_no_cluster() -> None:
    same_patient = given(patient("P1", "msc_low"), ae("P1", "msc_low", 3), ae("P1", "msc_low", 3))
    assert "R3-related-grade3-cluster" not in fired(same_patient)
    two_arms = given(patient("P1", "msc_low"), patient("P2", "mtx"),
                     ae("P1", "msc_low", 3), ae("P2", "mtx", 3))
    assert "R3-related-grade3-cluster" not in fired(two_arms)
    unrelated = given(patient("P1", "msc_low"), patient("P2", "msc_low"),
                      ae("P1", "msc_low", 3), ae("P2", "msc_low", 3, "unlikely"))
    assert "R3-related-grade3-cluster" not in fired(unrelated)
    grade_2 = given(patient("P1", "msc_low"), patient("P2", "msc_low"),
                    ae("P1", "msc_low", 3), ae("P2", "msc_low", 2))
    assert "R3-related-grade3-cluster" not in fired(grade_2)


# --- R4 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grade", "infusion_related", "fires"), [
    (3, True, True), (2, True, False), (3, False, False), (4, True, True)])
def test_r4_infusion_reaction_holds_the_patients_infusions(grade: int, infusion_related: bool,
                                                           fires: bool) -> None:
    state = given(patient("P1", "msc_low"),
                  ae("P1", "msc_low", grade, "not_related", infusion_related=infusion_related))
    assert (("PatientDosingHeld", "R4-infusion-reaction", "P1") in then(state)) is fires
    held = [e for _, e in rules.evaluate(CONFIG, state)
            if e.event_type() == "PatientDosingHeld"]
    assert all(e.product == "infusion" for e in held)  # type: ignore[attr-defined]


def test_infusion_related_is_derived_from_the_last_infusion_within_24_hours() -> None:
    state = given(patient("P1", "msc_low"))  # infused at T0
    for hours, expected in ((0, True), (23.9, True), (24, True), (24.1, False), (-1, False)):
        cmd = domain.ReportAdverseEvent("P1", "chills", T0 + timedelta(hours=hours), 1, False,
                                        "possible", True)
        emitted = domain.decide_report(CONFIG, state, cmd, "AE-X", T0 + timedelta(days=3))
        assert emitted[0][1].infusion_related is expected, hours  # type: ignore[attr-defined]


# --- R5 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grade", "outcome", "days"), [(3, None, 15), (4, None, 7),
                                                         (2, "fatal", 7), (1, None, 15)])
def test_r5_a_susar_pauses_enrolment_and_is_due_in_7_or_15_days(grade: int, outcome: str | None,
                                                                days: int) -> None:
    state = given(patient("P1", "msc_high"),
                  ae("P1", "msc_high", grade, "probable", serious=True, expected=False,
                     outcome=outcome))
    emitted = rules.evaluate(CONFIG, state)
    assert ("EnrollmentPaused", "R5-susar", TRIAL) in then(state)
    due = [e for _, e in emitted if isinstance(e, SusarReportDue)]
    assert len(due) == 1 and due[0].days == days
    assert due[0].due_at == T0 + timedelta(hours=1) + timedelta(days=days)


@pytest.mark.parametrize("change", [{"serious": False}, {"expected": True},
                                    {"relatedness": "unlikely"}])
def test_r5_not_a_susar_when_one_condition_is_missing(change: dict[str, Any]) -> None:
    args: dict[str, Any] = {"serious": True, "expected": False, "relatedness": "possible", **change}
    state = given(patient("P1", "msc_high"), ae("P1", "msc_high", 2, **args))
    assert "R5-susar" not in fired(state)


# --- R6 --------------------------------------------------------------------------------------

# safety-rules.md: with 1 toxicity it stops when n <= 3, 2 when n <= 6, 3 when n <= 10,
# 4 when n <= 14, 5 when n <= 19.
STOPS_WITH = {1: 3, 2: 6, 3: 10, 4: 14, 5: 19}


def fewest_toxicities_that_stop(n: int) -> int:
    return min(k for k, max_n in STOPS_WITH.items() if n <= max_n)


@pytest.mark.parametrize("n", range(1, 20))
def test_r6_the_table_of_safety_rules_md_for_n(n: int) -> None:
    bound = fewest_toxicities_that_stop(n)
    for k in range(n + 1):
        p = rules.posterior_above(k, n, Fraction(1, 5))
        assert (p > Fraction(4, 5)) is (k >= bound), (n, k, float(p))


def test_r6_posterior_values_are_exact() -> None:
    assert rules.posterior_above(1, 3, Fraction(1, 5)) == Fraction(8192, 10000)
    assert rules.posterior_above(1, 4, Fraction(1, 5)) == Fraction(73728, 100000)
    assert rules.posterior_above(0, 0, Fraction(1, 5)) == Fraction(4, 5)  # the prior itself


@pytest.mark.parametrize(("dosed", "toxic", "fires"), [(3, 1, True), (4, 1, False),
                                                       (6, 2, True), (7, 2, False),
                                                       (19, 5, True), (19, 4, False)])
def test_r6_fires_on_the_arm_at_its_boundary(dosed: int, toxic: int, fires: bool) -> None:
    groups: list[list[Given] | Given] = [patient(f"P{i}", "mtx") for i in range(dosed)]
    # grade 3 in distinct patients also trips R3; the assertion is about R6 alone
    groups += [ae(f"P{i}", "mtx", 3, "probable") for i in range(toxic)]
    groups += [patient("U1", "mtx", dosed=False)]  # randomized, not dosed: not in n
    state = given(*groups)
    assert (("ArmSuspended", "R6-bayes-toxicity", "mtx") in then(state)) is fires


# --- R7, R8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "fires"), [
    ({"ALT": (121.0, 40.0)}, True), ({"ALT": (120.0, 40.0)}, False),
    ({"AST": (100.1, 33.333)}, True), ({"AST": (99.0, 33.0)}, False)])
def test_r7_liver_enzymes_above_3_uln_hold_methotrexate(values: dict[str, Any], fires: bool) -> None:
    state = given(patient("P1", "mtx"), lab("P1", "mtx", **values))
    assert (("PatientDosingHeld", "R7-mtx-liver", "P1") in then(state)) is fires


@pytest.mark.parametrize("uln", [33.3, 43.3, 19.1, 40.0, 0.7])
def test_r7_exactly_3_uln_is_not_above_it_and_the_next_step_is(uln: float) -> None:
    """Strictly above 3 x ULN, in the decimals the site sent: 99.9 against a ULN of 33.3 is
    3 x ULN exactly, though 3 * 33.3 is 99.89999999999999 in binary floating point."""
    exactly = float(Decimal(repr(uln)) * 3)
    above = float(Decimal(repr(exactly)) + Decimal("0.1"))
    assert not rules.above_times(exactly, 3.0, uln) and rules.above_times(above, 3.0, uln)
    for value, fires in ((exactly, False), (above, True)):
        state = given(patient("P1", "mtx"), lab("P1", "mtx", ALT=(value, uln)))
        assert (("PatientDosingHeld", "R7-mtx-liver", "P1") in then(state)) is fires, value
    assert not rules.above_times(float("nan"), 3.0, uln)


def test_r7_an_alt_increased_event_counts_and_other_arms_do_not() -> None:
    state = given(patient("P1", "mtx"), ae("P1", "mtx", 2, "possible", term="ALT increased"))
    assert "R7-mtx-liver" in fired(state)
    state = given(patient("P2", "msc_low"), lab("P2", "msc_low", ALT=(500.0, 40.0)))
    assert "R7-mtx-liver" not in fired(state)


@pytest.mark.parametrize(("values", "fires"), [
    ({"WBC": 2.99}, True), ({"WBC": 3.0}, False), ({"neutrophils": 0.99}, True),
    ({"neutrophils": 1.0}, False), ({"platelets": 99.0}, True), ({"platelets": 100.0}, False)])
def test_r8_marrow_suppression_holds_methotrexate(values: dict[str, Any], fires: bool) -> None:
    state = given(patient("P1", "mtx"), lab("P1", "mtx", **values))
    assert (("PatientDosingHeld", "R8-mtx-marrow", "P1") in then(state)) is fires
    held = [e for _, e in rules.evaluate(CONFIG, state) if e.event_type() == "PatientDosingHeld"]
    assert all(e.product == "methotrexate" for e in held)  # type: ignore[attr-defined]


# --- idempotency and holds -------------------------------------------------------------------


def test_the_same_evidence_never_fires_twice_and_ids_are_deterministic() -> None:
    state = given(patient("P1", "msc_high"), ae("P1", "msc_high", 4, "definite"))
    first = rules.evaluate(CONFIG, state)
    again = rules.evaluate(CONFIG, state)
    assert [i for i, _ in first] == [i for i, _ in again]  # a recomputation is the same event
    # ...at the same time: the newest evidence's report time, not the evaluation's clock
    assert first[0][1].triggered_at == T0 + timedelta(hours=1)  # type: ignore[attr-defined]
    after = domain.apply(state, first)
    assert rules.evaluate(CONFIG, after) == []
    holds = [e.hold_id for _, e in first if hasattr(e, "hold_id")]
    assert len(holds) == len(set(holds)) >= 1


def test_after_a_lift_the_old_evidence_stays_quiet_and_new_evidence_holds_again() -> None:
    # ten patients dosed, so one or two toxicities stay below R6's bound and only R2 acts
    state = given(*[patient(f"P{i}", "msc_high") for i in range(1, 11)])
    state = domain.apply(state, [ae("P1", "msc_high", 4)])
    state = domain.apply(state, rules.evaluate(CONFIG, state))
    (hold,) = state.holds_on("arm", "msc_high")
    lifted = domain.decide_lift(state, "arm", "msc_high", None, "reviewed, resume", "dsmb-1")
    assert [e.hold_id for _, e in lifted] == [hold.hold_id]  # type: ignore[attr-defined]
    state = domain.apply(state, lifted)
    assert state.holds_on("arm", "msc_high") == [] and rules.evaluate(CONFIG, state) == []
    state = domain.apply(state, [ae("P1", "msc_high", 4)])
    emitted = rules.evaluate(CONFIG, state)
    state = domain.apply(state, emitted)
    (new_hold,) = state.holds_on("arm", "msc_high")
    assert new_hold.hold_id != hold.hold_id


def test_a_lift_names_exactly_its_hold_and_refuses_when_none_is_in_force() -> None:
    from shared.errors import Refused
    from shared.web import REFUSAL_STATUS

    state = given(patient("P1", "msc_low"), patient("P2", "msc_low"),
                  ae("P1", "msc_low", 4), ae("P2", "msc_low", 4))
    state = domain.apply(state, rules.evaluate(CONFIG, state))
    holds = state.holds_on("arm", "msc_low")
    assert sorted(h.rule_id for h in holds) == [  # R2 for each event, the cluster, the posterior
        "R2-related-grade4", "R2-related-grade4", "R3-related-grade3-cluster", "R6-bayes-toxicity"]
    one = domain.decide_lift(state, "arm", "msc_low", holds[0].hold_id, "rationale text", "d")
    assert len(one) == 1 and isinstance(one[0][1], SafetyHoldLifted)
    assert one[0][1].hold_id == holds[0].hold_id
    with pytest.raises(Refused) as err:
        domain.decide_lift(state, "arm", "mtx", None, "rationale text", "d")
    assert REFUSAL_STATUS[err.value.code] == 409 and err.value.code == "no_active_hold"
    with pytest.raises(Refused) as err:
        domain.decide_lift(state, "arm", "msc_low", "nope", "rationale text", "d")
    assert REFUSAL_STATUS[err.value.code] == 404
