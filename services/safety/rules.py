"""The stopping-rule engine: evaluates the configured rule set on a state and says which rules fire. Pure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from math import comb

from services.safety.state import (
    AdverseEventFile,
    AdverseEventView,
    LabFile,
    SafetyState,
    firing_key,
)
from shared.decider import Identified
from shared.events import (
    ARMS,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    PatientDosingHeld,
    StoppingRuleTriggered,
    SusarReportDue,
    TrialHalted,
)
from shared.protocol.safety import (
    RELATEDNESS_ORDER,
    AdverseEventCriteria,
    BayesToxicity,
    LabCriteria,
    Rule,
    SafetyConfig,
)

# Ids of what a firing emits are derived from its key, so a firing computed twice (redelivery,
# replay, a second replica) is the same event and the store's unique event id refuses the copy.
FIRING_NS = uuid.UUID("0b5b7f4e-5d0e-4d43-a1c2-55c3d8a4e0f1")
Emitted = Identified[EventData]


def derived_id(key: str, kind: str) -> str:
    return str(uuid.uuid5(FIRING_NS, f"{key}#{kind}"))


def posterior_above(k: int, n: int, rate: Fraction, alpha: int = 1, beta: int = 1) -> Fraction:
    """P(p > rate) exactly, for p ~ Beta(alpha + k, beta + n - k) with integer parameters.

    For integers a, b: P(p > x) = P(Binomial(a + b - 1, x) <= a - 1), a finite sum.
    """
    a, b = alpha + k, beta + n - k
    m = a + b - 1
    return sum((comb(m, j) * rate**j * (1 - rate) ** (m - j) for j in range(a)), Fraction(0))


def related(config: SafetyConfig, relatedness: str) -> bool:
    return RELATEDNESS_ORDER.index(relatedness) >= RELATEDNESS_ORDER.index(config.related_at_least)


def ae_matches(config: SafetyConfig, c: AdverseEventCriteria, ae: AdverseEventFile,
               v: AdverseEventView) -> bool:
    return (v.grade >= c.min_grade
            and (c.related is None or related(config, v.relatedness) == c.related)
            and (c.serious is None or v.serious == c.serious)
            and (c.expected is None or v.expected == c.expected)
            and (c.infusion_related is None or v.infusion_related == c.infusion_related)
            and (c.outcomes is None or v.outcome in c.outcomes)
            and (c.terms is None or ae.term.strip().lower() in {t.lower() for t in c.terms}))


def qualifying_prefix(config: SafetyConfig, criteria: tuple[AdverseEventCriteria, ...],
                      ae: AdverseEventFile) -> int | None:
    """How many of the event's reports it took to meet a criterion first (None: never met).

    The evidence is those reports: a later follow-up that changes nothing relevant is no new
    evidence, so it never fires the rule again."""
    for i, view in enumerate(ae.views):
        if any(ae_matches(config, c, ae, view) for c in criteria):
            return i + 1
    return None


def lab_matches(c: LabCriteria, lab: LabFile) -> bool:
    for r in lab.results:
        if r.analyte != c.analyte:
            continue
        if c.above_uln_times is not None and r.uln is not None and r.value > c.above_uln_times * r.uln:
            return True
        if c.below is not None and r.value < c.below:
            return True
    return False


@dataclass(frozen=True)
class Item:
    """One piece of evidence a rule counts: an adverse event (as far as needed) or a lab result."""

    patient_id: str
    arm: str | None
    evidence: tuple[str, ...]
    at: datetime  # when the last piece of this evidence was reported
    ae: AdverseEventFile | None = None
    view: AdverseEventView | None = None


def items_for(config: SafetyConfig, rule: Rule, state: SafetyState) -> list[Item]:
    found: list[Item] = []
    if rule.adverse_events:
        for ae in state.adverse_events.values():
            if rule.arms is not None and ae.arm not in rule.arms:
                continue
            n = qualifying_prefix(config, rule.adverse_events, ae)
            if n is not None:
                found.append(Item(ae.patient_id, ae.arm, tuple(v.event_id for v in ae.views[:n]),
                                  ae.views[n - 1].reported_at, ae, ae.views[n - 1]))
    for lab in state.labs:
        if rule.arms is not None and lab.arm not in rule.arms:
            continue
        if any(lab_matches(c, lab) for c in rule.labs):
            found.append(Item(lab.patient_id, lab.arm, (lab.event_id,), lab.reported_at))
    return found


@dataclass(frozen=True)
class ArmToxicity:
    patients_dosed: int
    toxicities: int
    probability: Fraction
    evidence: tuple[str, ...]
    at: datetime | None


def arm_toxicity(config: SafetyConfig, bayes: BayesToxicity, state: SafetyState,
                 arm: str) -> ArmToxicity:
    """k = patients of the arm with a toxicity, n = patients dosed in the arm (a patient with a
    treatment-related toxicity counts as dosed even before safety has seen the dose)."""
    toxic: dict[str, list[str]] = {}
    times: list[datetime] = []
    for ae in state.adverse_events.values():
        if ae.arm != arm:
            continue
        n = qualifying_prefix(config, (bayes.toxicity,), ae)
        if n is not None:
            toxic.setdefault(ae.patient_id, []).extend(v.event_id for v in ae.views[:n])
            times.append(ae.views[n - 1].reported_at)
    dosed = {p.patient_id for p in state.patients.values() if p.arm == arm and p.dosed}
    n_patients = len(dosed | set(toxic))
    k = len(toxic)
    prob = posterior_above(k, n_patients, Fraction(str(bayes.rate)), bayes.prior_alpha,
                           bayes.prior_beta)
    evidence = tuple(sorted(e for ids in toxic.values() for e in ids))
    return ArmToxicity(n_patients, k, prob, evidence, max(times, default=None))


def _target(rule: Rule, item: Item, trial_id: str) -> str | None:
    return {"patient": item.patient_id, "arm": item.arm, "trial": trial_id}[rule.scope]


@dataclass(frozen=True)
class Candidate:
    target: str
    evidence: tuple[str, ...]
    items: tuple[Item, ...]
    at: datetime | None  # the newest evidence's report time: the same wherever it is evaluated


def candidates(config: SafetyConfig, rule: Rule, state: SafetyState) -> list[Candidate]:
    """Every firing the rule's trigger supports on this state."""
    found: list[Candidate] = []
    if rule.bayes is not None:
        for arm in ARMS:
            if rule.arms is not None and arm not in rule.arms:
                continue
            tox = arm_toxicity(config, rule.bayes, state, arm)
            if tox.toxicities and tox.probability > Fraction(str(rule.bayes.probability)):
                found.append(Candidate(arm, tox.evidence, (), tox.at))
        return found
    groups: dict[str, list[Item]] = {}
    for item in items_for(config, rule, state):
        target = _target(rule, item, state.trial_id)
        if target is not None:
            groups.setdefault(target, []).append(item)
    for target, items in groups.items():
        if rule.distinct_patients == 1:
            found += [Candidate(target, item.evidence, (item,), item.at) for item in items]
        elif len({i.patient_id for i in items}) >= rule.distinct_patients:
            evidence = tuple(sorted(e for i in items for e in i.evidence))
            found.append(Candidate(target, evidence, tuple(items), max(i.at for i in items)))
    return found


