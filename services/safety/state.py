"""What the safety service knows (patients, adverse events, labs, holds, firings), folded from its events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from shared import decider
from shared.decider import Identified
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    LabResult,
    LabResultReported,
    PatientDosingHeld,
    PatientSafetyFactRecorded,
    SafetyHoldLifted,
    SeriousAdverseEventReportDue,
    StoppingRuleTriggered,
    SusarFollowUpReportDue,
    SusarReportDue,
    TrialHalted,
)


@dataclass(frozen=True)
class ArmSpell:
    """From `since` the patient is on `arm`: an assignment or a crossover, by its fact's id."""

    arm: str
    since: datetime
    fact_id: str


@dataclass(frozen=True)
class PatientFile:
    """What safety knows of one patient, from enrolment and dosing events."""

    patient_id: str
    site_id: str
    arm: str | None = None
    status: str = "enrolled"  # enrolled, randomized, withdrawn
    infusions: tuple[datetime, ...] = ()
    mtx_doses: int = 0
    # Each infusion as its fact (time given, the fact's event id), in the order safety learnt
    # of them: evidence for an infusion relation derived after the adverse event.
    infusion_facts: tuple[tuple[datetime, str], ...] = ()
    arm_spells: tuple[ArmSpell, ...] = ()  # in the order safety learnt of them
    dosed_arms: frozenset[str] = frozenset()  # the arms of the doses received

    @property
    def dosed(self) -> bool:
        return bool(self.infusions) or self.mtx_doses > 0

    def arm_at(self, at: datetime) -> str | None:
        """The arm the patient was on at `at` (else the one known now)."""
        spell = self.spell_at(at)
        return spell.arm if spell is not None else self.arm

    def spell_at(self, at: datetime) -> ArmSpell | None:
        """The arm in force at `at`: the latest assignment or crossover since at or before it
        (the first assignment for a time before every one); None before any is known."""
        if not self.arm_spells:
            return None
        ordered = [s for _, s in sorted(enumerate(self.arm_spells),
                                        key=lambda i_s: (i_s[1].since, i_s[0]))]
        in_force = [s for s in ordered if s.since <= at]
        return in_force[-1] if in_force else ordered[0]


@dataclass(frozen=True)
class AdverseEventView:
    """An adverse event as known after one of its reports (the first, or a follow-up)."""

    event_id: str
    grade: int
    serious: bool
    relatedness: str
    expected: bool
    infusion_related: bool
    outcome: str | None
    reported_at: datetime
    # Whether a reporter said `infusion_related` (then it stands), or the service derived it
    # from the infusions it knew of (then a later infusion can make it true).
    infusion_related_by_reporter: bool = True


@dataclass(frozen=True)
class AdverseEventFile:
    adverse_event_id: str
    patient_id: str
    site_id: str
    arm: str | None
    term: str
    onset_at: datetime
    views: tuple[AdverseEventView, ...]  # one per report, oldest first; nothing overwritten

    @property
    def current(self) -> AdverseEventView:
        return self.views[-1]


@dataclass(frozen=True)
class LabFile:
    event_id: str
    lab_result_id: str
    patient_id: str
    arm: str | None
    results: tuple[LabResult, ...]
    reported_at: datetime
    collected_at: datetime


@dataclass(frozen=True)
class Hold:
    hold_id: str
    kind: str  # the event type that put it on
    scope: str
    target: str
    rule_id: str
    product: str = "any"
    decision_id: str | None = None  # a DSMB-imposed hold's decision


@dataclass(frozen=True)
class Firing:
    event_id: str
    rule_id: str
    rule_set_version: str
    scope: str
    target: str
    evidence: tuple[str, ...]
    at: datetime | None


def firing_key(rule_id: str, evidence: tuple[str, ...] | list[str]) -> str:
    """The same rule on the same evidence is the same firing, wherever and whenever evaluated."""
    return rule_id + "|" + ",".join(sorted(evidence))


@dataclass(frozen=True)
class SafetyState:
    trial_id: str
    patients: dict[str, PatientFile] = field(default_factory=dict)
    adverse_events: dict[str, AdverseEventFile] = field(default_factory=dict)
    labs: tuple[LabFile, ...] = ()
    active_holds: dict[str, Hold] = field(default_factory=dict)
    firings: tuple[Firing, ...] = ()
    firing_keys: frozenset[str] = frozenset()
    susars: tuple[SusarReportDue, ...] = ()
    sae_reports: tuple[SeriousAdverseEventReportDue, ...] = ()
    susar_follow_ups: tuple[SusarFollowUpReportDue, ...] = ()

    def holds_on(self, scope: str, target: str) -> list[Hold]:
        return [h for h in self.active_holds.values() if h.scope == scope and h.target == target]


