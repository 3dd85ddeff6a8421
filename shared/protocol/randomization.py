"""The protocol configuration's `randomization` section (file `v1/randomization.json`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RandomizationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
