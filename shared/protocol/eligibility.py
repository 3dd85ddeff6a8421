"""The protocol configuration's `eligibility` section (file `v1/eligibility.json`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EligibilityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
