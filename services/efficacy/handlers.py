"""Efficacy's consumer handlers: enrolment (the screening baseline, the arm, a withdrawal),
dosing's calendars (the dated assessment visits) and fatal adverse events, each one command
(services/efficacy/commands.py)."""

from __future__ import annotations

from collections.abc import Mapping

from services.efficacy import commands
from shared.consumer import Delivery, Handler
from shared.protocol import ProtocolConfig
from shared.store import Transaction

TAKEN = ("PatientEnrolled", "ArmAssigned", "ArmCrossedOver", "PatientWithdrawn",
         "DosingScheduleCreated", "DosingScheduleReanchored",
         "AdverseEventReported", "AdverseEventFollowedUp")


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    async def take(tx: Transaction, delivery: Delivery) -> None:
        await commands.take_event(tx, delivery, protocol)

    return dict.fromkeys(TAKEN, take)
