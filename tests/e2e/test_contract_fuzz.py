"""The public contract, fuzzed: schemathesis draws requests from the gateway's own OpenAPI document
and sends them through the gateway, and straight at each route's own service (which the services'
network may reach), to the real services, database and broker.

For every public operation, called with a token whose role may call it:
- schema-valid requests (positive) and schema-violating ones (negative) never get a 5xx;
- every 4xx is `application/problem+json` carrying its status and a machine-readable code;
- a schema-violating request is refused with a 4xx and writes nothing: every service's event store
  is at the same position after all of them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import negative_data_rejection

from deploy import infra
from services.gateway.routes import ROUTES, Route, match_route
from shared.permissions import MATRIX
from shared.store import EventStore
from tests.conftest import Broker, _new_broker
from tests.e2e.conftest import screening, start_system, token
from tests.support import eventually
from tooling.launcher import System

SITE = "S1"
# Per operation and mode: ~600 requests, under a minute on two cores. Generation is derandomized, so
# every run sends the same requests; TRIAL_FUZZ_EXAMPLES=500 digs deeper by hand.
EXAMPLES = int(os.environ.get("TRIAL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_system(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A system of its own: positive requests do write, and nothing else should see them."""
    folder = tmp_path_factory.mktemp("fuzz")
    broker: Broker = _new_broker(folder / "broker")
    system, created = start_system(broker, pg_dsn, folder, env={
        # ~1000 requests in seconds from one caller: the rate limit has tests of its own.
        "TRIAL_RATE_LIMIT_PER_S": "100000", "TRIAL_RATE_LIMIT_BURST": "100000"})
    try:
        yield system
    finally:
        system.stop()
        broker.stop()
        for name in created:
            assert pg_dsn is not None
            infra.drop_database(pg_dsn, name)


def _label(route: Route) -> str:
    return f"{route.method} {route.template}"  # as schemathesis names the operation


def _role_for(method: str, template: str) -> str:
    """A role allowed to call the route, a site role (at S1) when there is one."""
    route = next(r for r in ROUTES if r.method == method and r.template == template)
    roles = MATRIX[route.action]
    return next((r for r in ("site_coordinator", "investigator") if r in roles), sorted(roles)[0])


def _headers(role: str) -> dict[str, str]:
    site = SITE if role in ("site_coordinator", "investigator", "pharmacist") else None
    return {"Authorization": f"Bearer {token(role, site)}"}


def _writes_since(system: System, heads: dict[str, int] | None) -> dict[str, list[str]]:
    """Each service's event types after `heads` (its positions now, when `heads` is None)."""

    async def read() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for service, url in system.database_urls.items():
            store = EventStore(url)
            try:
                if heads is None:
                    found[service] = [str(await store.head())]
                else:
                    found[service] = [e.type for e in await store.read_all(after=heads[service])]
            finally:
                await store.close()
        return found

    return asyncio.run(read())


def _heads(system: System) -> dict[str, int]:
    return {service: int(head) for service, (head,) in _writes_since(system, None).items()}


@pytest.fixture(scope="module")
def patient(fuzz_system: System) -> str:
    """One randomized patient at S1 that every service has heard of, so that generated requests
    also reach past the 404s, and nothing is still being derived from it once fuzzing starts.
    Made once, before any fuzzing: schema-valid requests may well halt the trial (a grade 5
    adverse event is schema-valid), after which no new patient could be randomized."""
    system = fuzz_system
    with httpx.Client(base_url=system.url(), timeout=30, headers=_headers("site_coordinator")) as c:
        r = c.post("/v1/screenings", json=screening(SITE))
        assert r.status_code == 201, r.text
        r = c.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
        assert r.status_code == 201, r.text
        patient = str(r.json()["patient_id"])
        r = c.post(f"/v1/patients/{patient}/randomization")
        assert r.status_code in (200, 201), r.text

        def known_everywhere() -> bool:
            schedule = c.get(f"/v1/patients/{patient}/schedule")
            # A follow-up of no adverse event: refused for the event, not the patient, once
            # safety has heard of the patient.
            probe = c.post(f"/v1/patients/{patient}/adverse-events/AE-NONE/follow-ups", json={})
            # Efficacy knows the patient, and the assessment visits from dosing's calendar.
            efficacy = c.get(f"/v1/patients/{patient}/efficacy")
            return (schedule.status_code == 200 and probe.json().get("code") != "patient_not_found"
                    and efficacy.status_code == 200 and bool(efficacy.json()["visits"]))

        asyncio.run(eventually(known_everywhere, 120,
                               "dosing, safety and efficacy to know the patient"))
        return patient


