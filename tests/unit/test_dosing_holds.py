"""Safety events become dosing holds; a DSMB lift resumes exactly the hold it names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.dosing import holds as holding
from shared.consumer import Unapplied
from shared.events import (
    ArmSuspended,
    CloudEvent,
    DosingHeld,
    DosingResumed,
    EventData,
    PatientDosingHeld,
    SafetyHoldLifted,
    SafetyRecordResolved,
    SafetyRecordUnapplied,
    TrialHalted,
)


def lifted(hold_id: str, scope: str = "patient", target: str = "P1") -> SafetyHoldLifted:
    return SafetyHoldLifted.model_validate({
        "hold_id": hold_id, "scope": scope, "target": target, "rationale": "reviewed",
        "decided_by": "dsmb-chair"})


def run(*safety: holding.SafetyEvent) -> tuple[holding.Holds, list[EventData]]:
    state, published = holding.Holds(), []
    for event in safety:
        new = holding.decide(state, event)
        published += new
        state = holding.fold([*published])
    return state, published


def test_each_safety_hold_becomes_a_dosing_hold_in_its_scope() -> None:
    state, published = run(
        PatientDosingHeld(hold_id="H1", patient_id="P1", rule_id="R7-mtx-liver",
                          product="methotrexate"),
        ArmSuspended(hold_id="H2", arm="msc_high", rule_id="R2-related-grade4"),
        TrialHalted(hold_id="H3", trial_id="NCT03424629", rule_id="R1-death"))
    assert published == [
        DosingHeld(scope="patient", target="P1", rule_id="R7-mtx-liver", hold_id="H1",
                   product="methotrexate"),
        DosingHeld(scope="arm", target="msc_high", rule_id="R2-related-grade4", hold_id="H2"),
        DosingHeld(scope="trial", target="NCT03424629", rule_id="R1-death", hold_id="H3"),
    ]
    assert set(state.active) == {"H1", "H2", "H3"}


def test_a_lift_resumes_exactly_the_hold_it_names() -> None:
    state, published = run(
        PatientDosingHeld(hold_id="H1", patient_id="P1", rule_id="R4-infusion-reaction"),
        PatientDosingHeld(hold_id="H2", patient_id="P1", rule_id="R7-mtx-liver",
                          product="methotrexate"),
        lifted("H1"))
    assert published[-1] == DosingResumed(scope="patient", target="P1",
                                          rule_id="R4-infusion-reaction", hold_id="H1")
    assert set(state.active) == {"H2"}
    assert holding.blocking(state, "P1", "mtx", "methotrexate") is not None
    assert holding.blocking(state, "P1", "msc_low", "infusion") is None


def test_unknown_lifts_and_repeated_holds_change_nothing() -> None:
    state, published = run(lifted("H9"))
    assert published == [] and state.active == {}
    hold = PatientDosingHeld(hold_id="H1", patient_id="P1", rule_id="R4-infusion-reaction")
    state, published = run(hold, hold, lifted("H1"), hold, lifted("H1"))
    # Held once, resumed once: a lifted hold id never comes back, a second lift finds nothing.
    assert [e.event_type() for e in published] == ["DosingHeld", "DosingResumed"]
    assert state.active == {}


def unapplied(record_id: str, scope: str = "patient", target: str = "P1") -> SafetyRecordUnapplied:
    return SafetyRecordUnapplied.model_validate({
        "record_id": record_id, "scope": scope, "target": target, "error": "handler failed",
        "detected_at": datetime(2026, 12, 4, tzinfo=UTC)})


def test_a_new_hold_keeps_every_safety_record_dosing_could_not_apply() -> None:
    """Fail closed (D32): a record dosing could not apply stops what it may concern until an
    operator resolves it, whatever holds come and go meanwhile, for anyone."""
    state = holding.fold([
        unapplied("trial.safety:0:7", target="P1"),
        unapplied("trial.safety:0:9", scope="trial", target="*"),
        DosingHeld(scope="patient", target="P2", rule_id="R4-infusion-reaction", hold_id="H1"),
        DosingHeld(scope="arm", target="msc_high", rule_id="R2-related-grade4", hold_id="H2"),
        DosingResumed(scope="patient", target="P2", rule_id="R4-infusion-reaction",
                      hold_id="H1"),
    ])
    assert set(state.unapplied) == {"trial.safety:0:7", "trial.safety:0:9"}
    assert set(state.active) == {"H2"} and state.seen == {"H1", "H2"}
    assert holding.unapplied_over(state, "P1", "msc_low") is not None
    resolved = holding.evolve(state, SafetyRecordResolved.model_validate({
        "record_id": "trial.safety:0:9", "scope": "trial", "target": "*",
        "resolved_by": "ops-1", "reason": "applied by hand",
        "resolved_at": datetime(2026, 12, 5, tzinfo=UTC)}))
    assert set(resolved.unapplied) == {"trial.safety:0:7"} and resolved.active == state.active


def _record(type_: str, data: dict[str, object]) -> Unapplied:
    cloud = CloudEvent(id="e-1", source="/services/safety", type=type_, subject="x",
                       time=datetime(2026, 12, 4, tzinfo=UTC), data=data, sequence=1)
    return Unapplied("trial.safety", 0, 7, None, cloud.to_bytes(), "ValidationError")


HOLD = {"hold_id": "H1", "rule_id": "R1-death"}


@pytest.mark.parametrize(("record", "scope", "target"), [
    # A newer safety service's field must not narrow a halt, or an arm's suspension, to one
    # patient: the type says whom a hold stops.
    (_record("TrialHalted", {**HOLD, "trial_id": "NCT03424629", "patient_id": "P1"}),
     "trial", "NCT03424629"),
    (_record("ArmSuspended", {**HOLD, "arm": "msc_low", "patient_id": "P1"}), "arm", "msc_low"),
    # An arm that is not the trial's (unreadable as one): everyone.
    (_record("ArmSuspended", {**HOLD, "arm": "msc_mid"}), "trial", "*"),
    (_record("SafetyHoldLifted", {"hold_id": "H1", "scope": "arm", "target": "msc_mid"}),
     "trial", "*"),
    (_record("PatientDosingHeld", {**HOLD, "product": "radiation"}), "trial", "*"),
    (_record("PatientDosingHeld", {**HOLD, "patient_id": "P1", "product": "radiation"}),
     "patient", "P1"),
    (_record("SomethingNew", {"note": "no one named"}), "trial", "*"),
    (Unapplied("trial.safety", 0, 7, None, b"{not json", "JSONDecodeError"), "trial", "*"),
], ids=["halt naming a patient", "suspension naming a patient", "unknown arm", "lift of an "
        "unknown arm", "patient hold naming no one", "patient hold", "unknown type", "not JSON"])
def test_an_unapplied_record_stops_at_least_whom_its_type_stops(
        record: Unapplied, scope: str, target: str) -> None:
    """D32, fail closed: whom a record dosing could not apply concerns, as far as it can be
    read; when unsure, everyone. A halt stops every patient, not just one its data names."""
    names = record.names()
    assert (names["scope"], names["target"]) == (scope, target)
    state = holding.fold([SafetyRecordUnapplied.model_validate({
        "record_id": record.record_id, **names, "error": record.error,
        "detected_at": datetime(2026, 12, 4, tzinfo=UTC)})])
    stopped = {p for p, arm in (("P1", "msc_low"), ("P2", "msc_low"), ("P3", "mtx"))
               if holding.unapplied_over(state, p, arm) is not None}
    assert stopped == {"trial": {"P1", "P2", "P3"}, "arm": {"P1", "P2"},
                       "patient": {"P1"}}[scope]
