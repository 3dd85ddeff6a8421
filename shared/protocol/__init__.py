"""The protocol configuration: arms, doses, calendar, eligibility and caps, versioned as data."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.events import ARMS, Arm

DEFAULT_PATH = Path(__file__).with_name("v1.json")


class ArmConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    product: str
    kind: Literal["infusion", "methotrexate"]
    dose_weeks: tuple[int, ...]
    cells_per_kg: float | None = None
    mtx_titration_mg: tuple[float, ...] | None = None  # dose per dosing week, in order


class ProtocolConfig(BaseModel):
    """Read once at start-up; a protocol amendment is a new version of this file, never code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str
    trial_id: str
    enrollment_cap: int = Field(ge=1)
    arms: dict[Arm, ArmConfig]
    window_days: int = Field(ge=0)
    assessment_weeks: tuple[int, ...]
    mtx_dose_range_mg: tuple[float, float]
    pasi_band_threshold: float

    @model_validator(mode="after")
    def _consistent(self) -> ProtocolConfig:
        """Refuse at start-up what would otherwise fail at a patient's first visit."""
        if set(self.arms) != set(ARMS):
            raise ValueError(f"arms must be exactly {', '.join(ARMS)}")
        low, high = self.mtx_dose_range_mg
        for arm_id, arm in self.arms.items():
            if arm.kind == "infusion" and not arm.cells_per_kg:
                raise ValueError(f"{arm_id}: an infusion arm needs cells_per_kg")
            if arm.kind == "methotrexate":
                doses = arm.mtx_titration_mg or ()
                if len(doses) != len(arm.dose_weeks):
                    raise ValueError(f"{arm_id}: one titration dose per dose week")
                if any(not low <= d <= high for d in doses):
                    raise ValueError(f"{arm_id}: titration doses must lie in [{low}, {high}] mg")
        return self


def load_protocol(path: Path | None = None) -> ProtocolConfig:
    return ProtocolConfig.model_validate(json.loads((path or DEFAULT_PATH).read_text()))


@lru_cache
def default_protocol() -> ProtocolConfig:
    return load_protocol()
