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
    terms: tuple[str, ...] | None = None  # matched case-insensitively


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


class SafetyConfig(_Frozen):
    rule_set_version: str = Field(min_length=1)
    related_at_least: Relatedness
    infusion_related_hours: float = Field(gt=0)
    susar: SusarDeadlines
    rules: tuple[Rule, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> SafetyConfig:
        ids = [r.id for r in self.rules]
        if len(ids) != len(set(ids)):
            raise ValueError("rule ids must be unique")
        return self
