"""The randomization domain: the patient's life cycle, randomization's refusals, holds, crossover."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from services.randomization.allocation import sequence
from services.randomization.domain import (
    Allocation,
    Holds,
    Patient,
    Screen,
    decide_crossover,
    decide_enrol,
    decide_holds,
    decide_randomize,
    evolve,
    evolve_allocation,
    fold,
    fold_allocation,
    fold_holds,
    screenings,
    stratum_of,
)
from shared.errors import Refused
from shared.events import (
    ARMS,
    AdverseEventReported,
    AllocationSlotUsed,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    PatientDosingHeld,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    RandomizationHoldApplied,
    RandomizationHoldLifted,
    Reason,
    SafetyHoldLifted,
    TrialHalted,
)
from shared.protocol import ProtocolConfig, default_protocol
from shared.web import REFUSAL_STATUS
from tests.unit.test_randomization_eligibility import EXAMPLE

AT = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
SECRET = b"unit-test-secret"
PROTOCOL = default_protocol()

ENROLLED = PatientEnrolled(patient_id="p-1", site_id="S1", screening_id="scr-1",
                           baseline_weight_kg=70.5, baseline_pasi=14.2, enrolled_at=AT)
ASSIGNED = ArmAssigned(patient_id="p-1", site_id="S1", arm="msc_high", randomization_number=1,
                       stratum="S1:pasi_lt20", baseline_weight_kg=70.5, assigned_at=AT)
WITHDRAWN = PatientWithdrawn(patient_id="p-1", site_id="S1", reason="moved away", withdrawn_at=AT)


def screening(eligible: bool = True) -> PatientScreened:
    reasons = () if eligible else (Reason(criterion="INC-AGE", message="age 17 is outside 18 to 60"),)
    return PatientScreened(screening_id="scr-1", site_id="S1", screening_number="S1-0001",
                           eligible=eligible, reasons=reasons, age_years=46, weight_kg=70.5,
                           pasi=14.2, protocol_version="1.0.0", screened_at=AT)


def refusal(call: object) -> tuple[int, str]:
    assert callable(call)
    with pytest.raises(Refused) as caught:
        call()
    return REFUSAL_STATUS[caught.value.code], caught.value.code


def randomized(patient: Patient, allocation: Allocation, holds: Holds, protocol: ProtocolConfig,
               secret: bytes, at: datetime) -> tuple[ArmAssigned, AllocationSlotUsed]:
    """A randomization's two events: the patient's assignment and the slot it used."""
    assigned, used = decide_randomize(patient, allocation, holds, protocol, secret, at)
    assert isinstance(assigned, ArmAssigned) and isinstance(used, AllocationSlotUsed)
    return assigned, used


# --- life cycle -------------------------------------------------------------------------------


def test_fold_enrolled_randomized_withdrawn() -> None:
    assert fold([]) == Patient()
    enrolled = fold([ENROLLED])
    assert (enrolled.status, enrolled.baseline_pasi, enrolled.arm) == ("enrolled", 14.2, None)
    randomized = evolve(enrolled, ASSIGNED)
    assert (randomized.status, randomized.arm, randomized.assignment) == (
        "randomized", "msc_high", ASSIGNED)
    withdrawn = fold([ENROLLED, ASSIGNED, WITHDRAWN])
    assert withdrawn.status == "withdrawn" and withdrawn.assignment == ASSIGNED
    assert enrolled.status == "enrolled"  # states are values


def test_evolve_ignores_events_it_does_not_know() -> None:
    state = fold([ENROLLED])
    other: EventData = screening()
    assert evolve(state, other) is state


def test_decide_enrol() -> None:
    assert decide_enrol(screening(), Patient(), "p-1", AT) == [ENROLLED.model_copy(
        update={"baseline_weight_kg": 70.5})]
    assert refusal(lambda: decide_enrol(screening(False), Patient(), "p-1", AT)) == (
        422, "not_eligible")
    assert refusal(lambda: decide_enrol(screening(), fold([ENROLLED]), "p-1", AT)) == (
        409, "already_enrolled")
    assert refusal(lambda: decide_enrol(None, Patient(), "p-1", AT)) == (
        404, "screening_not_found")


@pytest.mark.parametrize(("pasi", "stratum"), [
    (0.0, "S1:pasi_lt20"), (19.9, "S1:pasi_lt20"), (20.0, "S1:pasi_ge20"), (72.0, "S1:pasi_ge20"),
])
def test_stratum_is_site_by_pasi_band(pasi: float, stratum: str) -> None:
    assert stratum_of(Patient("p-1", "S1", "enrolled", 70.0, pasi), PROTOCOL) == stratum
    assert stratum_of(Patient("p-1", "S2", "enrolled", 70.0, pasi), PROTOCOL) != stratum


# --- randomization ----------------------------------------------------------------------------


def enrolled(n: int, site: str = "S1", pasi: float = 14.2) -> Patient:
    return fold([ENROLLED.model_copy(update={"patient_id": f"p-{n}", "site_id": site,
                                             "baseline_pasi": pasi})])


def test_assignments_follow_the_stratum_sequence_with_gapless_numbers() -> None:
    allocation = Allocation()
    got: dict[str, list[str]] = {"S1:pasi_lt20": [], "S2:pasi_ge20": []}
    for n in range(1, 25):
        site, pasi = ("S1", 12.0) if n % 3 else ("S2", 30.0)
        assigned, used = randomized(enrolled(n, site, pasi), allocation, Holds(), PROTOCOL,
                                          SECRET, AT)
        assert assigned.randomization_number == used.randomization_number == n
        assert (used.arm, used.stratum, used.patient_id) == (
            assigned.arm, assigned.stratum, f"p-{n}")
        got[assigned.stratum].append(assigned.arm)
        assert used.stratum_slot == len(got[assigned.stratum])
        allocation = evolve_allocation(allocation, used)
    for stratum, arms in got.items():
        expected = [s.arm for s in sequence(SECRET, PROTOCOL.randomization, stratum, len(arms))]
        assert arms == expected


def test_the_cap_closes_enrolment() -> None:
    full = Allocation(assigned=PROTOCOL.enrollment_cap)
    assert refusal(lambda: decide_randomize(enrolled(58), full, Holds(), PROTOCOL, SECRET, AT)) == (
        409, "enrollment_closed")
    almost = Allocation(assigned=PROTOCOL.enrollment_cap - 1)
    assigned, _ = randomized(enrolled(57), almost, Holds(), PROTOCOL, SECRET, AT)
    assert assigned.randomization_number == 57


def test_withdrawn_and_unknown_patients_are_refused() -> None:
    gone = fold([ENROLLED, WITHDRAWN])
    assert refusal(lambda: decide_randomize(gone, Allocation(), Holds(), PROTOCOL, SECRET, AT)) == (
        409, "withdrawn")
    assert refusal(lambda: decide_randomize(Patient(), Allocation(), Holds(), PROTOCOL, SECRET,
                                            AT)) == (404, "patient_not_found")


def hold(kind: str, target: str, hold_id: str = "h-1") -> RandomizationHoldApplied:
    scope = "arm" if kind == "arm_suspended" else "trial"
    return RandomizationHoldApplied.model_validate(
        {"hold_id": hold_id, "kind": kind, "scope": scope, "target": target, "rule_id": "R-x"})


@pytest.mark.parametrize(("kind", "code"), [("enrollment_paused", "enrollment_paused"),
                                            ("trial_halted", "trial_halted")])
def test_pauses_and_halts_refuse_until_lifted(kind: str, code: str) -> None:
    held = fold_holds([hold(kind, "NCT03424629")])
    assert refusal(lambda: decide_randomize(enrolled(1), Allocation(), held, PROTOCOL, SECRET,
                                            AT)) == (409, code)
    lifted = fold_holds([hold(kind, "NCT03424629"),
                         RandomizationHoldLifted(hold_id="h-1", scope="trial", target="NCT03424629")])
    assert randomized(enrolled(1), Allocation(), lifted, PROTOCOL, SECRET, AT)[0].arm


def test_a_lift_lifts_exactly_the_hold_it_names() -> None:
    holds = fold_holds([hold("enrollment_paused", "T", "h-1"), hold("enrollment_paused", "T", "h-2"),
                        RandomizationHoldLifted(hold_id="h-1", scope="trial", target="T")])
    assert holds.in_force("enrollment_paused") == hold("enrollment_paused", "T", "h-2")
    early_lift = fold_holds([RandomizationHoldLifted(hold_id="h-3", scope="arm", target="mtx"),
                             hold("arm_suspended", "mtx", "h-3")])
    assert early_lift.in_force("arm_suspended") is None


def randomize_many(count: int, holds: Holds, protocol: ProtocolConfig = PROTOCOL,
                   sites: tuple[str, ...] = ("S1",)) -> list[AllocationSlotUsed]:
    """`count` patients randomized one after the other under `holds`; none may be refused."""
    allocation, used_slots = Allocation(), []
    for n in range(1, count + 1):
        _, used = randomized(enrolled(n, sites[n % len(sites)]), allocation, holds, protocol,
                             SECRET, AT)
        allocation = evolve_allocation(allocation, used)
        used_slots.append(used)
    return used_slots


def test_an_arm_suspension_neither_leaks_the_next_slot_nor_stalls_the_stratum() -> None:
    """Defect 1: a stratum whose next slot fell to a suspended arm answered 409 arm_suspended,
    which told the caller that slot's arm, and stalled the stratum until the arm resumed."""
    stratum = "S1:pasi_lt20"
    own = sequence(SECRET, PROTOCOL.randomization, stratum, 40)
    suspended = fold_holds([hold("arm_suspended", own[0].arm)])  # the arm of the next slot
    open_arms: tuple[Arm, ...] = tuple(a for a in ARMS if a != own[0].arm)
    used = randomize_many(40, suspended)
    # Every patient is randomized among the open arms, from the stratum's sequence over them:
    # drawn from the secret alone, so it says nothing of the stratum's own slots.
    restricted = f"{stratum}|{'+'.join(open_arms)}"
    assert [u.arm for u in used] == [
        s.arm for s in sequence(SECRET, PROTOCOL.randomization, stratum, 40, open_arms)]
    assert {u.sequence for u in used} == {restricted}
    assert [u.stratum_slot for u in used] == list(range(1, 41))
    assert abs(sum(u.arm == open_arms[0] for u in used) - 20) <= 2  # 1:1 in blocks of 2 and 4
    # The stratum's own sequence was not touched: after the lift it goes on at its slot 1.
    lifted = fold_holds([hold("arm_suspended", own[0].arm),
                         RandomizationHoldLifted(hold_id="h-1", scope="arm", target=own[0].arm)])
    allocation = fold_allocation(list(used))
    _, after = randomized(enrolled(41), allocation, lifted, PROTOCOL, SECRET, AT)
    assert (after.arm, after.stratum_slot, after.sequence) == (own[0].arm, 1, None)


