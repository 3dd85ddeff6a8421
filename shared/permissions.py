"""The permission matrix, enforced at the gateway and again in every service. Pure: a refusal is a
`Refused` (403 `forbidden`, or 404 `patient_not_found` for another site's patient)."""

from __future__ import annotations

from enum import StrEnum

from shared.auth import SITE_ROLES, Principal
from shared.errors import Refused


class Action(StrEnum):
    ENROL = "enrol"                      # screen, enrol, randomize, withdraw
    CROSSOVER = "crossover"
    DOSE = "dose"                        # record an infusion or a methotrexate dose
    READ_PATIENT = "read_patient"        # patient, schedule
    REPORT_SAFETY = "report_safety"      # adverse event, lab result
    READ_SAFETY_STATUS = "read_safety_status"  # the holds in force and what sites must do
    READ_RULE_FIRINGS = "read_rule_firings"    # which stopping rules fired, on what
    READ_INTERIM_DATA = "read_interim_data"    # per-arm counts, posteriors, the rules' evidence
    DSMB_DECISION = "dsmb_decision"
    AUDIT = "audit"                      # audit events, verify, export
    RECORD_ASSESSMENT = "record_assessment"    # assessments and their corrections
    DISCONTINUE_TREATMENT = "discontinue_treatment"  # and declaring a patient lost
    READ_PATIENT_EFFICACY = "read_patient_efficacy"  # one patient's efficacy trajectory
    READ_EFFICACY_SUMMARY = "read_efficacy_summary"  # per-arm response rates, sustainability
    READ_WORKLIST = "read_worklist"      # a site's patients and visits due
    READ_REPORTS = "read_reports"        # the DSMB report, SDTM exports, FHIR views


ALL_ROLES = frozenset({*SITE_ROLES, "monitor", "dsmb", "admin"})
# Which roles may do what. Site roles (site_coordinator, investigator, pharmacist) act only on
# their own site's patients; the other roles are trial-wide.
MATRIX: dict[Action, frozenset[str]] = {
    Action.ENROL: frozenset({"site_coordinator", "investigator"}),
    Action.CROSSOVER: frozenset({"investigator"}),
    Action.DOSE: frozenset({"site_coordinator", "investigator", "pharmacist"}),
    Action.READ_PATIENT: ALL_ROLES,
    Action.REPORT_SAFETY: frozenset({"site_coordinator", "investigator"}),
    Action.READ_SAFETY_STATUS: ALL_ROLES,
    # Comparative interim safety data belong to the DSMB (FDA guidance on data monitoring
    # committees, 2006; ICH E9), even in an open-label trial; monitors see the firings.
    Action.READ_RULE_FIRINGS: frozenset({"monitor", "dsmb", "admin"}),
    Action.READ_INTERIM_DATA: frozenset({"dsmb", "admin"}),
    Action.DSMB_DECISION: frozenset({"dsmb"}),
    Action.AUDIT: frozenset({"monitor", "dsmb", "admin"}),
    Action.RECORD_ASSESSMENT: frozenset({"site_coordinator", "investigator"}),
    Action.DISCONTINUE_TREATMENT: frozenset({"investigator"}),
    # The contract's "own site": the site's clinical staff (pharmacists prepare doses; they
    # have no need of efficacy data).
    Action.READ_PATIENT_EFFICACY: frozenset({"site_coordinator", "investigator", "monitor",
                                             "dsmb", "admin"}),
    Action.READ_EFFICACY_SUMMARY: frozenset({"investigator", "monitor", "dsmb", "admin"}),
    Action.READ_WORKLIST: frozenset({"site_coordinator", "investigator", "pharmacist",
                                     "monitor", "admin"}),
    Action.READ_REPORTS: frozenset({"monitor", "dsmb", "admin"}),
}


def allowed(who: Principal, action: Action) -> bool:
    return who.role in MATRIX[action]


def authorize(who: Principal, action: Action) -> None:
    """403 unless the caller's role may do `action` at all."""
    if not allowed(who, action):
        raise Refused("forbidden", f"Role {who.role} may not {action.value.replace('_', ' ')}")


def sees_site(who: Principal, site_id: str | None) -> bool:
    return not who.is_site_role or (site_id is not None and who.site == site_id)


def authorize_patient(who: Principal, action: Action, site_id: str | None) -> None:
    """For an existing patient: another site's patient is 404 (its existence must not leak),
    then 403 if the role may not do `action`."""
    if not sees_site(who, site_id):
        raise Refused("patient_not_found", "No such patient")
    authorize(who, action)


def authorize_site(who: Principal, action: Action, site_id: str) -> None:
    """For a new record at a site the caller names (a screening): 403 for another site."""
    authorize(who, action)
    if not sees_site(who, site_id):
        raise Refused("forbidden", "Site roles act only on their own site")
