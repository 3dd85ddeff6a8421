"""The public routes: each path template, the service that owns it and the Action it needs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.permissions import Action


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    # Even parts are literal text, odd parts are parameter names: one path segment each.
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    action: Action
    service: str
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.template))

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.pattern.match(path) is not None


# The public contract's routes, nothing else: the gateway forwards only these. Tests generate the
# permission table (every route x every role x own and other site) from this same list.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/screenings", Action.ENROL, "randomization"),
    Route("POST", "/v1/patients", Action.ENROL, "randomization"),
    Route("GET", "/v1/patients/{patient_id}", Action.READ_PATIENT, "randomization"),
    Route("POST", "/v1/patients/{patient_id}/randomization", Action.ENROL, "randomization"),
    Route("POST", "/v1/patients/{patient_id}/withdrawal", Action.ENROL, "randomization"),
    Route("POST", "/v1/patients/{patient_id}/crossover", Action.CROSSOVER, "randomization"),
    Route("GET", "/v1/patients/{patient_id}/schedule", Action.READ_PATIENT, "dosing"),
    Route("POST", "/v1/patients/{patient_id}/infusions", Action.DOSE, "dosing"),
    Route("POST", "/v1/patients/{patient_id}/methotrexate-doses", Action.DOSE, "dosing"),
    Route("POST", "/v1/patients/{patient_id}/adverse-events", Action.REPORT_SAFETY, "safety"),
    Route("POST", "/v1/patients/{patient_id}/adverse-events/{adverse_event_id}/follow-ups",
          Action.REPORT_SAFETY, "safety"),
    Route("POST", "/v1/patients/{patient_id}/lab-results", Action.REPORT_SAFETY, "safety"),
    Route("GET", "/v1/safety/status", Action.READ_SAFETY_STATUS, "safety"),
    Route("POST", "/v1/safety/decisions", Action.DSMB_DECISION, "safety"),
    Route("POST", "/v1/patients/{patient_id}/assessments", Action.RECORD_ASSESSMENT, "efficacy"),
    Route("POST", "/v1/patients/{patient_id}/assessments/{assessment_id}/corrections",
          Action.RECORD_ASSESSMENT, "efficacy"),
    Route("POST", "/v1/patients/{patient_id}/treatment-discontinuation",
          Action.DISCONTINUE_TREATMENT, "efficacy"),
    Route("POST", "/v1/patients/{patient_id}/lost-to-follow-up", Action.DISCONTINUE_TREATMENT,
          "efficacy"),
    Route("GET", "/v1/patients/{patient_id}/efficacy", Action.READ_PATIENT_EFFICACY, "efficacy"),
    Route("GET", "/v1/efficacy/summary", Action.READ_EFFICACY_SUMMARY, "efficacy"),
    Route("GET", "/v1/patients", Action.READ_WORKLIST, "dosing"),
    Route("GET", "/v1/visits", Action.READ_WORKLIST, "dosing"),
    Route("GET", "/v1/reports/dsmb", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/exports/sdtm", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/exports/sdtm/{domain}", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/fhir/ResearchStudy/{study_id}", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/fhir/ResearchSubject", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/fhir/AdverseEvent", Action.READ_REPORTS, "audit"),
    Route("GET", "/v1/audit/events", Action.AUDIT, "audit"),
    Route("GET", "/v1/audit/verify", Action.AUDIT, "audit"),
    Route("GET", "/v1/audit/export", Action.AUDIT, "audit"),
    Route("GET", "/v1/audit/patients/{patient_id}/history", Action.AUDIT, "audit"),
)


def match_route(method: str, path: str) -> Route | None:
    return next((r for r in ROUTES if r.matches(method, path)), None)


def route_for(method: str, path: str) -> str | None:
    """The owning service of a public route, or None (the gateway answers 404)."""
    route = match_route(method, path)
    return route.service if route else None
