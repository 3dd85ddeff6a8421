"""The protocol configuration's `eligibility` section (file `v1/eligibility.json`)."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The checks the randomization domain knows how to evaluate; the configuration says which apply,
# under which stable criterion id, with which message and thresholds.
Check = Literal[
    "age_in_range", "diagnosed_long_enough", "moderate_to_severe", "conventional_therapy_failed",
    "consent_signed", "can_attend_follow_up", "plaque_type", "not_drug_induced",
    "no_other_psoriasis_treatment", "no_prior_biologic", "no_infection", "no_malignancy",
    "no_hiv_hbv_hcv", "not_pregnant",
]
# What a message may name: the screening's facts and the section's thresholds.
MESSAGE_FIELDS = frozenset({
    "age", "min_age_years", "max_age_years", "min_months_since_diagnosis", "months_since_diagnosis",
    "pasi", "bsa_percent", "dlqi", "min_pasi", "min_bsa_percent", "min_dlqi", "psoriasis_type",
    "prior_biologic_targets",
})


class Criterion(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(pattern=r"^(INC|EXC)-[A-Z0-9-]+$")
    kind: Literal["inclusion", "exclusion"]
    check: Check
    message: str = Field(min_length=1)

    @model_validator(mode="after")
    def _message_names_known_fields(self) -> Criterion:
        """A typo in a message must fail at start-up, not as a 500 at a patient's screening."""
        for _, name, spec, conversion in string.Formatter().parse(self.message):
            if name is not None and (name not in MESSAGE_FIELDS or spec or conversion):
                raise ValueError(f"{self.id}: message names unknown field {{{name}}}")
        return self


class EligibilityConfig(BaseModel):
    """Thresholds and the criteria list, evaluated in order; every failing one is reported."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_age_years: int = Field(ge=0)
    max_age_years: int = Field(ge=0)
    min_months_since_diagnosis: int = Field(ge=0)
    min_pasi: float = Field(ge=0)
    min_bsa_percent: float = Field(ge=0)
    min_dlqi: int = Field(ge=0)
    included_psoriasis_types: tuple[str, ...] = Field(min_length=1)
    criteria: tuple[Criterion, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> EligibilityConfig:
        if self.min_age_years > self.max_age_years:
            raise ValueError("min_age_years must not exceed max_age_years")
        ids = [c.id for c in self.criteria]
        if len(set(ids)) != len(ids):
            raise ValueError("criterion ids must be unique")
        return self
