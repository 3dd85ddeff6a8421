"""Dosing's consumer handlers: assignments, withdrawals and crossovers shape calendars; safety
events become dosing holds; efficacy's assessments and dispositions mark and end visits. Each is
one command (services/dosing/commands.py)."""

from __future__ import annotations

from collections.abc import Mapping

from services.dosing import commands
from shared.consumer import Delivery, Handler
from shared.protocol import ProtocolConfig
from shared.store import Transaction


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    async def enrollment(tx: Transaction, delivery: Delivery) -> None:
        await commands.take_enrollment_event(tx, delivery, protocol)

    found: dict[str, Handler] = dict.fromkeys(
        ("ArmAssigned", "PatientWithdrawn", "ArmCrossedOver"), enrollment)
    found.update(dict.fromkeys(
        ("PatientDosingHeld", "ArmSuspended", "TrialHalted", "SafetyHoldLifted"),
        commands.take_safety_event))

    async def efficacy(tx: Transaction, delivery: Delivery) -> None:
        await commands.take_efficacy_event(tx, delivery, protocol)

    found.update(dict.fromkeys(
        ("AssessmentRecorded", "VisitMissed", "TreatmentDiscontinued", "LostToFollowUp",
         "DeathRecorded", "StudyCompleted"), efficacy))
    return found
