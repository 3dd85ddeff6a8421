"""The safety fold (services/safety/state.py): folding a batch on one draft gives exactly the state
of evolving event by event (and of the former fold, which copied every collection on every
event: `reference_evolve` below), however the batch is cut; and a state once returned, by `fold`,
`evolve` or `Projection.load`, never changes when later events are folded after it."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import reduce
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.safety.projection import Projection
from services.safety.state import (
    AdverseEventFile,
    AdverseEventView,
    ArmSpell,
    Draft,
    Firing,
    Hold,
    LabFile,
    LabValue,
    PatientFile,
    SafetyState,
    evolve,
    firing_key,
    fold,
)
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
from shared.store import EventFilter, RawEvent
from tests.unit.test_events import SAMPLES

TRIAL = "NCT03424629"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
Given = Identified[EventData]


# --- the former evolve, which copied every collection on every event: the reference ---------
# (As it was but for the lab results, which the state now keeps as `LabValue`s.)


def reference_evolve(state: SafetyState, identified: Given) -> SafetyState:
    event_id, e = identified
    match e:
        case PatientSafetyFactRecorded():
            p = state.patients.get(e.patient_id) or PatientFile(e.patient_id, e.site_id)
            if e.fact in ("assigned", "crossed_over"):
                p = replace(p, arm=e.arm,
                            status="withdrawn" if p.status == "withdrawn" else "randomized")
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
        case AdverseEventReported():
            view = AdverseEventView(event_id, e.ctcae_grade, e.serious, e.relatedness, e.expected,
                                    bool(e.infusion_related), e.outcome, e.reported_at or e.onset_at,
                                    infusion_related_by_reporter=e.infusion_related_source
                                    != "derived")
            ae = AdverseEventFile(e.adverse_event_id, e.patient_id, e.site_id, e.arm, e.term,
                                  e.onset_at, (view,))
            return replace(state, adverse_events={**state.adverse_events, e.adverse_event_id: ae})
        case AdverseEventFollowedUp():
            found = state.adverse_events.get(e.adverse_event_id)
            if found is None:
                return state
            last = found.current
            view = AdverseEventView(
                event_id, e.ctcae_grade if e.ctcae_grade is not None else last.grade,
                e.serious if e.serious is not None else last.serious,
                e.relatedness if e.relatedness is not None else last.relatedness,
                e.expected if e.expected is not None else last.expected,
                e.infusion_related if e.infusion_related is not None else last.infusion_related,
                e.outcome if e.outcome is not None else last.outcome, e.reported_at,
                infusion_related_by_reporter=(e.infusion_related is not None
                                              or last.infusion_related_by_reporter))
            ae = replace(found, views=(*found.views, view))
            return replace(state, adverse_events={**state.adverse_events, e.adverse_event_id: ae})
        case LabResultReported():
            results = tuple(LabValue(**r.model_dump()) for r in e.results)  # was the models
            lab = LabFile(event_id, e.lab_result_id, e.patient_id, e.arm, results,
                          e.reported_at, e.collected_at)
            return replace(state, labs=(*state.labs, lab))
        case StoppingRuleTriggered():
            firing = Firing(event_id, e.rule_id, e.rule_set_version, e.scope, e.target,
                            e.evidence, e.triggered_at)
            return replace(state, firings=(*state.firings, firing),
                           firing_keys=state.firing_keys | {firing_key(e.rule_id, e.evidence)})
        case PatientDosingHeld() | ArmSuspended() | EnrollmentPaused() | TrialHalted():
            product = e.product if isinstance(e, PatientDosingHeld) else "any"
            hold = Hold(e.hold_id, e.event_type(), e.scope, e.target, e.rule_id, product,
                        e.decision_id)
            return replace(state, active_holds={**state.active_holds, hold.hold_id: hold})
        case SafetyHoldLifted():
            return replace(state, active_holds={k: v for k, v in state.active_holds.items()
                                                if k != e.hold_id})
        case SusarReportDue():
            return replace(state, susars=(*state.susars, e))
        case SeriousAdverseEventReportDue():
            return replace(state, sae_reports=(*state.sae_reports, e))
        case SusarFollowUpReportDue():
            return replace(state, susar_follow_ups=(*state.susar_follow_ups, e))
    return state


# --- events over a few patients, adverse events and holds, so they meet ----------------------

PATIENTS = ("P1", "P2")
ARMS = ("msc_low", "msc_high", "mtx")
ids = st.uuids().map(str)
at = st.integers(0, 400).map(lambda h: T0 + timedelta(hours=h))  # out of order, repeated
arm_or_none = st.none() | st.sampled_from(ARMS)
ae_ids = st.sampled_from(("A1", "A2", "A3", "A4"))
hold_ids = st.sampled_from(("H1", "H2", "H3"))
maybe = st.none() | st.booleans()


def model(cls: type[EventData], **data: Any) -> EventData:
    return cls.model_validate(data)


facts = st.builds(
    lambda pid, fact, arm, when, source: model(
        PatientSafetyFactRecorded, patient_id=pid, site_id="S1", fact=fact, arm=arm, at=when,
        source_event_id=source),
    st.sampled_from(PATIENTS),
    st.sampled_from(("enrolled", "assigned", "withdrawn", "crossed_over", "infusion",
                     "methotrexate")),
    arm_or_none, at, ids)
reports = st.builds(
    lambda ae_id, pid, arm, grade, serious, related, expected, infusion, when, reported, source:
    model(AdverseEventReported, adverse_event_id=ae_id, patient_id=pid, site_id="S1", arm=arm,
          term="rash", onset_at=when, ctcae_grade=grade, serious=serious, relatedness=related,
          expected=expected, infusion_related=infusion, reported_at=reported,
          infusion_related_source=source),
    ae_ids, st.sampled_from(PATIENTS), arm_or_none, st.integers(1, 5), st.booleans(),
    st.sampled_from(("not_related", "unlikely", "possible", "probable", "definite")),
    st.booleans(), maybe, at, st.none() | at, st.sampled_from((None, "reporter", "derived")))
follow_ups = st.builds(
    lambda ae_id, pid, grade, serious, expected, infusion, outcome, when, fu: model(
        AdverseEventFollowedUp, follow_up_id=fu, adverse_event_id=ae_id, patient_id=pid,
        site_id="S1", ctcae_grade=grade, serious=serious, expected=expected,
        infusion_related=infusion, outcome=outcome, reported_at=when),
    ae_ids, st.sampled_from(PATIENTS), st.none() | st.integers(1, 5), maybe, maybe, maybe,
    st.sampled_from((None, "recovering", "fatal")), at, ids)
labs = st.builds(
    lambda pid, arm, value, when, lab_id: model(
        LabResultReported, lab_result_id=lab_id, patient_id=pid, site_id="S1", arm=arm,
        collected_at=when, reported_at=when,
        results=[{"analyte": "ALT", "value": value, "unit": "U/L", "uln": 40.0}]),
    st.sampled_from(PATIENTS), arm_or_none, st.floats(1, 400), at, ids)
firings = st.builds(
    lambda rule, evidence, when: model(
        StoppingRuleTriggered, rule_id=rule, rule_set_version="1", scope="patient",
        target="P1", evidence=evidence, triggered_at=when),
    st.sampled_from(("R1", "R2")), st.lists(st.sampled_from(("e1", "e2", "e3")), max_size=3),
    st.none() | at)
holds = st.builds(
    lambda kind, hold_id, decision: {
        "patient": lambda: model(PatientDosingHeld, hold_id=hold_id, rule_id="R1",
                                 patient_id="P1", product="infusion", decision_id=decision),
        "arm": lambda: model(ArmSuspended, hold_id=hold_id, rule_id="R2", arm="mtx",
                             decision_id=decision),
        "enrolment": lambda: model(EnrollmentPaused, hold_id=hold_id, rule_id="R3",
                                   trial_id=TRIAL),
        "trial": lambda: model(TrialHalted, hold_id=hold_id, rule_id="R4", trial_id=TRIAL),
    }[kind](),
    st.sampled_from(("patient", "arm", "enrolment", "trial")), hold_ids, st.none() | ids)
lifts = st.builds(
    lambda hold_id: model(SafetyHoldLifted, hold_id=hold_id, scope="arm", target="mtx",
                          rationale="reviewed", decided_by="dsmb-1"),
    hold_ids)
clocks = st.builds(
    lambda kind, ae_id, when: {
        "susar": lambda: model(SusarReportDue, adverse_event_id=ae_id, patient_id="P1",
                               rule_id="R5", days=7, aware_at=when,
                               due_at=when + timedelta(days=7)),
        "sae": lambda: model(SeriousAdverseEventReportDue, adverse_event_id=ae_id,
                             patient_id="P1", hours=24, aware_at=when,
                             due_at=when + timedelta(days=1)),
        "follow-up": lambda: model(SusarFollowUpReportDue, adverse_event_id=ae_id,
                                   patient_id="P1", rule_id="R5", days=8, initial_due_at=when,
                                   due_at=when + timedelta(days=8)),
    }[kind](),
    st.sampled_from(("susar", "sae", "follow-up")), ae_ids, at)
not_safety = st.just(SAMPLES["AccessDenied"][0])  # in a safety store; nothing to its fold
events = st.lists(
    st.tuples(ids, st.one_of(facts, facts, facts, facts, reports, follow_ups, follow_ups, labs, firings,
                             holds, lifts, clocks, not_safety)).map(lambda p: Identified(*p)),
    max_size=60)
cuts = st.lists(st.integers(0, 60), max_size=6)


def chunks(items: Sequence[Given], at_: list[int]) -> list[list[Given]]:
    bounds = [0, *sorted(min(c, len(items)) for c in at_), len(items)]
    return [list(items[a:b]) for a, b in pairwise(bounds)]


# --- fold = evolve one by one = the former fold ----------------------------------------------


@given(events)
@settings(max_examples=300, deadline=None)
def test_folding_a_batch_gives_the_state_of_evolving_event_by_event(history: list[Given]) -> None:
    one_by_one = reduce(evolve, history, SafetyState(TRIAL))
    assert fold(TRIAL, history) == one_by_one
    assert fold(TRIAL, history) == reduce(reference_evolve, history, SafetyState(TRIAL))


@given(events, cuts)
@settings(max_examples=300, deadline=None)
def test_a_fold_cut_anywhere_gives_the_same_state(history: list[Given], at_: list[int]) -> None:
    """As `Projection.load` folds page after page, and load after load on the last state."""
    whole = fold(TRIAL, history)
    state = SafetyState(TRIAL)
    for part in chunks(history, at_):
        state = fold(TRIAL, part, state)
    assert state == whole
    draft = Draft(SafetyState(TRIAL))
    for part in chunks(history, at_):
        draft.apply(part)
        draft.freeze()  # frozen midway, the draft goes on from what it handed over
    assert draft.freeze() == whole


# --- a returned state never changes -----------------------------------------------------------


@given(events, cuts)
@settings(max_examples=300, deadline=None)
def test_a_state_once_returned_is_not_changed_by_later_folds(history: list[Given],
                                                             at_: list[int]) -> None:
    returned: list[tuple[SafetyState, SafetyState]] = []  # (the state, a deep copy then)
    state = SafetyState(TRIAL)
    draft = Draft(state)
    for part in chunks(history, at_):
        for e in part:  # a decision's evolve on the last state...
            returned.append((evolve(state, e), copy.deepcopy(evolve(state, e))))
        state = fold(TRIAL, part, state)  # ...a load's fold on it...
        returned.append((state, copy.deepcopy(state)))
        draft.apply(part)  # ...and a draft frozen again and again
        frozen = draft.freeze()
        returned.append((frozen, copy.deepcopy(frozen)))
        fold(TRIAL, history, frozen)  # a fold that is thrown away
    for kept, then in returned:
        assert kept == then


def fact(kind: str, arm: str | None, hours: int, pid: str = "P1") -> Given:
    return Identified(f"{kind}-{hours}", model(
        PatientSafetyFactRecorded, patient_id=pid, site_id="S1", fact=kind, arm=arm,
        at=T0 + timedelta(hours=hours), source_event_id=f"s-{hours}"))


def test_a_patients_facts_as_the_former_fold_read_them() -> None:
    history = [fact("assigned", "msc_low", 0), fact("infusion", "msc_high", 5),
               fact("infusion", None, 2), fact("crossed_over", "mtx", 6),
               fact("methotrexate", None, 7), fact("withdrawn", None, 8),
               fact("assigned", "mtx", 9), fact("infusion", "msc_low", 1, pid="P2")]
    state = fold(TRIAL, history)
    assert state == reduce(reference_evolve, history, SafetyState(TRIAL))
    p1, p2 = state.patients["P1"], state.patients["P2"]
    assert p1.infusions == (T0 + timedelta(hours=2), T0 + timedelta(hours=5))  # sorted
    assert [when for when, _ in p1.infusion_facts] == [T0 + timedelta(hours=5),
                                                       T0 + timedelta(hours=2)]  # as learnt
    assert p1.dosed_arms == {"msc_high", "msc_low", "mtx"}  # the dose's arm, else the patient's
    assert (p1.arm, p1.status, p1.mtx_doses) == ("mtx", "withdrawn", 1)
    assert (p2.arm, p2.status, p2.dosed_arms) == ("msc_low", "enrolled", {"msc_low"})


def test_a_fold_copies_only_what_it_touches_and_returns_the_state_itself_if_nothing() -> None:
    state = fold(TRIAL, [Identified("e1", model(
        PatientSafetyFactRecorded, patient_id="P1", site_id="S1", fact="enrolled", at=T0,
        source_event_id="s1"))])
    assert fold(TRIAL, [], state) is state
    lab = Identified("e2", model(
        LabResultReported, lab_result_id="L1", patient_id="P1", site_id="S1", collected_at=T0,
        reported_at=T0, results=[{"analyte": "ALT", "value": 1.0, "unit": "U/L", "uln": 40.0}]))
    after = evolve(state, lab)
    assert after.patients is state.patients and len(after.labs) == 1 and state.labs == ()
    assert isinstance(after.labs, tuple) and isinstance(after.firing_keys, frozenset)


# --- Projection.load: pages of a scan, isolation, concurrent loads ----------------------------


class FakeReader:
    """A store's `scan` over a list of events (position = index + 1), `page` rows a page, giving
    way to other tasks between pages as a database read would."""

    def __init__(self, page: int = 3) -> None:
        self.rows: list[RawEvent] = []
        self.page = page
        self.closed = 0

    def add(self, more: Sequence[Given]) -> None:
        for event_id, e in more:
            n = len(self.rows) + 1
            self.rows.append(RawEvent(n, "s", n, event_id, e.event_type(), 1, e.model_dump_json(),
                                      "{}", T0, "", ""))

    async def scan(self, after: int = 0, where: EventFilter = EventFilter(),
                   page: int = 5000) -> AsyncIterator[list[RawEvent]]:
        try:
            rows = [r for r in self.rows if r.position > after
                    and (where.types is None or r.type in where.types)]
            for i in range(0, len(rows), self.page):
                await asyncio.sleep(0)
                yield rows[i:i + self.page]
        finally:
            self.closed += 1


@given(events, cuts)
@settings(max_examples=100, deadline=None)
def test_loads_stream_pages_and_never_change_a_state_they_returned(history: list[Given],
                                                                   at_: list[int]) -> None:
    async def run() -> None:
        reader, projection = FakeReader(), Projection(TRIAL)
        returned: list[tuple[SafetyState, SafetyState]] = []
        for part in chunks(history, at_):
            reader.add(part)
            state = await projection.load(reader)
            returned.append((state, copy.deepcopy(state)))
        assert (await projection.load(reader)) == fold(TRIAL, history)
        for kept, then in returned:
            assert kept == then

    asyncio.run(run())


def test_concurrent_loads_each_return_their_own_fold_and_the_furthest_is_kept() -> None:
    async def run() -> None:
        history = [Identified(f"e{i}", model(
            LabResultReported, lab_result_id=f"L{i}", patient_id="P1", site_id="S1",
            collected_at=T0, reported_at=T0,
            results=[{"analyte": "ALT", "value": float(i), "unit": "U/L", "uln": 40.0}]))
            for i in range(10)]
        reader, projection = FakeReader(page=2), Projection(TRIAL)
        reader.add(history[:4])
        first = await projection.load(reader)
        reader.add(history[4:8])
        a, b = await asyncio.gather(projection.load(reader), projection.load(reader))
        assert a == b == fold(TRIAL, history[:8]) and a is not b  # each on its own copies
        assert len(first.labs) == 4 and projection.position == 8 and projection.state in (a, b)
        # A slow load (a page a row) to 9 and a quick one to 10: the quick one ends first,
        # and the slow one, ending after it, does not take the cache back to 9.
        slow, quick = FakeReader(page=1), FakeReader(page=10)
        slow.add(history[:9])
        quick.add(history)
        fresh = Projection(TRIAL)
        behind, ahead = await asyncio.gather(fresh.load(slow), fresh.load(quick))
        assert behind == fold(TRIAL, history[:9]) and ahead == fold(TRIAL, history)
        assert fresh.position == 10 and fresh.state is ahead

    asyncio.run(run())


def test_a_load_that_fails_to_parse_closes_its_scan_and_keeps_the_cached_state() -> None:
    async def run() -> None:
        reader, projection = FakeReader(page=1), Projection(TRIAL)
        reader.add([Identified("e1", model(
            PatientSafetyFactRecorded, patient_id="P1", site_id="S1", fact="enrolled", at=T0,
            source_event_id="s1"))])
        before = await projection.load(reader)
        reader.rows.append(RawEvent(2, "s", 2, "e2", "LabResultReported", 1, '{"bad": 1}', "{}",
                                    T0, "", ""))
        reader.rows.append(reader.rows[0]._replace(position=3))
        closed = reader.closed
        try:
            await projection.load(reader)
        except ValueError:
            pass
        else:
            raise AssertionError("a row that does not parse must fail the load")
        assert reader.closed == closed + 1
        assert projection.state is before and projection.position == 1

    asyncio.run(run())