def test_randomization_answers_alike_whether_or_not_an_arm_is_suspended() -> None:
    suspended = fold_holds([hold("arm_suspended", "msc_high")])
    free, held = randomized(enrolled(1), Allocation(), Holds(), PROTOCOL, SECRET, AT)[0], \
        randomized(enrolled(1), Allocation(), suspended, PROTOCOL, SECRET, AT)[0]
    assert free.model_dump().keys() == held.model_dump().keys()
    assert held.arm != "msc_high"


def test_every_arm_suspended_refuses_without_naming_a_slot() -> None:
    every = fold_holds([hold("arm_suspended", a, f"h-{a}") for a in ("msc_low", "msc_high", "mtx")])
    assert refusal(lambda: decide_randomize(enrolled(1), Allocation(), every, PROTOCOL, SECRET,
                                            AT)) == (409, "arm_suspended")


def test_minimization_minimizes_over_the_open_arms() -> None:
    protocol = PROTOCOL.model_copy(update={"randomization": PROTOCOL.randomization.model_copy(
        update={"method": "minimization"})})
    used = randomize_many(30, fold_holds([hold("arm_suspended", "msc_high")]), protocol,
                          sites=("S1", "S2"))
    counts = Counter(u.arm for u in used)
    assert set(counts) == {"msc_low", "mtx"} and abs(counts["msc_low"] - counts["mtx"]) <= 3