def _broken(case: Case) -> bool:
    """A negative case that breaks the schema in its query, path or body. Headers do not count:
    the only one in the contract is Authorization, and the test sends a valid token of its own."""
    meta = case.meta
    return meta is not None and any(
        info.mode is GenerationMode.NEGATIVE and location.value in ("query", "path", "body")
        for location, info in meta.components.items())


def _check_answer(case: Case, response: Response, mode: GenerationMode) -> None:
    status = response.status_code
    what = f"{case.method} {case.formatted_path} ({mode.value}) -> {status}"
    assert status < 500, f"{what}: {response.content[:500]!r}"
    if mode is GenerationMode.NEGATIVE:
        # Schemathesis' own judge of "broke the schema, yet was accepted": it knows which of its
        # violations do not survive being sent (an object as a query value goes out as its keys,
        # an empty list not at all) and so leave a valid request.
        case.validate_response(response, checks=[negative_data_rejection])
        # A write, though, is never let through: every POST broken in its path or body is refused.
        if case.method == "POST":
            assert 400 <= status < 500, f"{what}: a write outside the contract was not refused"
    if status >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/problem+json"), f"{what}: {content_type}"
        problem = json.loads(response.content)
        assert problem["status"] == status and problem.get("code"), f"{what}: {problem}"


def _operations(system: System) -> list[APIOperation]:
    schema = schemathesis.openapi.from_url(f"{system.url()}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document does not load: {result.err()}"
        operations.append(result.ok())
    public = [op for op in operations if match_route(op.method.upper(), op.path) is not None
              or any(r.method == op.method.upper() and r.template == op.path for r in ROUTES)]
    # The document is the contract: every public route is in it, and fuzzed.
    assert {(op.method.upper(), op.path) for op in public} == {(r.method, r.template) for r in ROUTES}
    return public


def _fuzz_operation(system: System, session: requests.Session, operation: APIOperation,
                    mode: GenerationMode, patient: str | None, via: str) -> int:
    """EXAMPLES cases of one operation, through the gateway or straight at the service that owns
    it (which its own network may reach); returns how many requests were sent."""
    sent = 0
    route = next(r for r in ROUTES if _label(r) == operation.label)
    base_url = system.url("gateway" if via == "gateway" else route.service)
    headers = _headers(_role_for(operation.method.upper(), operation.path))
    fixed = {"patient_id": patient} if patient and "{patient_id}" in operation.path else None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed, headers=headers)
    if mode is GenerationMode.NEGATIVE:
        strategy = strategy.filter(_broken)  # still broken once our valid token replaces theirs

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Case) -> None:
        nonlocal sent
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        sent += 1
        _check_answer(case, response, mode)

    with contextlib.suppress(Unsatisfiable):  # nothing left to break but headers: none sent
        run()
    return sent


def _fuzz(system: System, mode: GenerationMode, patient: str | None, via: str) -> dict[str, int]:
    """Every public operation; returns how many requests each was sent."""
    with requests.Session() as session:
        return {operation.label: _fuzz_operation(system, session, operation, mode, patient, via)
                for operation in _operations(system)}


VIA = pytest.mark.parametrize("via", ["gateway", "service"])


@VIA
def test_requests_outside_the_contract_are_refused_with_a_problem_and_write_nothing(
        fuzz_system: System, patient: str, via: str) -> None:
    before = _heads(fuzz_system)
    assert before["randomization"] > 0  # the patient above is in it: the heads are real positions
    known, unknown = (_fuzz(fuzz_system, GenerationMode.NEGATIVE, p, via) for p in (patient, None))
    # Every write that takes a body was sent broken requests, for the real patient and for
    # made-up ones (POST .../randomization has only the patient to break).
    writes = [op.label for op in _operations(fuzz_system) if op.method.upper() == "POST" and op.body]
    assert len(writes) >= 8
    assert [w for w in writes if not (known[w] and unknown[w])] == [], (known, unknown)
    # The only record a refused request may leave is the access log's: a POST answered 403/404
    # (a probe for a patient that is not there) is kept as AccessDenied, on purpose (D19). The
    # audit ledger is left out: it copies every service's events, AccessDenied included.
    written = _writes_since(fuzz_system, before)
    assert {service: [t for t in types if t != "AccessDenied"]
            for service, types in written.items() if service != "audit"} \
        == {service: [] for service in written if service != "audit"}, written


@VIA
def test_requests_inside_the_contract_never_get_a_server_error(fuzz_system: System, patient: str,
                                                               via: str) -> None:
    for sent in (_fuzz(fuzz_system, GenerationMode.POSITIVE, p, via) for p in (patient, None)):
        # Every route was called; those with something to vary, up to EXAMPLES times (hypothesis
        # stops early when a route has one request only, like GET /v1/audit/verify).
        assert sorted(sent) == sorted(_label(r) for r in ROUTES) and min(sent.values()) >= 1, sent
        assert sum(sent.values()) >= EXAMPLES * 10, sent
