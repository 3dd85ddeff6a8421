"""Safety's consumer handlers: enrolment and dosing facts feed the rules; its own history is imported."""

from __future__ import annotations

from collections.abc import Mapping

from services.safety import commands
from services.safety.projection import SAFETY_TYPES
from shared.consumer import Delivery, Handler
from shared.protocol import ProtocolConfig
from shared.store import Transaction

FACT_SOURCES = ("PatientEnrolled", "ArmAssigned", "ArmCrossedOver", "PatientWithdrawn",
                "InfusionGiven", "MethotrexateDoseGiven")


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    async def patient_fact(tx: Transaction, delivery: Delivery) -> None:
        await commands.take_patient_fact(tx, delivery, protocol)

    found: dict[str, Handler] = dict.fromkeys(FACT_SOURCES, patient_fact)
    found.update(dict.fromkeys(SAFETY_TYPES, commands.import_safety_event))
    return found