def test_safety_events_become_randomization_holds() -> None:
    none = Holds()
    paused = RandomizationHoldApplied(hold_id="h", kind="enrollment_paused", scope="trial",
                                      target="T", rule_id="R5")
    assert decide_holds(none, EnrollmentPaused(hold_id="h", trial_id="T", rule_id="R5")) == [
        paused]
    assert decide_holds(none, TrialHalted(hold_id="h", trial_id="T", rule_id="R1")) == [
        RandomizationHoldApplied(hold_id="h", kind="trial_halted", scope="trial", target="T",
                                 rule_id="R1")]
    assert decide_holds(none, ArmSuspended(hold_id="h", arm="mtx", rule_id="R2")) == [
        RandomizationHoldApplied(hold_id="h", kind="arm_suspended", scope="arm", target="mtx",
                                 rule_id="R2")]
    assert decide_holds(none, SafetyHoldLifted(hold_id="h", scope="arm", target="mtx",
                                               rationale="ok", decided_by="d")) == [
        RandomizationHoldLifted(hold_id="h", scope="arm", target="mtx")]
    # The same hold delivered twice is one hold.
    assert decide_holds(fold_holds([paused]),
                        EnrollmentPaused(hold_id="h", trial_id="T", rule_id="R5")) == []
    # A patient's dosing hold does not concern randomization.
    assert decide_holds(none, PatientDosingHeld(hold_id="h", patient_id="p", rule_id="R4")) == []
    assert decide_holds(none, SafetyHoldLifted(hold_id="h", scope="patient", target="p",
                                               rationale="ok", decided_by="d")) == []
    assert decide_holds(none, AdverseEventReported(
        adverse_event_id="a", patient_id="p", site_id="S1", term="fever", onset_at=AT,
        ctcae_grade=1, serious=False, relatedness="not_related", expected=True)) == []


