"""The permission matrix as the issue states it, and the three checks services call."""

from __future__ import annotations

import pytest

from shared.auth import ROLES, Principal
from shared.errors import Refused
from shared.permissions import (
    MATRIX,
    Action,
    allowed,
    authorize,
    authorize_patient,
    authorize_site,
)
from shared.web import REFUSAL_STATUS

SITE = {"site_coordinator", "investigator", "pharmacist"}
# The issue's table, row by row: who may do what at all (site roles: at their own site only).
TABLE = {
    Action.ENROL: {"site_coordinator", "investigator"},
    Action.CROSSOVER: {"investigator"},
    Action.DOSE: {"site_coordinator", "investigator", "pharmacist"},
    Action.READ_PATIENT: set(ROLES),
    Action.REPORT_SAFETY: {"site_coordinator", "investigator"},
    Action.READ_SAFETY_STATUS: set(ROLES),
    Action.READ_RULE_FIRINGS: {"monitor", "dsmb", "admin"},
    Action.READ_INTERIM_DATA: {"dsmb", "admin"},
    Action.DSMB_DECISION: {"dsmb"},
    Action.AUDIT: {"monitor", "dsmb", "admin"},
    # the efficacy issue's contract: assessments by the site's clinical staff, discontinuation
    # by the investigator, the summary to investigators and the trial-wide roles, worklists to
    # the site's staff, monitors and admins (not the DSMB: it reads no site's to-do list)
    Action.RECORD_ASSESSMENT: {"site_coordinator", "investigator"},
    Action.DISCONTINUE_TREATMENT: {"investigator"},
    Action.READ_PATIENT_EFFICACY: {"site_coordinator", "investigator", "monitor", "dsmb", "admin"},
    Action.READ_EFFICACY_SUMMARY: {"investigator", "monitor", "dsmb", "admin"},
    Action.READ_WORKLIST: {"site_coordinator", "investigator", "pharmacist", "monitor", "admin"},
    Action.READ_REPORTS: {"monitor", "dsmb", "admin"},  # the reporting issue's contract
}


def who(role: str, site: str | None = None) -> Principal:
    return Principal(sub=f"u-{role}", role=role, site=site if role in SITE else None)


def test_the_matrix_is_the_issues_table() -> None:
    assert {a: set(r) for a, r in MATRIX.items()} == TABLE


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("role", ROLES)
def test_authorize_refuses_exactly_the_roles_the_table_leaves_out(action: Action, role: str) -> None:
    assert allowed(who(role, "S1"), action) == (role in TABLE[action])
    if role in TABLE[action]:
        authorize(who(role, "S1"), action)
    else:
        with pytest.raises(Refused) as refused:
            authorize(who(role, "S1"), action)
        assert (REFUSAL_STATUS[refused.value.code], refused.value.code) == (403, "forbidden")


@pytest.mark.parametrize("role", ROLES)
def test_another_sites_patient_is_404_before_the_role_is_looked_at(role: str) -> None:
    caller = who(role, "S2")
    if role in SITE:
        with pytest.raises(Refused) as hidden:
            authorize_patient(caller, Action.ENROL, "S1")
        assert (REFUSAL_STATUS[hidden.value.code], hidden.value.code) == (404, "patient_not_found")
    elif role in TABLE[Action.READ_PATIENT]:
        authorize_patient(caller, Action.READ_PATIENT, "S1")  # trial-wide roles see every site


def test_own_site_patient_then_the_role_decides() -> None:
    authorize_patient(who("pharmacist", "S1"), Action.DOSE, "S1")
    with pytest.raises(Refused) as refused:
        authorize_patient(who("pharmacist", "S1"), Action.ENROL, "S1")
    assert REFUSAL_STATUS[refused.value.code] == 403


def test_a_new_record_at_another_site_is_403() -> None:
    authorize_site(who("investigator", "S1"), Action.ENROL, "S1")
    for caller in (who("investigator", "S2"), who("monitor")):
        with pytest.raises(Refused) as refused:
            authorize_site(caller, Action.ENROL, "S1")
        assert REFUSAL_STATUS[refused.value.code] == 403
