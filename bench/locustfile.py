"""Locust users for bench/load.py: a site coordinator's workflow, one new patient at a time.

bench/load.py runs this file headless, one locust process per step, with its environment:
LOAD_JWT_SECRET (the system's HS256 secret), LOAD_PACING_S (one workflow per user every so many
seconds, `constant_pacing`), LOAD_DOSE_AFTER_S (the pause between randomization and the dose),
LOAD_SAMPLES_FILE (where every request is written, one JSON line: `t` start time, `name` route
template, `ms`, `status`; for a failure also `error`, `request_id` and `path`) and
TRIAL_PROTOCOL_DIR (the protocol the system runs).

Each user is one site coordinator with a token of its own (its own `sub`, so its own rate-limit
bucket at the gateway; sites S1 and S2 in turn) and takes each patient through the gateway:
screening (eligible; baseline PASI below and above 20 in turn, so four strata), enrolment,
randomization, (after LOAD_DOSE_AFTER_S) the week-0 dose of the arm assigned (an infusion of
the protocol's cells per kg at the screening weight, or the first methotrexate titration dose)
and a grade 1 headache, unlikely related, not serious: an adverse event that no stopping rule
(R1-R8) counts, so the load never holds or halts the trial. Every POST carries an
Idempotency-Key of its own, as a site system sends. A request that got no answer, a 5xx or an
answer with Retry-After (503 `not_caught_up`, 409 `idempotency_key_in_progress`, 429) is sent
again with the same key after Retry-After (else 1 s), at most RETRIES times, as the API asks: a
write that committed is then replayed, never made twice. Each such answer counts as a failed
request. Any other answer than a 201 ends the patient's workflow (its remaining steps are not
sent).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust import FastHttpUser, constant_pacing, events, task

from bench.system import screening
from shared.auth import issue_dev_token
from shared.events import Arm
from shared.protocol import load_protocol

SECRET = os.environ.get("LOAD_JWT_SECRET", "")
PACING_S = float(os.environ.get("LOAD_PACING_S", "2"))
DOSE_AFTER_S = float(os.environ.get("LOAD_DOSE_AFTER_S", "0"))
PROTOCOL = load_protocol(Path(os.environ["TRIAL_PROTOCOL_DIR"])
                         if os.environ.get("TRIAL_PROTOCOL_DIR") else None)
SITES = tuple(PROTOCOL.sites)
PASI = (14.2, 24.0)  # below and at least the protocol's band threshold (20)
RETRIES = 5
ADVERSE_EVENT = {"term": "headache", "ctcae_grade": 1, "serious": False,
                 "relatedness": "unlikely", "expected": True, "infusion_related": False}
_SAMPLES_FILE = os.environ.get("LOAD_SAMPLES_FILE")
_samples = open(_SAMPLES_FILE, "a") if _SAMPLES_FILE else None  # closed when locust quits
_users = itertools.count()


@events.request.add_listener
def _record(name: str, response_time: float, response: Any, exception: Exception | None,
            start_time: float, url: str = "", **_: Any) -> None:
    if _samples is None:
        return
    status = getattr(response, "status_code", 0) or 0
    headers = getattr(response, "headers", None) or {}
    failed = exception is not None
    _samples.write(json.dumps({
        "t": start_time, "name": name, "ms": response_time, "status": status,
        "error": str(exception) if failed else None,
        "request_id": headers.get("x-request-id") if failed else None,
        "path": urlsplit(url).path if failed else None}) + "\n")


@events.quitting.add_listener
def _close(**_: Any) -> None:
    if _samples is not None:
        _samples.close()


def now() -> str:
    return datetime.now(UTC).isoformat()


def dose(arm: Arm, weight_kg: float) -> tuple[str, dict[str, Any]]:
    """The route and body of the week-0 dose of `arm`, as the protocol prescribes it."""
    config = PROTOCOL.arms[arm]
    if config.kind == "infusion":
        assert config.cells_per_kg is not None
        return "infusions", {"week": 0, "given_at": now(), "weight_kg": weight_kg,
                             "cells_administered": round(config.cells_per_kg * weight_kg),
                             "lot_number": "L-LOAD-1"}
    assert config.mtx_titration_mg
    return "methotrexate-doses", {"week": 0, "dose_mg": config.mtx_titration_mg[0],
                                  "given_at": now()}


class SiteCoordinator(FastHttpUser):
    wait_time = constant_pacing(PACING_S)
    connection_timeout = 10.0
    network_timeout = 60.0  # beyond the gateway's own upstream timeout (10 s): its 504 is seen

    def on_start(self) -> None:
        number = next(_users)
        self.site = SITES[number % len(SITES)]
        self.pasi = PASI[(number // len(SITES)) % len(PASI)]
        sub = f"load-{self.site}-{number}-{uuid.uuid4().hex[:8]}"
        token = issue_dev_token(SECRET, "site_coordinator", self.site, sub=sub)
        self.auth = {"Authorization": f"Bearer {token}"}

    def post(self, path: str, body: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        """POST with a fresh Idempotency-Key; the 201's body, or None (the failure recorded)."""
        headers = {**self.auth, "Idempotency-Key": str(uuid.uuid4())}
        for attempt in range(RETRIES + 1):
            with self.client.post(path, json=body, headers=headers, name=name,
                                  catch_response=True) as r:
                if r.status_code == 201:
                    answer: dict[str, Any] = r.json()
                    return answer
                code = ""
                if r.status_code and (r.headers or {}).get("content-type", "").endswith("json"):
                    code = r.json().get("code", "")
                r.failure(f"{r.status_code} {code or r.error or ''}".strip())
                retry_after = (r.headers or {}).get("retry-after")
                again = r.status_code == 0 or r.status_code >= 500 or retry_after is not None
            if not again or attempt == RETRIES:
                return None
            time.sleep(float(retry_after or 1))  # gevent's sleep: locust patches the stdlib
        return None

    @task
    def patient(self) -> None:
        screened = screening(self.site, self.pasi)
        answer = self.post("/v1/screenings", screened, "/v1/screenings")
        if answer is None:
            return
        answer = self.post("/v1/patients", {"screening_id": answer["screening_id"]},
                           "/v1/patients")
        if answer is None:
            return
        patient = answer["patient_id"]
        answer = self.post(f"/v1/patients/{patient}/randomization", None,
                           "/v1/patients/{id}/randomization")
        if answer is None:
            return
        if DOSE_AFTER_S:
            time.sleep(DOSE_AFTER_S)
        route, body = dose(answer["arm"], screened["weight_kg"])
        if self.post(f"/v1/patients/{patient}/{route}", body, f"/v1/patients/{{id}}/{route}") is None:
            return
        self.post(f"/v1/patients/{patient}/adverse-events", {**ADVERSE_EVENT, "onset_at": now()},
                  "/v1/patients/{id}/adverse-events")
