"""The efficacy section of the protocol (efficacy.json): who counts as a responder, how long a
response must last, and when a patient who stops coming counts as lost to follow-up."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ResponseLevel = Literal[50, 75, 90, 100]  # PASI 50/75/90/100: percent improvement from baseline


class EfficacyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # Sustainability: the responders are the patients with PASI `responder_threshold` at
    # `responders_at_week`; their response lasts while they keep PASI `kept_threshold` to the
    # last assessment week.
    responders_at_week: int = Field(ge=0)
    responder_threshold: ResponseLevel
    kept_threshold: ResponseLevel
    # This many scheduled assessments missed in a row and the patient is lost to follow-up.
    lost_to_follow_up_after_missed: int = Field(ge=1)
