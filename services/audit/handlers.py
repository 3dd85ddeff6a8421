"""The audit ledger's consumer: every event type of every ledger topic is recorded."""

from __future__ import annotations

from collections.abc import Mapping

from services.audit.commands import record
from shared.consumer import ANY_TYPE, Handler
from shared.protocol import ProtocolConfig


def handlers(protocol: ProtocolConfig) -> Mapping[str, Handler]:
    return {ANY_TYPE: record}
