"""Properties of the rule engine: the exact posterior against numeric integration, and firing once."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.safety import domain, rules
from services.safety.state import SafetyState
from shared.decider import Identified
from shared.events import (
    ARMS,
    AdverseEventFollowedUp,
    AdverseEventReported,
    EventData,
    PatientSafetyFactRecorded,
)
from tests.unit.test_safety_rules import CONFIG, T0, ae, lab, patient
from tests.unit.test_safety_rules import given as given_events


def beta_tail(k: int, n: int, x: float, steps: int = 4000) -> float:
    """P(p > x) for p ~ Beta(1 + k, 1 + n - k), by Simpson's rule on the density."""
    a, b = 1 + k, 1 + n - k

    def density(p: float) -> float:
        return p ** (a - 1) * (1 - p) ** (b - 1)

    def simpson(lo: float, hi: float) -> float:
        h = (hi - lo) / steps
        inner = sum((4 if i % 2 else 2) * density(lo + i * h) for i in range(1, steps))
        return (density(lo) + density(hi) + inner) * h / 3

    return simpson(x, 1.0) / simpson(0.0, 1.0)


@given(st.integers(0, 30).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
@settings(max_examples=60, deadline=None)
def test_the_exact_posterior_matches_numeric_integration(kn: tuple[int, int]) -> None:
    k, n = kn
    exact = rules.posterior_above(k, n, Fraction(1, 5))
    assert 0 <= exact <= 1
    assert abs(float(exact) - beta_tail(k, n, 0.2)) < 1e-6


@given(st.integers(0, 25), st.integers(1, 25))
def test_the_posterior_grows_with_toxicities_and_falls_with_patients(k: int, extra: int) -> None:
    n = k + extra
    p = rules.posterior_above(k, n, Fraction(1, 5))
    assert rules.posterior_above(k + 1, n + 1, Fraction(1, 5)) > p  # one more toxic patient
    assert rules.posterior_above(k, n + 1, Fraction(1, 5)) < p      # one more patient, no toxicity


report = st.tuples(st.integers(0, 5), st.sampled_from(["msc_low", "msc_high", "mtx"]),
                   st.integers(1, 5),
                   st.sampled_from(["not_related", "unlikely", "possible", "probable", "definite"]),
                   st.booleans(), st.booleans(), st.booleans())


@given(st.lists(report, max_size=12), st.lists(st.floats(0.1, 400), max_size=3))
@settings(max_examples=80, deadline=None)
def test_evaluating_after_every_event_fires_each_evidence_once_and_reaches_a_fixpoint(
        reports: list[tuple[int, str, int, str, bool, bool, bool]], alts: list[float]) -> None:
    arms = {i: arm for i, arm, *_ in reports}
    state = given_events(*[patient(f"P{i}", arm) for i, arm in arms.items()],
                         patient("M", "mtx"))
    keys: list[str] = []
    for i, _, grade, relatedness, serious, expected, infusion in reports:
        state = domain.apply(state, [ae(f"P{i}", arms[i], grade, relatedness, serious=serious,
                                        expected=expected, infusion_related=infusion)])
        emitted = rules.evaluate(CONFIG, state)
        state = domain.apply(state, emitted)
        keys += [f"{e.rule_id}|{','.join(e.evidence)}" for _, e in emitted  # type: ignore[attr-defined]
                 if e.event_type() == "StoppingRuleTriggered"]
        assert rules.evaluate(CONFIG, state) == []  # nothing left to fire on this evidence
    for value in alts:
        state = domain.apply(state, [lab("M", "mtx", ALT=(value, 40.0))])
        state = domain.apply(state, rules.evaluate(CONFIG, state))
    assert len(keys) == len(set(keys))
    holds = [h.hold_id for h in state.active_holds.values()]
    assert len(holds) == len(set(holds)) == len(state.firings)
    assert len([h for h in state.active_holds.values() if h.rule_id == "R7-mtx-liver"]) == \
        sum(v > 120 for v in alts)


# One step of a trial's safety history: a fact that changes a patient's file (an assignment, a
# crossover, an infusion at some hour), an adverse event, a follow-up of one, or a lab result.
step = st.one_of(
    st.tuples(st.just("fact"), st.integers(0, 3), st.sampled_from(["assigned", "crossed_over",
                                                                   "infusion", "methotrexate"]),
              st.sampled_from(["msc_low", "msc_high", "mtx"]), st.integers(-48, 72)),
    st.tuples(st.just("ae"), st.integers(0, 3), st.integers(1, 5),
              st.sampled_from(["unlikely", "possible", "definite"]), st.booleans(),
              st.integers(-24, 48)),
    st.tuples(st.just("follow_up"), st.integers(0, 20), st.integers(1, 5), st.booleans()),
    st.tuples(st.just("lab"), st.integers(0, 3), st.floats(0.1, 400)))


def _event(s: tuple[object, ...], ae_ids: list[str]) -> Identified[EventData] | None:
    kind, *rest = s
    if kind == "fact":
        i, fact, arm, hours = rest
        return Identified(str(uuid.uuid4()), PatientSafetyFactRecorded.model_validate({
            "patient_id": f"P{i}", "site_id": "S1", "fact": fact, "arm": arm,
            "at": T0 + timedelta(hours=int(hours)), "source_event_id": str(uuid.uuid4())}))  # type: ignore[call-overload]
    if kind == "ae":  # no arm, the relation to an infusion derived: both read from the patient
        i, grade, relatedness, serious, hours = rest
        ae_ids.append(str(uuid.uuid4()))
        onset = T0 + timedelta(hours=int(hours))  # type: ignore[call-overload]
        return Identified(str(uuid.uuid4()), AdverseEventReported.model_validate({
            "adverse_event_id": ae_ids[-1], "patient_id": f"P{i}", "site_id": "S1",
            "term": "rash", "onset_at": onset, "ctcae_grade": grade, "serious": serious,
            "relatedness": relatedness, "expected": False, "infusion_related": False,
            "infusion_related_source": "derived", "reported_at": onset + timedelta(hours=1)}))
    if kind == "follow_up":
        n, grade, serious = rest
        if not ae_ids:
            return None
        ae_id = ae_ids[int(n) % len(ae_ids)]  # type: ignore[call-overload]
        return Identified(str(uuid.uuid4()), AdverseEventFollowedUp(
            follow_up_id=str(uuid.uuid4()), adverse_event_id=ae_id, patient_id="P0",
            site_id="S1", ctcae_grade=grade, serious=serious, reported_at=T0 + timedelta(days=2)))
    i, value = rest
    return lab(f"P{i}", "mtx", ALT=(value, 40.0))


def _readings_of(state: SafetyState) -> tuple[object, ...]:
    bayes = next(r.bayes for r in CONFIG.rules if r.bayes is not None)
    return (rules.evaluate(CONFIG, state), rules.clocks_due(CONFIG, state),
            rules.adverse_events_by_arm(state, CONFIG),
            [rules.arm_toxicity(CONFIG, bayes, state, arm) for arm in ARMS],
            domain.status(CONFIG, state, 57, now=T0))


@given(st.lists(step, max_size=25), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_kept_readings_give_what_fresh_ones_give(steps: list[tuple[object, ...]],
                                                 rnd: random.Random) -> None:
    """`rules.Readings` keeps what the rules read of each adverse event and lab result while its
    objects stay the same: each state, evaluated as a decision would (and an older state again
    after newer ones), reads exactly as with nothing kept."""
    state = given_events(*[patient(f"P{i}", "msc_high", dosed=False) for i in range(4)])
    states, ae_ids = [state], list[str]()
    for s in steps:
        event = _event(s, ae_ids)
        if event is None:
            continue
        state = domain.apply(state, [event])
        kept = _readings_of(state)
        rules.forget_readings()
        assert kept == _readings_of(state)
        state = domain.apply(state, rules.evaluate(CONFIG, state))  # as a decision does
        states.append(state)
    for older in rnd.sample(states, min(3, len(states))):
        kept = _readings_of(older)
        rules.forget_readings()
        assert kept == _readings_of(older)
