"""The protocol configuration: arms, doses, calendar, eligibility and caps, versioned as data."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import Refused
from shared.events import ARMS, Arm, canonical_json
from shared.protocol.efficacy import EfficacyConfig
from shared.protocol.eligibility import EligibilityConfig
from shared.protocol.randomization import RandomizationConfig
from shared.protocol.safety import SafetyConfig

# One folder per protocol version: trial.json holds the trial-wide keys, every other file
# <section>.json holds one section (so each service's rules live in a file of their own).
DEFAULT_PATH = Path(__file__).with_name("v1")


class ArmConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    product: str
    kind: Literal["infusion", "methotrexate"]
    dose_weeks: tuple[int, ...]
    cells_per_kg: float | None = None
    mtx_titration_mg: tuple[float, ...] | None = None  # dose per dosing week, in order


class SiteConfig(BaseModel):
    """A trial site: visit windows, screening dates and ages are counted in its own dates."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    time_zone: str  # IANA, e.g. Asia/Shanghai

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value


class ProtocolConfig(BaseModel):
    """Read once at start-up; a protocol amendment is a new version of this file, never code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str
    trial_id: str
    enrollment_cap: int = Field(ge=1)
    sites: dict[str, SiteConfig] = Field(min_length=1)
    arms: dict[Arm, ArmConfig]
    window_days: int = Field(ge=0)
    assessment_weeks: tuple[int, ...]
    mtx_dose_range_mg: tuple[float, float]
    # The largest rise from one methotrexate dose to the next (the titration scheme is each
    # arm's mtx_titration_mg); beyond it, or beyond the scheme's dose, only as a deviation.
    mtx_max_step_mg: float = Field(gt=0)
    # A weight at an infusion further than this fraction from the last recorded one must be
    # confirmed (the cells are counted from it).
    weight_change_confirm_fraction: float = Field(gt=0, lt=1)
    pasi_band_threshold: float
    # One file each (<section>.json), and every one is required: no section falls back to
    # values written into code, so a folder without safety.json cannot start without rules.
    eligibility: EligibilityConfig
    randomization: RandomizationConfig
    safety: SafetyConfig
    efficacy: EfficacyConfig

    def site_date(self, site_id: str, at: datetime) -> date:
        """The calendar day `at` falls on at the site (its own time zone), whatever offset `at`
        was written in. A site the protocol does not name has no dates: refused (fails closed)."""
        site = self.sites.get(site_id)
        if site is None:
            raise Refused("unknown_site", f"Site {site_id} is not a site of this protocol version",
                          site_id=site_id)
        return at.astimezone(ZoneInfo(site.time_zone)).date()

    def content_hash(self) -> str:
        """SHA-256 of the canonical JSON of the whole configuration: what a version really says."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

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
        if self.efficacy.responders_at_week not in self.assessment_weeks:
            raise ValueError("efficacy.responders_at_week must be an assessment week")
        return self


SECTIONS = ("eligibility", "randomization", "safety", "efficacy")


class ProtocolError(ValueError):
    """A protocol folder that cannot be a protocol: the service refuses to start."""


def read_document(folder: Path) -> dict[str, Any]:
    """trial.json with every section file under its name; a missing section is refused, named."""
    document: dict[str, Any] = json.loads((folder / "trial.json").read_text())
    missing = [f"{s}.json" for s in SECTIONS if not (folder / f"{s}.json").is_file()]
    if missing:
        raise ProtocolError(f"protocol folder {folder} lacks {', '.join(missing)}: every section "
                            f"({', '.join(s + '.json' for s in SECTIONS)}) is required")
    for section in sorted(folder.glob("*.json")):
        if section.stem != "trial":
            document[section.stem] = json.loads(section.read_text())
    return document


def load_protocol(folder: Path | None = None) -> ProtocolConfig:
    """The version in `folder` (the built-in one by default), read and validated."""
    return ProtocolConfig.model_validate(read_document(folder or DEFAULT_PATH))


@lru_cache
def default_protocol() -> ProtocolConfig:
    """The built-in version, read once (tools and tests; services get theirs injected)."""
    return load_protocol()
