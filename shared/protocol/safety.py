"""The protocol configuration's `safety` section (file `v1/safety.json`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SafetyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
