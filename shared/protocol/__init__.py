"""The protocol configuration: arms, doses, calendar, eligibility and caps, versioned as data."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared.events import Arm

DEFAULT_PATH = Path(__file__).with_name("v1.json")


class ArmConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    product: str
    kind: str  # "infusion" or "methotrexate"
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


def load_protocol(path: Path | None = None) -> ProtocolConfig:
    return ProtocolConfig.model_validate(json.loads((path or DEFAULT_PATH).read_text()))


@lru_cache
def default_protocol() -> ProtocolConfig:
    return load_protocol()
