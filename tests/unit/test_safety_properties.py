"""Properties of the rule engine: the exact posterior against numeric integration, and firing once."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.safety import domain, rules
from tests.unit.test_safety_rules import CONFIG, ae, lab, patient
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