def _action(rule: Rule, target: str, hold_id: str) -> EventData:
    if rule.action == "PatientDosingHeld":
        return PatientDosingHeld(hold_id=hold_id, patient_id=target, rule_id=rule.id,
                                 product=rule.product)
    if rule.action == "ArmSuspended":
        return ArmSuspended.model_validate({"hold_id": hold_id, "arm": target, "rule_id": rule.id})
    if rule.action == "EnrollmentPaused":
        return EnrollmentPaused(hold_id=hold_id, trial_id=target, rule_id=rule.id)
    return TrialHalted(hold_id=hold_id, trial_id=target, rule_id=rule.id)


def susar_due(config: SafetyConfig, rule: Rule, item: Item) -> SusarReportDue | None:
    if item.ae is None or item.view is None:
        return None
    v = item.view
    grave = v.grade >= config.susar.life_threatening_grade or v.outcome == "fatal"
    days = (config.susar.fatal_or_life_threatening_days if grave else config.susar.other_days)
    return SusarReportDue(adverse_event_id=item.ae.adverse_event_id, patient_id=item.patient_id,
                          rule_id=rule.id, days=days, aware_at=v.reported_at,
                          due_at=v.reported_at + timedelta(days=days))


def evaluate(config: SafetyConfig, state: SafetyState) -> list[Emitted]:
    """Every firing the state supports that has not fired yet, with its action events."""
    emitted: list[Emitted] = []
    seen = set(state.firing_keys)
    for rule in config.rules:
        for c in candidates(config, rule, state):
            target, evidence = c.target, c.evidence
            key = firing_key(rule.id, evidence)
            if key in seen:
                continue
            seen.add(key)
            hold_id = derived_id(key, "hold")
            emitted.append(Identified(derived_id(key, "triggered"), StoppingRuleTriggered(
                rule_id=rule.id, rule_set_version=config.rule_set_version, scope=rule.scope,
                target=target, evidence=tuple(sorted(evidence)), triggered_at=c.at)))
            emitted.append(Identified(derived_id(key, "action"), _action(rule, target, hold_id)))
            if rule.susar_report:
                for item in c.items:
                    due = susar_due(config, rule, item)
                    if due is not None:
                        emitted.append(Identified(derived_id(key, f"susar:{due.adverse_event_id}"),
                                                  due))
    return emitted
