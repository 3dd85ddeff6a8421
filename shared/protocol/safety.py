"""The protocol configuration's `safety` section (file `v1/safety.json`): the versioned stopping rules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Relatedness = Literal["not_related", "unlikely", "possible", "probable", "definite"]
Analyte = Literal["ALT", "AST", "WBC", "neutrophils", "platelets"]
Scope = Literal["patient", "arm", "trial"]
Action = Literal["TrialHalted", "ArmSuspended", "EnrollmentPaused", "PatientDosingHeld"]
RELATEDNESS_ORDER: tuple[Relatedness, ...] = (
    "not_related", "unlikely", "possible", "probable", "definite")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdverseEventCriteria(_Frozen):
    """What one adverse event must be for a rule to count it; an unset field matches anything."""

    min_grade: int = Field(1, ge=1, le=5)
    related: bool | None = None  # relatedness at or above the rule set's `related_at_least`
    serious: bool | None = None
    expected: bool | None = None
    infusion_related: bool | None = None
    outcomes: tuple[str, ...] | None = None
    # Adverse event terms (CTCAE v5 and synonyms), matched without regard to case or runs of
    # spaces; one ending in "*" matches any term it begins ("... - Other, specify: <what>").
    terms: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _terms(self) -> AdverseEventCriteria:
        for t in self.terms or ():
            if not t.strip().rstrip("*").strip() or "*" in t.rstrip("*"):
                raise ValueError(f"term {t!r}: text, with at most one trailing *")
        return self


class LabCriteria(_Frozen):
    """One analyte's limit: above a multiple of its ULN, or below an absolute value."""

    analyte: Analyte
    above_uln_times: float | None = Field(None, gt=0)
    below: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_limit(self) -> LabCriteria:
        if (self.above_uln_times is None) == (self.below is None):
            raise ValueError("give exactly one of above_uln_times and below")
        return self


class BayesToxicity(_Frozen):
    """Stop an arm when P(toxicity rate > rate | data) > probability under Beta(alpha, beta)."""

    prior_alpha: int = Field(ge=1)
    prior_beta: int = Field(ge=1)
    rate: float = Field(gt=0, lt=1)
    probability: float = Field(gt=0, lt=1)
    toxicity: AdverseEventCriteria


class Rule(_Frozen):
    id: str = Field(min_length=1)
    scope: Scope
    action: Action
    product: Literal["any", "infusion", "methotrexate"] = "any"  # for PatientDosingHeld
    arms: tuple[str, ...] | None = None  # only patients of these arms count; None: every arm
    # The trigger: any adverse event matching one of `adverse_events`, or a lab result
    # matching one of `labs`, in at least `distinct_patients` patients of one scope target.
    adverse_events: tuple[AdverseEventCriteria, ...] = ()
    labs: tuple[LabCriteria, ...] = ()
    distinct_patients: int = Field(1, ge=1)
    bayes: BayesToxicity | None = None
    susar_report: bool = False  # also emit SusarReportDue for the event

    @model_validator(mode="after")
    def _has_a_trigger(self) -> Rule:
        if not (self.adverse_events or self.labs or self.bayes):
            raise ValueError(f"rule {self.id} has no trigger")
        if self.action == "PatientDosingHeld" and self.scope != "patient":
            raise ValueError(f"rule {self.id}: PatientDosingHeld needs scope patient")
        if self.bayes is not None and self.scope != "arm":
            raise ValueError(f"rule {self.id}: a Bayesian rule is per arm")
        return self


class SusarDeadlines(_Frozen):
    fatal_or_life_threatening_days: int = Field(ge=1)
    other_days: int = Field(ge=1)
    life_threatening_grade: int = Field(ge=1, le=5)
    # The complete report of a fatal or life-threatening SUSAR: this many further days after
    # its first report's deadline (ICH E2A: "within 8 additional calendar days").
    follow_up_days: int = Field(ge=1)


class SaeReporting(_Frozen):
    """A serious adverse event's initial report: due this many hours after safety learnt it
    was serious."""

    initial_report_hours: int = Field(ge=1)


class SafetyConfig(_Frozen):
    rule_set_version: str = Field(min_length=1)
    related_at_least: Relatedness
    death_grade: int = Field(ge=1, le=5)  # the grade a fatal outcome must carry (CTCAE v5: 5)
    dsmb_rule_id: str = Field(min_length=1)  # the rule id a hold the DSMB imposes carries
    infusion_related_hours: float = Field(gt=0)
    susar: SusarDeadlines
    sae: SaeReporting
    rules: tuple[Rule, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> SafetyConfig:
        ids = [r.id for r in self.rules]
        if len(ids) != len(set(ids)):
            raise ValueError("rule ids must be unique")
        if self.dsmb_rule_id in ids:
            raise ValueError("dsmb_rule_id must differ from every rule id")
        return self
