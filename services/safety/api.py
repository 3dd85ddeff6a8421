"""HTTP API of the safety service: trial, arm and patient status (rules land with issue 5)."""

from __future__ import annotations

from fastapi import APIRouter

from shared.events import ARMS
from shared.service import CurrentPrincipal

router = APIRouter(prefix="/v1", tags=["safety"])


@router.get("/safety/status")
async def status(who: CurrentPrincipal) -> dict[str, object]:
    return {
        "trial": {"status": "active", "enrollment": "open"},
        "arms": {arm: {"status": "active"} for arm in ARMS},
        "patient_holds": [],
        "triggered_rules": [],
    }