def test_minimization_is_chosen_in_configuration() -> None:
    protocol = PROTOCOL.model_copy(update={"randomization": PROTOCOL.randomization.model_copy(
        update={"method": "minimization"})})
    allocation = Allocation()
    for n in range(1, 31):
        assigned, used = randomized(enrolled(n, "S1" if n % 2 else "S2"), allocation, Holds(),
                                          protocol, SECRET, AT)
        assert used.method == "minimization" and assigned.randomization_number == n
        allocation = evolve_allocation(allocation, used)
    per_site = allocation.counts["site=S1"]
    assert max(per_site.values()) - min(per_site.values()) <= 3
    assert fold_allocation([]) == Allocation()


# --- crossover --------------------------------------------------------------------------------

MTX = fold([ENROLLED, ASSIGNED.model_copy(update={"arm": "mtx"})])


def crossover_protocol(**rules: object) -> ProtocolConfig:
    crossover = PROTOCOL.randomization.crossover.model_copy(update={"enabled": True, **rules})
    return PROTOCOL.model_copy(update={"randomization": PROTOCOL.randomization.model_copy(
        update={"crossover": crossover})})


def test_crossover_is_disabled_unless_configured() -> None:
    later = AT + timedelta(weeks=20)
    assert refusal(lambda: decide_crossover(MTX, "msc_high", "no response", Holds(), PROTOCOL,
                                            later)) == (409, "crossover_disabled")


def test_an_mtx_non_responder_crosses_over_after_week_16() -> None:
    protocol = crossover_protocol()
    at16 = AT + timedelta(weeks=16)
    [event] = decide_crossover(MTX, "msc_high", "no PASI 50 at week 16", Holds(), protocol, at16)
    assert event == ArmCrossedOver(patient_id="p-1", site_id="S1", from_arm="mtx",
                                   to_arm="msc_high", reason="no PASI 50 at week 16",
                                   crossed_over_at=at16)
    crossed = evolve(MTX, event)
    assert crossed.arm == "msc_high" and crossed.assignment is not None
    assert crossed.assignment.arm == "mtx"  # the randomized arm stays on record
    assert refusal(lambda: decide_crossover(crossed, "msc_low", "again", Holds(), protocol,
                                            at16)) == (409, "already_crossed_over")