def _fact(state: SafetyState, event_id: str, e: PatientSafetyFactRecorded) -> SafetyState:
    p = state.patients.get(e.patient_id) or PatientFile(e.patient_id, e.site_id)
    if e.fact in ("assigned", "crossed_over"):
        p = replace(p, arm=e.arm, status="withdrawn" if p.status == "withdrawn" else "randomized")
        if e.arm is not None:
            p = replace(p, arm_spells=(*p.arm_spells, ArmSpell(e.arm, e.at, event_id)))
    elif e.fact == "withdrawn":
        p = replace(p, status="withdrawn")
    elif e.fact == "infusion":
        p = replace(p, arm=p.arm or e.arm, infusions=tuple(sorted((*p.infusions, e.at))),
                    infusion_facts=(*p.infusion_facts, (e.at, event_id)))
    elif e.fact == "methotrexate":
        p = replace(p, arm=p.arm or e.arm, mtx_doses=p.mtx_doses + 1)
    dosed_arm = e.arm or p.arm
    if e.fact in ("infusion", "methotrexate") and dosed_arm is not None:
        p = replace(p, dosed_arms=p.dosed_arms | {dosed_arm})
    return replace(state, patients={**state.patients, e.patient_id: p})


def _reported(state: SafetyState, event_id: str, e: AdverseEventReported) -> SafetyState:
    view = AdverseEventView(event_id, e.ctcae_grade, e.serious, e.relatedness, e.expected,
                            bool(e.infusion_related), e.outcome,
                            e.reported_at or e.onset_at,
                            infusion_related_by_reporter=e.infusion_related_source != "derived")
    ae = AdverseEventFile(e.adverse_event_id, e.patient_id, e.site_id, e.arm, e.term, e.onset_at,
                          (view,))
    return replace(state, adverse_events={**state.adverse_events, e.adverse_event_id: ae})


def _followed_up(state: SafetyState, event_id: str, e: AdverseEventFollowedUp) -> SafetyState:
    ae = state.adverse_events.get(e.adverse_event_id)
    if ae is None:
        return state
    last = ae.current
    view = AdverseEventView(
        event_id,
        e.ctcae_grade if e.ctcae_grade is not None else last.grade,
        e.serious if e.serious is not None else last.serious,
        e.relatedness if e.relatedness is not None else last.relatedness,
        e.expected if e.expected is not None else last.expected,
        e.infusion_related if e.infusion_related is not None else last.infusion_related,
        e.outcome if e.outcome is not None else last.outcome,
        e.reported_at,
        infusion_related_by_reporter=(e.infusion_related is not None
                                      or last.infusion_related_by_reporter))
    ae = replace(ae, views=(*ae.views, view))
    return replace(state, adverse_events={**state.adverse_events, e.adverse_event_id: ae})


def _hold(state: SafetyState, hold: Hold) -> SafetyState:
    return replace(state, active_holds={**state.active_holds, hold.hold_id: hold})


def evolve(state: SafetyState, identified: Identified[EventData]) -> SafetyState:
    """The next state after one event of the safety service's store (with its id: the rules
    cite their evidence by event id)."""
    event_id, event = identified
    match event:
        case PatientSafetyFactRecorded():
            return _fact(state, event_id, event)
        case AdverseEventReported():
            return _reported(state, event_id, event)
        case AdverseEventFollowedUp():
            return _followed_up(state, event_id, event)
        case LabResultReported():
            lab = LabFile(event_id, event.lab_result_id, event.patient_id, event.arm,
                          event.results, event.reported_at, event.collected_at)
            return replace(state, labs=(*state.labs, lab))
        case StoppingRuleTriggered():
            firing = Firing(event_id, event.rule_id, event.rule_set_version, event.scope,
                            event.target, event.evidence, event.triggered_at)
            return replace(state, firings=(*state.firings, firing),
                           firing_keys=state.firing_keys | {firing_key(event.rule_id,
                                                                        event.evidence)})
        case PatientDosingHeld() | ArmSuspended() | EnrollmentPaused() | TrialHalted():
            product = event.product if isinstance(event, PatientDosingHeld) else "any"
            return _hold(state, Hold(event.hold_id, event.event_type(), event.scope, event.target,
                                     event.rule_id, product, event.decision_id))
        case SafetyHoldLifted():
            holds = {k: v for k, v in state.active_holds.items() if k != event.hold_id}
            return replace(state, active_holds=holds)
        case SusarReportDue():
            return replace(state, susars=(*state.susars, event))
        case SeriousAdverseEventReportDue():
            return replace(state, sae_reports=(*state.sae_reports, event))
        case SusarFollowUpReportDue():
            return replace(state, susar_follow_ups=(*state.susar_follow_ups, event))
    return state


def fold(trial_id: str, events: Iterable[Identified[EventData]],
         state: SafetyState | None = None) -> SafetyState:
    return decider.fold(evolve, state or SafetyState(trial_id), events)
