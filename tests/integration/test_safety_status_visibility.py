"""Interim comparative safety data go to the DSMB only (issue 10, defect 20): per-arm counts,
posteriors and the rules' evidence for dsmb and admin; firings without evidence for monitors;
holds and what to report for everyone. Checked for every role, from the permission matrix."""

from __future__ import annotations

import pytest

from services.safety.domain import INTERIM_ARM_FIELDS
from shared.auth import ROLES, Principal
from shared.permissions import Action, allowed
from shared.settings import Settings
from tests.integration.test_safety_support import ae_body, running_safety, seed_patient


def may(role: str, action: Action) -> bool:
    return allowed(Principal("u", role, "S1" if role in ("site_coordinator", "investigator",
                                                         "pharmacist") else None), action)


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_sees_the_safety_status_the_matrix_allows(settings: Settings,
                                                                  role: str) -> None:
    async with running_safety(settings) as safety:
        patient = await seed_patient(safety, "msc_high")
        async with safety.client() as site:
            r = await site.post(f"/v1/patients/{patient}/adverse-events",
                                json=ae_body(grade=4, relatedness="probable"))
            assert "R2-related-grade4" in r.json()["triggered_rules"], r.text
        async with safety.client(role) as reader:
            status = (await reader.get("/v1/safety/status")).json()
    arm = status["arms"]["msc_high"]
    # Everyone sees the hold in force: it is what they must act on.
    assert arm["status"] == "suspended" and arm["holds"]
    assert (set(arm) >= INTERIM_ARM_FIELDS) is may(role, Action.READ_INTERIM_DATA)
    assert set(arm) & INTERIM_ARM_FIELDS == (
        INTERIM_ARM_FIELDS if may(role, Action.READ_INTERIM_DATA) else set())
    assert ("triggered_rules" in status) is may(role, Action.READ_RULE_FIRINGS)
    if "triggered_rules" in status:
        [firing] = [f for f in status["triggered_rules"] if f["rule_id"] == "R2-related-grade4"]
        assert ("evidence" in firing) is may(role, Action.READ_INTERIM_DATA)
    assert may("dsmb", Action.READ_INTERIM_DATA) and not may("monitor", Action.READ_INTERIM_DATA)