@pytest.mark.parametrize(("patient", "to_arm", "weeks", "expected"), [
    (MTX, "msc_high", 15.9, (409, "crossover_too_early")),
    (MTX, "mtx", 20, (422, "crossover_not_allowed")),
    (fold([ENROLLED, ASSIGNED]), "msc_low", 20, (422, "crossover_not_allowed")),  # from msc_high
    (fold([ENROLLED]), "msc_high", 20, (409, "not_randomized")),
    (fold([ENROLLED, ASSIGNED.model_copy(update={"arm": "mtx"}), WITHDRAWN]), "msc_high", 20,
     (409, "withdrawn")),
])
def test_crossover_conditions(patient: Patient, to_arm: str, weeks: float,
                              expected: tuple[int, str]) -> None:
    at = AT + timedelta(weeks=weeks)
    assert refusal(lambda: decide_crossover(patient, to_arm, "why", Holds(),  # type: ignore[arg-type]
                                            crossover_protocol(), at)) == expected


def test_no_crossover_into_a_suspended_arm() -> None:
    held = fold_holds([hold("arm_suspended", "msc_high")])
    assert refusal(lambda: decide_crossover(MTX, "msc_high", "why", held, crossover_protocol(),
                                            AT + timedelta(weeks=17))) == (409, "arm_suspended")


# --- screening: the site's own date, and what is kept --------------------------------------

SHANGHAI_7AM = datetime(2026, 11, 29, 23, 0, tzinfo=UTC)  # 30 November, 07:00 at the sites


def screen(at: datetime = SHANGHAI_7AM, site: str = "S1", **facts: object) -> PatientScreened:
    command = Screen("scr-9", replace(EXAMPLE, site_id=site, **facts), at)  # type: ignore[arg-type]
    [screened] = screenings(PROTOCOL).decide(None, command)
    assert isinstance(screened, PatientScreened)
    return screened


def test_a_patient_screened_on_their_18th_birthday_at_7_local_is_18() -> None:
    """Defect 4: ages and screening dates were counted on the server's UTC date (still the
    29th in UTC when it is already the 30th, the birthday, at the site)."""
    screened = screen(birth_date=date(2008, 11, 30))
    assert (screened.age_years, screened.eligible, screened.screened_on) == (
        18, True, date(2026, 11, 30))
    assert screen(birth_date=date(2008, 12, 1)).age_years == 17  # one day short, at the site


def test_a_date_that_is_today_at_the_site_is_not_in_the_future() -> None:
    assert screen(diagnosis_date=date(2026, 5, 30)).eligible  # six months before, at the site
    with pytest.raises(Refused) as refused:
        screen(diagnosis_date=date(2026, 12, 1))
    assert refused.value.code == "validation_error"
    assert refused.value.details["errors"][0]["field"] == "diagnosis_date"


def test_consent_time_screening_date_and_baseline_bsa_and_dlqi_are_kept() -> None:
    """Defect 3: consent was kept as yes/no, and BSA and DLQI were thrown away."""
    signed = datetime(2026, 11, 20, 1, 30, tzinfo=UTC)
    screened = screen(consent_signed_at=signed)
    assert (screened.consent_signed_at, screened.bsa_percent, screened.dlqi) == (signed, 12.0, 11)
    [enrolled_event] = decide_enrol(screened, Patient(), "p-9", SHANGHAI_7AM)
    assert isinstance(enrolled_event, PatientEnrolled)
    assert (enrolled_event.baseline_bsa_percent, enrolled_event.baseline_dlqi) == (12.0, 11)


def test_a_site_the_protocol_does_not_name_cannot_screen() -> None:
    with pytest.raises(Refused) as refused:
        screen(site="S9")
    assert (REFUSAL_STATUS[refused.value.code], refused.value.code) == (422, "unknown_site")
