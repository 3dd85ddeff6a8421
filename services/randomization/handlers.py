"""Randomization's consumer handlers: safety holds from trial.safety and dispositions from
trial.efficacy, kept as events of its own."""

from __future__ import annotations

from collections.abc import Mapping

from services.randomization.commands import take_efficacy_event, take_safety_event
from shared.consumer import Delivery, Handler
from shared.protocol import ProtocolConfig
from shared.store import Transaction


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    found: dict[str, Handler] = dict.fromkeys(
        ("EnrollmentPaused", "TrialHalted", "ArmSuspended", "SafetyHoldLifted"),
        take_safety_event)

    async def efficacy(tx: Transaction, delivery: Delivery) -> None:
        await take_efficacy_event(tx, delivery, protocol)

    found.update(dict.fromkeys(
        ("TreatmentDiscontinued", "LostToFollowUp", "DeathRecorded", "StudyCompleted"),
        efficacy))
    return found
