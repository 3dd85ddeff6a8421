"""The stopping-rule engine: evaluates the configured rule set on a state and says which rules fire. Pure."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from math import comb
from typing import Any

from services.safety.state import (
    AdverseEventFile,
    AdverseEventView,
    LabFile,
    PatientFile,
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
    SeriousAdverseEventReportDue,
    StoppingRuleTriggered,
    SusarFollowUpReportDue,
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


@functools.lru_cache(maxsize=4096)
def posterior_above(k: int, n: int, rate: Fraction, alpha: int = 1, beta: int = 1) -> Fraction:
    """P(p > rate) exactly, for p ~ Beta(alpha + k, beta + n - k) with integer parameters.

    For integers a, b: P(p > x) = P(Binomial(a + b - 1, x) <= a - 1), a finite sum.
    """
    a, b = alpha + k, beta + n - k
    m = a + b - 1
    return sum((comb(m, j) * rate**j * (1 - rate) ** (m - j) for j in range(a)), Fraction(0))


def related(config: SafetyConfig, relatedness: str) -> bool:
    return RELATEDNESS_ORDER.index(relatedness) >= RELATEDNESS_ORDER.index(config.related_at_least)


# A fact that a reading of the evidence rests on: its event id and its time.
Fact = tuple[str, datetime]


class Readings:
    """What the rules read of each adverse event and lab result (its arm, each rule's item),
    kept per piece of evidence while the evidence and its patient's file stay the same objects.

    A state's files never change, and a later state holds the same file object for a patient
    or an adverse event nothing touched since (services/safety/state.py), so a reading stands
    while both objects it came from are the state's. A decision then works out again only what
    it touched, and its one pass over the evidence (`evidence_of`) is a lookup a piece. Without
    it every decision re-read every adverse event of the trial under every rule (54 ms a
    decision at 600 adverse events: safety's consumer fell behind under load; D79).
    Invisible to the results: a property test compares them with a fresh `Readings`."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self._of: dict[str, tuple[object, PatientFile | None, dict[Hashable, Any]]] = {}

    def of(self, key: str, evidence: object, patient: PatientFile | None
           ) -> dict[Hashable, Any]:
        """The readings kept for this evidence (by its id) with this patient's file."""
        entry = self._of.get(key)
        if entry is not None and entry[0] is evidence and entry[1] is patient:
            return entry[2]
        found: dict[Hashable, Any] = {}
        self._of[key] = (evidence, patient, found)
        return found


_READINGS: dict[int, Readings] = {}
_CONFIGS_KEPT = 8  # tests make many configurations; a service has one or two


def readings(config: SafetyConfig) -> Readings:
    """The readings of this configuration (keyed by the object: a configuration is immutable)."""
    found = _READINGS.get(id(config))
    if found is None or found.config is not config:
        found = _READINGS[id(config)] = Readings(config)
        while len(_READINGS) > _CONFIGS_KEPT:
            del _READINGS[next(iter(_READINGS))]
    return found


def forget_readings() -> None:
    """Start every reading afresh (tests compare the kept readings with fresh ones)."""
    _READINGS.clear()


def within_infusion_window(config: SafetyConfig, onset: datetime, given: datetime) -> bool:
    """Onset within the configured hours after an infusion."""
    return timedelta(0) <= onset - given <= timedelta(hours=config.infusion_related_hours)


def infusion_relation(config: SafetyConfig, state: SafetyState, ae: AdverseEventFile,
                      v: AdverseEventView) -> tuple[bool, tuple[Fact, ...]]:
    """Whether the event is infusion-related after this report, and the infusion fact that made
    it so when the relation is derived from an infusion safety learnt of after the report.

    A reporter's word stands, and so does a relation derived at intake; otherwise the first
    infusion fact (in the order safety learnt of them) within the window is the evidence, so a
    further one never changes it."""
    if v.infusion_related or v.infusion_related_by_reporter:
        return v.infusion_related, ()
    patient = state.patients.get(ae.patient_id)
    for given, fact_id in patient.infusion_facts if patient is not None else ():
        if within_infusion_window(config, ae.onset_at, given):
            return True, ((fact_id, given),)
    return False, ()


def ae_matches(config: SafetyConfig, c: AdverseEventCriteria, ae: AdverseEventFile,
               v: AdverseEventView, infusion_related: bool) -> bool:
    return (v.grade >= c.min_grade
            and (c.related is None or related(config, v.relatedness) == c.related)
            and (c.serious is None or v.serious == c.serious)
            and (c.expected is None or v.expected == c.expected)
            and (c.infusion_related is None or infusion_related == c.infusion_related)
            and (c.outcomes is None or v.outcome in c.outcomes)
            and (c.terms is None or any(term_matches(ae.term, t) for t in c.terms)))


def normal_term(term: str) -> str:
    return " ".join(term.split()).casefold()


def term_matches(term: str, configured: str) -> bool:
    """Equal without regard to case or runs of spaces; a configured term ending in "*" also
    matches any term that begins with it (CTCAE's "Other, specify" with what is specified)."""
    if configured.endswith("*"):
        return normal_term(term).startswith(normal_term(configured.rstrip("*")))
    return normal_term(term) == normal_term(configured)


@dataclass(frozen=True)
class Qualified:
    """How many of the event's reports it took to meet a criterion first, and the facts the
    reading of those reports rested on (an infusion learnt of later)."""

    reports: int
    facts: tuple[Fact, ...] = ()


def qualifying_prefix(config: SafetyConfig, criteria: tuple[AdverseEventCriteria, ...],
                      ae: AdverseEventFile, state: SafetyState) -> Qualified | None:
    """The first of the event's reports that met a criterion (None: never met).

    The evidence is the reports up to it: a later follow-up that changes nothing relevant is no
    new evidence, so it never fires the rule again. A fact joins the evidence only when the
    criterion needed it, so an infusion learnt of later is new evidence for R4 but not for R2."""
    for i, view in enumerate(ae.views):
        infusion, facts = infusion_relation(config, state, ae, view)
        matched = [c for c in criteria if ae_matches(config, c, ae, view, infusion)]
        if matched:
            needed = all(c.infusion_related is not None for c in matched)
            return Qualified(i + 1, facts if needed else ())
    return None


def above_times(value: float, times: float, uln: float) -> bool:
    """`value > times x uln` in the decimals written, not in binary floating point, where
    3 * 33.3 is 99.89999999999999 and a result of exactly 3 x ULN would count as above it (the
    rule is strictly above). Not a number is above nothing, as in floating point."""
    try:
        return Decimal(repr(value)) > Decimal(repr(times)) * Decimal(repr(uln))
    except InvalidOperation:
        return False


def lab_matches(c: LabCriteria, lab: LabFile) -> bool:
    for r in lab.results:
        if r.analyte != c.analyte:
            continue
        if (c.above_uln_times is not None and r.uln is not None
                and above_times(r.value, c.above_uln_times, r.uln)):
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


def ae_item(ae: AdverseEventFile, arm: str | None, q: Qualified,
            arm_facts: tuple[Fact, ...] = ()) -> Item:
    """An adverse event as evidence: its reports up to the qualifying one, and the facts."""
    view = ae.views[q.reports - 1]
    facts = (*q.facts, *arm_facts)
    return Item(ae.patient_id, arm,
                tuple(v.event_id for v in ae.views[:q.reports]) + tuple(f for f, _ in facts),
                max([view.reported_at, *(at for _, at in facts)]), ae, view)


def adverse_events_by_arm(state: SafetyState, config: SafetyConfig | None = None
                          ) -> dict[str, int]:
    """How many adverse events count for each arm: the arm the patient was on at onset
    (`arm_reading`), each event once. The status and the DSMB report both count so."""
    counts: dict[str, int] = {}
    memo = readings(config) if config is not None else None
    for ae in state.adverse_events.values():
        kept = memo.of(ae.adverse_event_id, ae, state.patients.get(ae.patient_id)) if memo else {}
        if "arm" not in kept:
            kept["arm"] = arm_reading(state, ae.patient_id, ae.onset_at, ae.arm)
        arm, _ = kept["arm"]
        if arm is not None:
            counts[arm] = counts.get(arm, 0) + 1
    return counts


def arm_reading(state: SafetyState, patient_id: str, at: datetime,
                recorded: str | None) -> tuple[str | None, tuple[Fact, ...]]:
    """The arm an adverse event (at its onset) or a lab result (at collection) counts for: the
    treatment the patient was on then (after a crossover, the arm crossed into), and the
    assignment or crossover that says so when it is not the arm recorded with it.

    One recorded without an arm (safety had not learnt of the assignment yet), or with an arm a
    crossover learnt of later contradicts, counts for the arm in force at that time once the
    fact arrives; the fact joins the evidence, so the arm rules fire on it then."""
    patient = state.patients.get(patient_id)
    spell = patient.spell_at(at) if patient is not None else None
    if spell is None or spell.arm == recorded:
        return recorded, ()
    return spell.arm, ((spell.fact_id, spell.since),)


def _ae_item(config: SafetyConfig, rule: Rule, state: SafetyState, ae: AdverseEventFile,
             by_arm: bool) -> Item | None:
    arm, arm_facts = (arm_reading(state, ae.patient_id, ae.onset_at, ae.arm) if by_arm
                      else (ae.arm, ()))
    if rule.arms is not None and arm not in rule.arms:
        return None
    q = qualifying_prefix(config, rule.adverse_events, ae, state)
    return ae_item(ae, arm, q, arm_facts) if q is not None else None


def _lab_item(rule: Rule, state: SafetyState, lab: LabFile, by_arm: bool) -> Item | None:
    arm, arm_facts = (arm_reading(state, lab.patient_id, lab.collected_at, lab.arm) if by_arm
                      else (lab.arm, ()))
    if rule.arms is not None and arm not in rule.arms:
        return None
    if not any(lab_matches(c, lab) for c in rule.labs):
        return None
    return Item(lab.patient_id, arm, (lab.event_id, *(f for f, _ in arm_facts)),
                max([lab.reported_at, *(at for _, at in arm_facts)]))


def _by_arm(rule: Rule) -> bool:
    return rule.scope == "arm" or rule.arms is not None  # else the arm is not the rule's


@dataclass(frozen=True)
class Evidence:
    """One pass over the state's adverse events and lab results under every rule: each rule's
    items in the state's order, and each posterior's toxicities (arm, item) likewise. A piece
    of evidence costs a lookup (`Readings`) and a walk of the few rules it meets."""

    items: dict[str, list[Item]]
    toxicities: dict[str, list[tuple[str, Item]]]


def evidence_of(config: SafetyConfig, state: SafetyState) -> Evidence:
    memo, patients = readings(config), state.patients
    ae_rules = [(r.id, r, _by_arm(r)) for r in config.rules if r.bayes is None and r.adverse_events]
    lab_rules = [(r.id, r, _by_arm(r)) for r in config.rules if r.bayes is None and r.labs]
    bayes_rules = [(r.id, r.bayes) for r in config.rules if r.bayes is not None]
    items: dict[str, list[Item]] = {r.id: [] for r in config.rules if r.bayes is None}
    toxicities: dict[str, list[tuple[str, Item]]] = {rule_id: [] for rule_id, _ in bayes_rules}
    for ae in state.adverse_events.values():
        kept = memo.of(ae.adverse_event_id, ae, patients.get(ae.patient_id))
        met = kept.get("met")
        if met is None:
            met = kept["met"] = (
                tuple((rule_id, item) for rule_id, rule, by_arm in ae_rules
                      if (item := _ae_item(config, rule, state, ae, by_arm)) is not None),
                tuple((rule_id, (arm, item)) for rule_id, bayes in bayes_rules
                      for arm, item in (_toxicity_reading(config, bayes, state, ae),)
                      if item is not None and arm is not None))
        for rule_id, item in met[0]:
            items[rule_id].append(item)
        for rule_id, toxicity in met[1]:
            toxicities[rule_id].append(toxicity)
    if lab_rules:
        for lab in state.labs:
            kept = memo.of(lab.event_id, lab, patients.get(lab.patient_id))
            met = kept.get("met")
            if met is None:
                met = kept["met"] = (
                    tuple((rule_id, item) for rule_id, rule, by_arm in lab_rules
                          if (item := _lab_item(rule, state, lab, by_arm)) is not None), ())
            for rule_id, item in met[0]:
                items[rule_id].append(item)
    return Evidence(items, toxicities)


def items_for(config: SafetyConfig, rule: Rule, state: SafetyState) -> list[Item]:
    """The evidence the rule counts: each adverse event and lab result that meets it, read by
    the arm in force at the time when the rule is by arm."""
    if rule in config.rules:
        return evidence_of(config, state).items[rule.id]
    found = [item for ae in state.adverse_events.values()  # a rule from elsewhere: read afresh
             if rule.adverse_events and (item := _ae_item(config, rule, state, ae, _by_arm(rule)))]
    return found + [item for lab in state.labs
                    if rule.labs and (item := _lab_item(rule, state, lab, _by_arm(rule)))]


@dataclass(frozen=True)
class ArmToxicity:
    patients_dosed: int
    toxicities: int
    probability: Fraction
    evidence: tuple[str, ...]
    at: datetime | None


def _toxicity_reading(config: SafetyConfig, bayes: BayesToxicity, state: SafetyState,
                      ae: AdverseEventFile) -> tuple[str | None, Item | None]:
    """The arm an adverse event counts for, and the event as a toxicity there (None: not one)."""
    arm, arm_facts = arm_reading(state, ae.patient_id, ae.onset_at, ae.arm)
    q = qualifying_prefix(config, (bayes.toxicity,), ae, state)
    return arm, ae_item(ae, arm, q, arm_facts) if q is not None and arm is not None else None


def _arm_toxicities(config: SafetyConfig, bayes: BayesToxicity, state: SafetyState, arm: str,
                    evidence: Evidence | None) -> tuple[dict[str, list[str]], list[datetime]]:
    """The patients with a toxicity while on `arm` (each with its evidence), and when each
    toxicity was reported."""
    # Kept by the rule that has this posterior; one from elsewhere is read afresh.
    rule_id = next((r.id for r in config.rules if r.bayes is bayes), None)
    if rule_id is None:
        readings_ = [_toxicity_reading(config, bayes, state, ae)
                     for ae in state.adverse_events.values()]
        toxicities = [(a, item) for a, item in readings_ if item is not None and a is not None]
    else:
        toxicities = (evidence or evidence_of(config, state)).toxicities[rule_id]
    toxic: dict[str, list[str]] = {}
    times: list[datetime] = []
    for ae_arm, item in toxicities:
        if ae_arm == arm:
            toxic.setdefault(item.patient_id, []).extend(item.evidence)
            times.append(item.at)
    return toxic, times


def arm_toxicity(config: SafetyConfig, bayes: BayesToxicity, state: SafetyState,
                 arm: str, evidence: Evidence | None = None) -> ArmToxicity:
    """k = patients with a toxicity while on the arm, n = patients who received a dose of the
    arm (a patient with a treatment-related toxicity counts as dosed even before safety has seen
    the dose); after a crossover a patient counts in each arm by the treatment received."""
    return _arm_toxicity(bayes, state, arm, *_arm_toxicities(config, bayes, state, arm, evidence))


def _arm_toxicity(bayes: BayesToxicity, state: SafetyState, arm: str,
                  toxic: dict[str, list[str]], times: list[datetime]) -> ArmToxicity:
    """`arm_toxicity` from the arm's toxicities (`_arm_toxicities`)."""
    dosed = {p.patient_id for p in state.patients.values() if arm in p.dosed_arms}
    n_patients = len(dosed | set(toxic))
    k = len(toxic)
    prob = posterior_above(k, n_patients, Fraction(str(bayes.rate)), bayes.prior_alpha,
                           bayes.prior_beta)
    evidence_ids = tuple(sorted(e for ids in toxic.values() for e in ids))
    return ArmToxicity(n_patients, k, prob, evidence_ids, max(times, default=None))


def _target(rule: Rule, item: Item, trial_id: str) -> str | None:
    return {"patient": item.patient_id, "arm": item.arm, "trial": trial_id}[rule.scope]


@dataclass(frozen=True)
class Candidate:
    target: str
    evidence: tuple[str, ...]
    items: tuple[Item, ...]
    at: datetime | None  # the newest evidence's report time: the same wherever it is evaluated


def candidates(config: SafetyConfig, rule: Rule, state: SafetyState,
               evidence: Evidence | None = None) -> list[Candidate]:
    """Every firing the rule's trigger supports on this state (`evidence`: the state's, when
    the caller has it already)."""
    found: list[Candidate] = []
    if rule.bayes is not None:
        for arm in ARMS:
            if rule.arms is not None and arm not in rule.arms:
                continue
            # No toxicity on the arm: no firing, whoever was dosed. Counting the dosed (every
            # patient) for nothing cost safety a seventh of its CPU on each fact at 2,000
            # patients (D84).
            toxic, times = _arm_toxicities(config, rule.bayes, state, arm, evidence)
            if not toxic:
                continue
            tox = _arm_toxicity(rule.bayes, state, arm, toxic, times)
            if tox.toxicities and tox.probability > Fraction(str(rule.bayes.probability)):
                found.append(Candidate(arm, tox.evidence, (), tox.at))
        return found
    groups: dict[str, list[Item]] = {}
    items = evidence.items[rule.id] if evidence is not None else items_for(config, rule, state)
    for item in items:
        target = _target(rule, item, state.trial_id)
        if target is not None:
            groups.setdefault(target, []).append(item)
    for target, items in groups.items():
        if rule.distinct_patients == 1:
            found += [Candidate(target, item.evidence, (item,), item.at) for item in items]
        elif len({i.patient_id for i in items}) >= rule.distinct_patients:
            ids = tuple(sorted(e for i in items for e in i.evidence))
            found.append(Candidate(target, ids, tuple(items), max(i.at for i in items)))
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


def grave(config: SafetyConfig, v: AdverseEventView) -> bool:
    """Fatal or life-threatening: a SUSAR then has the shorter deadline."""
    return v.grade >= config.susar.life_threatening_grade or v.outcome == "fatal"


def susar_due(config: SafetyConfig, rule: Rule, item: Item) -> SusarReportDue | None:
    if item.ae is None or item.view is None:
        return None
    v = item.view
    days = (config.susar.fatal_or_life_threatening_days if grave(config, v)
            else config.susar.other_days)
    return SusarReportDue(adverse_event_id=item.ae.adverse_event_id, patient_id=item.patient_id,
                          rule_id=rule.id, days=days, aware_at=v.reported_at,
                          due_at=v.reported_at + timedelta(days=days))


def evaluate(config: SafetyConfig, state: SafetyState) -> list[Emitted]:
    """Every firing the state supports that has not fired yet, with its action events."""
    emitted: list[Emitted] = []
    seen = set(state.firing_keys)
    read = evidence_of(config, state)
    for rule in config.rules:
        for c in candidates(config, rule, state, read):
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


# --- reporting clocks -----------------------------------------------------------------------------


def clock_id(kind: str, adverse_event_id: str) -> str:
    """Each clock runs once per adverse event: its id is derived from both."""
    return derived_id(f"clock|{kind}|{adverse_event_id}", kind)


def _susar_upgrades(config: SafetyConfig, state: SafetyState,
                    touched: Collection[str] | None) -> list[SusarReportDue]:
    """A SUSAR on the longer deadline that a later report made fatal or life-threatening (and
    still a SUSAR): due within the shorter one from that report, when the sponsor first knew
    the case qualified (ICH E2A); the earlier deadline stays the one in force if it comes first."""
    fast = config.susar.fatal_or_life_threatening_days
    rules_by_id = {r.id: r for r in config.rules}
    dues: dict[str, list[SusarReportDue]] = {}
    for due in state.susars:
        if touched is None or due.adverse_event_id in touched:
            dues.setdefault(due.adverse_event_id, []).append(due)
    found = []
    for ae_id, clocks in dues.items():
        ae, rule = state.adverse_events.get(ae_id), rules_by_id.get(clocks[0].rule_id)
        if any(c.days == fast for c in clocks) or ae is None or rule is None:
            continue
        for v in ae.views:
            infusion, _ = infusion_relation(config, state, ae, v)
            if grave(config, v) and any(ae_matches(config, c, ae, v, infusion)
                                        for c in rule.adverse_events):
                found.append(SusarReportDue(
                    adverse_event_id=ae_id, patient_id=ae.patient_id, rule_id=rule.id,
                    days=fast, aware_at=v.reported_at,
                    due_at=v.reported_at + timedelta(days=fast),
                    previous_due_at=min(c.due_at for c in clocks)))
                break
    return found


def clocks_due(config: SafetyConfig, state: SafetyState,
               touched: Collection[str] | None = None) -> list[Emitted]:
    """The reporting deadlines the state supports and has not recorded yet, each once per
    adverse event: a serious event's initial report (from the first report that made it
    serious), a SUSAR's shorter deadline when a follow-up made it fatal or life-threatening,
    and the complete report that follows a fatal or life-threatening SUSAR's first one.
    (A SUSAR's own deadline comes with R5's firing.)

    `touched`: only these adverse events (those a decision just reported on), so a clock
    starts with the report that starts it, and events recorded before clocks existed get none
    in some later, unrelated transaction."""
    emitted: list[Emitted] = []
    with_clock = {c.adverse_event_id for c in state.sae_reports}
    hours = config.sae.initial_report_hours
    for ae in state.adverse_events.values():
        if touched is not None and ae.adverse_event_id not in touched:
            continue
        serious = next((v for v in ae.views if v.serious), None)
        if serious is None or ae.adverse_event_id in with_clock:
            continue
        emitted.append(Identified(clock_id("sae", ae.adverse_event_id),
                                  SeriousAdverseEventReportDue(
            adverse_event_id=ae.adverse_event_id, patient_id=ae.patient_id, hours=hours,
            aware_at=serious.reported_at, due_at=serious.reported_at + timedelta(hours=hours))))
    upgrades = _susar_upgrades(config, state, touched)
    emitted += [Identified(clock_id("susar-upgrade", u.adverse_event_id), u) for u in upgrades]
    fast, more = config.susar.fatal_or_life_threatening_days, config.susar.follow_up_days
    followed = {c.adverse_event_id for c in state.susar_follow_ups}
    for due in (*state.susars, *upgrades):
        if (due.days != fast or due.adverse_event_id in followed
                or (touched is not None and due.adverse_event_id not in touched)):
            continue
        followed.add(due.adverse_event_id)
        emitted.append(Identified(clock_id("susar-follow-up", due.adverse_event_id),
                                  SusarFollowUpReportDue(
            adverse_event_id=due.adverse_event_id, patient_id=due.patient_id,
            rule_id=due.rule_id, days=more, initial_due_at=due.due_at,
            due_at=due.due_at + timedelta(days=more))))
    return emitted
