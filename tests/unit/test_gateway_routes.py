"""The gateway's route table: what it forwards, to whom, under which Action; and that it covers
every public route the services define."""

from __future__ import annotations

import importlib

import pytest
from fastapi.routing import APIRoute

from services.gateway.routes import ROUTES, Route, match_route, route_for
from shared.permissions import Action
from shared.settings import SERVICES


def test_templates_match_one_segment_per_parameter() -> None:
    route = Route("POST", "/v1/patients/{patient_id}/adverse-events/{adverse_event_id}/follow-ups",
                  Action.REPORT_SAFETY, "safety")
    assert route.matches("POST", "/v1/patients/PT-1/adverse-events/AE-2/follow-ups")
    assert not route.matches("GET", "/v1/patients/PT-1/adverse-events/AE-2/follow-ups")
    assert not route.matches("POST", "/v1/patients/PT-1/adverse-events/follow-ups")
    assert not route.matches("POST", "/v1/patients/PT-1/x/adverse-events/AE-2/follow-ups")
    assert not route.matches("POST", "/v1/patients/PT-1/adverse-events/AE-2/follow-ups/x")


@pytest.mark.parametrize(("method", "path", "service", "action"), [
    ("POST", "/v1/screenings", "randomization", Action.ENROL),
    ("POST", "/v1/patients", "randomization", Action.ENROL),
    ("GET", "/v1/patients/PT-1", "randomization", Action.READ_PATIENT),
    ("POST", "/v1/patients/PT-1/randomization", "randomization", Action.ENROL),
    ("POST", "/v1/patients/PT-1/withdrawal", "randomization", Action.ENROL),
    ("POST", "/v1/patients/PT-1/crossover", "randomization", Action.CROSSOVER),
    ("GET", "/v1/patients/PT-1/schedule", "dosing", Action.READ_PATIENT),
    ("POST", "/v1/patients/PT-1/infusions", "dosing", Action.DOSE),
    ("POST", "/v1/patients/PT-1/methotrexate-doses", "dosing", Action.DOSE),
    ("POST", "/v1/patients/PT-1/adverse-events", "safety", Action.REPORT_SAFETY),
    ("POST", "/v1/patients/PT-1/lab-results", "safety", Action.REPORT_SAFETY),
    ("GET", "/v1/safety/status", "safety", Action.READ_SAFETY_STATUS),
    ("POST", "/v1/safety/decisions", "safety", Action.DSMB_DECISION),
    ("GET", "/v1/audit/events", "audit", Action.AUDIT),
    ("GET", "/v1/audit/verify", "audit", Action.AUDIT),
    ("GET", "/v1/audit/export", "audit", Action.AUDIT),
    ("GET", "/v1/audit/patients/PT-1/history", "audit", Action.AUDIT),
])
def test_each_contract_route_goes_to_its_service_under_its_action(
        method: str, path: str, service: str, action: Action) -> None:
    route = match_route(method, path)
    assert route is not None and (route.service, route.action) == (service, action)
    assert route_for(method, path) == service


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/screenings"), ("DELETE", "/v1/patients/PT-1"), ("POST", "/v1/patients/PT-1"),
    ("GET", "/v1/patients/PT-1/schedule/extra"), ("GET", "/v1/audit/anything"),
    ("POST", "/internal/access-denied"), ("GET", "/v1/patients//schedule"), ("GET", "/healthz"),
])
def test_anything_else_is_not_forwarded(method: str, path: str) -> None:
    assert match_route(method, path) is None


def test_routes_are_unique() -> None:
    keys = [(r.method, r.template) for r in ROUTES]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("service", SERVICES)
def test_every_public_route_of_every_service_is_forwarded_to_it(service: str) -> None:
    spec = importlib.import_module(f"services.{service}.app").spec
    public = [(m, r.path) for r in spec.router.routes if isinstance(r, APIRoute)
              and r.path.startswith("/v1/") for m in sorted(r.methods or ())]
    assert public
    for method, path in public:
        route = match_route(method, path)
        assert route is not None, f"{method} {path}: add it to services/gateway/routes.py"
        assert route.service == service
