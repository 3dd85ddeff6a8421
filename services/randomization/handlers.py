"""Randomization's consumer handlers: safety holds from trial.safety, kept as events of its own."""

from __future__ import annotations

from collections.abc import Mapping

from services.randomization.commands import take_safety_event
from shared.consumer import Handler
from shared.protocol import ProtocolConfig


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    return {event_type: take_safety_event
            for event_type in ("EnrollmentPaused", "TrialHalted", "ArmSuspended",
                               "SafetyHoldLifted")}
