"""What the safety service knows (patients, adverse events, labs, holds, firings), folded from its events.

A `SafetyState` is a snapshot: the rules read it, and `Projection` caches it and hands it to
concurrent readers, so a state once returned never changes. The fold keeps that and stays
linear (issue 13, target 6): `fold` applies a whole batch to one `Draft`, which copies each
collection of the state it starts from once, on the batch's first event that touches it, then
adds to its private dicts and lists in place, and `freeze`s them into a new state at the end.
`evolve` is `fold` of one event. The former evolve copied every collection it added to on every
event (`labs=(*state.labs, lab)`, `{**state.patients, ...}`): quadratic, 3,000 events/s over
200,000 events and 299 over a million (docs/benchmarks.md). Folding bench.scale's patients
(25 events each) on a draft: ~250,000 events a CPU second at 200,000 and at 1,000,000 events
alike, 3.5x the former even over 10,000. Persistent structures (no copy at all) would also
make a small fold cheap on a big state, where a draft still copies what it touches once (about
10 ms for the labs of a million-event state, as the former evolve did per event); none is a
dependency here, and the draft is plain dicts and tuples the rules already read.

The fold builds each patient's file field by field rather than by `dataclasses.replace`, which
took most of its time; and a lab's results are kept as `LabValue` tuples, which the garbage
collector stops visiting (collecting was a third of a million-event load)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

from shared.decider import Identified
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
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

    @cached_property
    def spells_by_start(self) -> tuple[ArmSpell, ...]:
        """The spells by their start, those starting together in the order safety learnt of
        them (a stable sort); worked out once per file, which never changes."""
        return tuple(sorted(self.arm_spells, key=lambda s: s.since))

    def spell_at(self, at: datetime) -> ArmSpell | None:
        """The arm in force at `at`: the latest assignment or crossover since at or before it
        (the first assignment for a time before every one); None before any is known."""
        ordered = self.spells_by_start
        if not ordered:
            return None
        in_force = ordered[0]
        for spell in ordered:
            if spell.since > at:
                break
            in_force = spell
        return in_force


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


class LabValue(NamedTuple):
    """One result of a lab report, as the rules read it (`LabResult`'s fields): a tuple of plain
    values, which the garbage collector stops visiting, where a pydantic `LabResult` and its set
    of fields set are two objects it visits on every full collection (a fifth of a big state's)."""

    analyte: str
    value: float
    unit: str
    uln: float | None


@dataclass(frozen=True)
class LabFile:
    event_id: str
    lab_result_id: str
    patient_id: str
    arm: str | None
    results: tuple[LabValue, ...]
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


class Draft:
    """One fold's private, mutable copies of a state's collections, frozen into a new state.

    Each collection is copied from the base state the first time the fold touches it (a
    `cached_property`: later uses are a plain attribute), so a fold of any length copies each
    collection at most once; `freeze` hands the copies to a new `SafetyState` and starts again
    from that state, so nothing it returned is ever written again."""

    def __init__(self, base: SafetyState) -> None:
        self.base = base

    @cached_property
    def patients(self) -> dict[str, PatientFile]:
        return dict(self.base.patients)

    @cached_property
    def adverse_events(self) -> dict[str, AdverseEventFile]:
        return dict(self.base.adverse_events)

    @cached_property
    def labs(self) -> list[LabFile]:
        return list(self.base.labs)

    @cached_property
    def active_holds(self) -> dict[str, Hold]:
        return dict(self.base.active_holds)

    @cached_property
    def firings(self) -> list[Firing]:
        return list(self.base.firings)

    @cached_property
    def firing_keys(self) -> set[str]:
        return set(self.base.firing_keys)

    @cached_property
    def susars(self) -> list[SusarReportDue]:
        return list(self.base.susars)

    @cached_property
    def sae_reports(self) -> list[SeriousAdverseEventReportDue]:
        return list(self.base.sae_reports)

    @cached_property
    def susar_follow_ups(self) -> list[SusarFollowUpReportDue]:
        return list(self.base.susar_follow_ups)

    def apply(self, events: Iterable[Identified[EventData]]) -> None:
        for event_id, event in events:
            _apply(self, event_id, event)

    def freeze(self) -> SafetyState:
        """The state folded so far (the base itself if nothing was touched)."""
        copies = {name: value for name, value in vars(self).items() if name != "base"}
        if not copies:
            return self.base
        for name in copies:
            delattr(self, name)  # the next use copies again, from the frozen state
        frozen = {name: _FROZEN[type(value)](value) for name, value in copies.items()}
        self.base = replace(self.base, **frozen)
        return self.base


# How a draft's copy becomes the state's: a dict is handed over (no one else holds it).
_FROZEN: dict[type, Callable[[Any], Any]] = {
    dict: lambda d: d, list: tuple, set: frozenset}


def _fact(d: Draft, event_id: str, e: PatientSafetyFactRecorded) -> None:
    # Built field by field, not by `dataclasses.replace` (which took most of a fold's time).
    p = d.patients.get(e.patient_id) or PatientFile(e.patient_id, e.site_id)
    arm, status, spells, dosed_arms = p.arm, p.status, p.arm_spells, p.dosed_arms
    infusions, infusion_facts, mtx_doses = p.infusions, p.infusion_facts, p.mtx_doses
    if e.fact in ("assigned", "crossed_over"):
        arm, status = e.arm, "withdrawn" if status == "withdrawn" else "randomized"
        if e.arm is not None:
            spells = (*spells, ArmSpell(e.arm, e.at, event_id))
    elif e.fact == "withdrawn":
        status = "withdrawn"
    elif e.fact in ("infusion", "methotrexate"):
        dosed_arm = e.arm or arm
        if dosed_arm is not None:
            dosed_arms = dosed_arms | {dosed_arm}
        arm = arm or e.arm
        if e.fact == "infusion":
            in_order = not infusions or infusions[-1] <= e.at  # as they mostly come
            infusions = (*infusions, e.at) if in_order else tuple(sorted((*infusions, e.at)))
            infusion_facts = (*infusion_facts, (e.at, event_id))
        else:
            mtx_doses += 1
    d.patients[e.patient_id] = PatientFile(
        patient_id=p.patient_id, site_id=p.site_id, arm=arm, status=status, infusions=infusions,
        mtx_doses=mtx_doses, infusion_facts=infusion_facts, arm_spells=spells,
        dosed_arms=dosed_arms)


def _reported(d: Draft, event_id: str, e: AdverseEventReported) -> None:
    view = AdverseEventView(event_id, e.ctcae_grade, e.serious, e.relatedness, e.expected,
                            bool(e.infusion_related), e.outcome,
                            e.reported_at or e.onset_at,
                            infusion_related_by_reporter=e.infusion_related_source != "derived")
    d.adverse_events[e.adverse_event_id] = AdverseEventFile(
        e.adverse_event_id, e.patient_id, e.site_id, e.arm, e.term, e.onset_at, (view,))


def _followed_up(d: Draft, event_id: str, e: AdverseEventFollowedUp) -> None:
    ae = d.adverse_events.get(e.adverse_event_id)
    if ae is None:
        return
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
    d.adverse_events[e.adverse_event_id] = AdverseEventFile(
        ae.adverse_event_id, ae.patient_id, ae.site_id, ae.arm, ae.term, ae.onset_at,
        (*ae.views, view))


def _apply(d: Draft, event_id: str, event: EventData) -> None:
    """One event of the safety service's store into the draft (with its id: the rules cite
    their evidence by event id)."""
    match event:
        case PatientSafetyFactRecorded():
            _fact(d, event_id, event)
        case AdverseEventReported():
            _reported(d, event_id, event)
        case AdverseEventFollowedUp():
            _followed_up(d, event_id, event)
        case LabResultReported():
            results = tuple(LabValue(r.analyte, r.value, r.unit, r.uln) for r in event.results)
            d.labs.append(LabFile(event_id, event.lab_result_id, event.patient_id, event.arm,
                                  results, event.reported_at, event.collected_at))
        case StoppingRuleTriggered():
            d.firings.append(Firing(event_id, event.rule_id, event.rule_set_version,
                                    event.scope, event.target, event.evidence,
                                    event.triggered_at))
            d.firing_keys.add(firing_key(event.rule_id, event.evidence))
        case PatientDosingHeld() | ArmSuspended() | EnrollmentPaused() | TrialHalted():
            product = event.product if isinstance(event, PatientDosingHeld) else "any"
            d.active_holds[event.hold_id] = Hold(event.hold_id, event.event_type(), event.scope,
                                                 event.target, event.rule_id, product,
                                                 event.decision_id)
        case SafetyHoldLifted():
            d.active_holds.pop(event.hold_id, None)
        case SusarReportDue():
            d.susars.append(event)
        case SeriousAdverseEventReportDue():
            d.sae_reports.append(event)
        case SusarFollowUpReportDue():
            d.susar_follow_ups.append(event)


def fold(trial_id: str, events: Iterable[Identified[EventData]],
         state: SafetyState | None = None) -> SafetyState:
    """The state after `events`, from `state` (else the trial's empty state)."""
    draft = Draft(state if state is not None else SafetyState(trial_id))
    draft.apply(events)
    return draft.freeze()


def evolve(state: SafetyState, identified: Identified[EventData]) -> SafetyState:
    """The next state after one event (`fold` of one: its collections copied, as before)."""
    return fold(state.trial_id, (identified,), state)
