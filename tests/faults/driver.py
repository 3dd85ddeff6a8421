"""A load driver that behaves like the site systems the API is written for, while faults happen.

`LoadDriver.run` starts the site workflow for a new patient every 1/rate seconds (workflows run
concurrently), through the gateway: an eligible screening, the enrolment, the randomization, the
week-0 dose of the arm assigned, an adverse event no stopping rule counts (a grade 1 headache,
unlikely related, not serious, as bench/locustfile.py reports) and the week-0 (baseline)
assessment. Week 0 is an assessment week of the protocol and its window opens on the day the
calendar is anchored (the randomization day, then the first dose), so the baseline is recorded
the same day, after the dose, as a site does it.

Like a real site system, every POST carries an Idempotency-Key of its own, and on no answer
(connection refused or reset, a timeout), a 5xx, or an answer with Retry-After, it sends the
very same request (same key, same bytes) again after Retry-After, else after a short backoff
(0.2 s doubling to 2 s), until it gets a final answer or its deadline passes. Each attempt goes to
the next gateway of the list (replicas behind a load balancer). So a write the API acknowledged
(2xx) is one the site believes made, exactly once: what the accounting then checks.

What it records: every acknowledged write (`Ack`: step, route, key, status, body, when), every
final refusal (`Refusal`: a final non-2xx, or no final answer before the deadline) that stopped a
workflow, and a tally of every attempt (retries, statuses seen, answers without a status, and
each 500 with its request id, kept apart: the tests assert there were none).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.system import screening
from shared.auth import issue_dev_token
from shared.protocol import ProtocolConfig

# The service that owns each step's write (the gateway routes it there).
OWNER = {"screen": "randomization", "enrol": "randomization", "randomize": "randomization",
         "dose": "dosing", "adverse_event": "safety", "assessment": "efficacy"}
STEPS = tuple(OWNER)
PASI = (14.2, 24.0)  # below and at least the protocol's band threshold (20): four strata
ADVERSE_EVENT = {"term": "headache", "ctcae_grade": 1, "serious": False,
                 "relatedness": "unlikely", "expected": True, "infusion_related": False}


@dataclass(frozen=True)
class Ack:
    """A write the API acknowledged (2xx), as the site recorded it."""

    workflow: int
    step: str
    route: str  # the public route template
    path: str
    key: str  # its Idempotency-Key
    status: int
    body: dict[str, Any]
    gateway: str  # the gateway that answered
    sent_at: float  # monotonic: when the attempt that was answered was sent
    acked_at: float  # monotonic: when the answer arrived
    attempts: int
    replayed: bool  # `Idempotent-Replayed: true`: an earlier attempt's stored answer

    @property
    def service(self) -> str:
        return OWNER[self.step]


@dataclass(frozen=True)
class Refusal:
    """The final answer that stopped a workflow: a non-2xx that is not to be retried (status,
    problem code), or no final answer before the deadline (`code` "deadline", `status` the last
    seen, 0 for none)."""

    workflow: int
    step: str
    route: str
    path: str
    key: str
    status: int
    code: str
    body: str
    attempts: int
    at: float  # monotonic


@dataclass
class Workflow:
    """One patient's way through the steps: what was acknowledged, where it stopped."""

    number: int
    site: str
    acks: dict[str, Ack] = field(default_factory=dict)
    stopped: Refusal | None = None
    ineligible: bool = False
    error: str | None = None  # the driver's own failure (a bug here, not an answer)

    @property
    def complete(self) -> bool:
        return len(self.acks) == len(STEPS)


@dataclass
class Tally:
    """Every attempt the driver made and what it got back."""

    attempts: int = 0
    retries: int = 0  # attempts after the first of a request
    statuses: Counter[int] = field(default_factory=Counter)  # every answer, 0: none
    codes: Counter[str] = field(default_factory=Counter)  # "503 not_caught_up", ... (non-2xx)
    no_answer: Counter[str] = field(default_factory=Counter)  # by exception class
    server_errors: list[dict[str, Any]] = field(default_factory=list)  # every 500, in full
    slowest_attempt_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "retries": self.retries,
                "statuses": dict(sorted(self.statuses.items())),
                "codes": dict(self.codes.most_common()), "no_answer": dict(self.no_answer),
                "status_500": len(self.server_errors),
                "slowest_attempt_s": round(self.slowest_attempt_s, 2)}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _problem_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: not what this API sends; wait as for a plain retry
        return 1.0


class LoadDriver:
    """Site workflows for new patients at a steady rate, through `gateways`, until stopped.

    `secret` signs one site coordinator's token per site; `protocol` is the version the system
    runs (doses per arm); `sites` defaults to the protocol's. `request_deadline_s` bounds how
    long one request is retried; `attempt_timeout_s` how long one attempt waits for its answer
    (beyond the gateway's own upstream timeout, so its 504 is seen).
    """

    def __init__(self, gateways: Sequence[str], secret: str, protocol: ProtocolConfig,
                 rate_per_s: float, sites: Sequence[str] | None = None, *,
                 request_deadline_s: float = 60.0, attempt_timeout_s: float = 20.0,
                 first_backoff_s: float = 0.2, max_backoff_s: float = 2.0) -> None:
        if not gateways:
            raise ValueError("at least one gateway")
        self.gateways = list(gateways)
        self.protocol = protocol
        self.rate_per_s = rate_per_s
        self.sites = list(sites or protocol.sites)
        self.request_deadline_s = request_deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        run = uuid.uuid4().hex[:8]
        self.auth = {site: {"Authorization": "Bearer " + issue_dev_token(
            secret, "site_coordinator", site, sub=f"faults-{site}-{run}")} for site in self.sites}
        self.workflows: list[Workflow] = []
        self.acks: list[Ack] = []  # in the order they arrived
        self.refusals: list[Refusal] = []
        self.tally = Tally()
        self.in_flight = 0  # attempts sent and not yet answered
        self._turn = 0
        self._client: httpx.AsyncClient | None = None

    # --- what the tests read while it runs --------------------------------------------------

    def first_ack_through(self, service: str, sent_after: float) -> Ack | None:
        """The first acknowledged write sent after `sent_after` (monotonic) to `service`
        ("gateway": any write, since every one goes through it)."""
        return next((a for a in self.acks if a.sent_at > sent_after
                     and (service == "gateway" or a.service == service)), None)

    def acks_of(self, step: str) -> list[Ack]:
        return [a for a in self.acks if a.step == step]

    # --- the load ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start a workflow every 1/rate seconds until `stop` is set, then wait for the ones
        started to end (each request is bounded by its deadline)."""
        timeout = httpx.Timeout(self.attempt_timeout_s, connect=5.0)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self._client = client
            running: set[asyncio.Task[None]] = set()
            loop = asyncio.get_running_loop()
            next_start = loop.time()
            while not stop.is_set():
                workflow = Workflow(len(self.workflows), self.sites[len(self.workflows)
                                                                    % len(self.sites)])
                self.workflows.append(workflow)
                task = asyncio.create_task(self._workflow(workflow))
                running.add(task)
                task.add_done_callback(running.discard)
                next_start += 1 / self.rate_per_s
                # The pace of new patients, not a wait for a condition: the next start is due.
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, next_start - loop.time()))
                except TimeoutError:
                    pass
            if running:
                await asyncio.gather(*running)
            self._client = None

    async def _workflow(self, w: Workflow) -> None:
        try:
            await self._steps(w)
        except Exception as exc:  # recorded for the test to assert on; never swallowed unseen
            w.error = f"{type(exc).__name__}: {exc}"

    async def _steps(self, w: Workflow) -> None:
        pasi = PASI[(w.number // len(self.sites)) % len(PASI)]
        screened = screening(w.site, pasi)
        ack = await self._post(w, "screen", "/v1/screenings", "/v1/screenings", screened)
        if ack is None:
            return
        if not ack.body.get("eligible"):
            w.ineligible = True
            return
        ack = await self._post(w, "enrol", "/v1/patients", "/v1/patients",
                               {"screening_id": ack.body["screening_id"]})
        if ack is None:
            return
        patient = ack.body["patient_id"]
        base = f"/v1/patients/{patient}"
        ack = await self._post(w, "randomize", "/v1/patients/{id}/randomization",
                               f"{base}/randomization", None)
        if ack is None:
            return
        kind, body = self.dose(ack.body["arm"], float(screened["weight_kg"]))
        if await self._post(w, "dose", f"/v1/patients/{{id}}/{kind}", f"{base}/{kind}",
                            body) is None:
            return
        if await self._post(w, "adverse_event", "/v1/patients/{id}/adverse-events",
                            f"{base}/adverse-events",
                            {**ADVERSE_EVENT, "onset_at": _now()}) is None:
            return
        await self._post(w, "assessment", "/v1/patients/{id}/assessments",
                         f"{base}/assessments", {
                             "week": 0, "assessed_at": _now(), "pasi": {"total": pasi},
                             "bsa_percent": float(screened["bsa_percent"]),
                             "dlqi": {"total": int(screened["dlqi"])}, "spga": 3})

    def dose(self, arm: str, weight_kg: float) -> tuple[str, dict[str, Any]]:
        """The route (last segment) and body of the week-0 dose the protocol prescribes."""
        config = self.protocol.arms[arm]  # type: ignore[index]
        if config.kind == "infusion":
            assert config.cells_per_kg is not None
            return "infusions", {"week": 0, "given_at": _now(), "weight_kg": weight_kg,
                                 "cells_administered": round(config.cells_per_kg * weight_kg),
                                 "lot_number": "L-FAULTS-1"}
        assert config.mtx_titration_mg
        return "methotrexate-doses", {"week": 0, "dose_mg": config.mtx_titration_mg[0],
                                      "given_at": _now()}

    async def _post(self, w: Workflow, step: str, route: str, path: str,
                    body: dict[str, Any] | None) -> Ack | None:
        """Send one write until it has a final answer; the Ack, or None (the workflow stops,
        its Refusal recorded)."""
        assert self._client is not None
        key = str(uuid.uuid4())
        headers = {**self.auth[w.site], "Idempotency-Key": key}
        content: bytes | None = None
        if body is not None:  # the same bytes on every attempt: the key's request hash
            content = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        deadline = time.monotonic() + self.request_deadline_s
        backoff = self.first_backoff_s
        attempts, last_status, last_code, last_body = 0, 0, "", ""
        while True:
            gateway = self.gateways[self._turn % len(self.gateways)]
            self._turn += 1
            attempts += 1
            self.tally.attempts += 1
            if attempts > 1:
                self.tally.retries += 1
            sent = time.monotonic()
            wait: float | None
            try:
                r = await self._send(gateway + path, content, headers)
            except httpx.TransportError as exc:  # refused, reset, timed out: no answer
                self.tally.no_answer[type(exc).__name__] += 1
                self.tally.statuses[0] += 1
                last_status, last_code, last_body = 0, type(exc).__name__, str(exc)
                wait = None
            else:
                answered = time.monotonic()
                self.tally.slowest_attempt_s = max(self.tally.slowest_attempt_s, answered - sent)
                self.tally.statuses[r.status_code] += 1
                if 200 <= r.status_code < 300:
                    ack = Ack(w.number, step, route, path, key, r.status_code, r.json(), gateway,
                              sent, answered, attempts,
                              r.headers.get("idempotent-replayed") == "true")
                    w.acks[step] = ack
                    self.acks.append(ack)
                    return ack
                last_status, last_code, last_body = r.status_code, _problem_code(r), r.text
                self.tally.codes[f"{r.status_code} {last_code}".strip()] += 1
                if r.status_code == 500:
                    self.tally.server_errors.append({
                        "step": step, "path": path, "key": key, "attempt": attempts,
                        "request_id": r.headers.get("x-request-id"), "body": r.text[:2000]})
                wait = _retry_after(r)
                if r.status_code < 500 and wait is None:  # a final answer
                    self._refused(w, step, route, path, key, last_status, last_code, last_body,
                                  attempts)
                    return None
            pause = backoff if wait is None else wait
            backoff = min(backoff * 2, self.max_backoff_s)
            if time.monotonic() + pause > deadline:
                self._refused(w, step, route, path, key, last_status,
                              f"deadline ({last_code})" if last_code else "deadline", last_body,
                              attempts)
                return None
            await asyncio.sleep(pause)  # the retry's pause, as the API asks (Retry-After)

    async def _send(self, url: str, content: bytes | None,
                    headers: dict[str, str]) -> httpx.Response:
        assert self._client is not None
        self.in_flight += 1
        try:
            return await self._client.post(url, content=content, headers=headers)
        finally:
            self.in_flight -= 1

    def _refused(self, w: Workflow, step: str, route: str, path: str, key: str, status: int,
                 code: str, body: str, attempts: int) -> None:
        refusal = Refusal(w.number, step, route, path, key, status, code, body[:2000], attempts,
                          time.monotonic())
        w.stopped = refusal
        self.refusals.append(refusal)

    def summary(self) -> dict[str, Any]:
        """Workflows, acknowledged writes per step, refusals by step and code, and the tally."""
        return {
            "workflows": len(self.workflows),
            "complete": sum(w.complete for w in self.workflows),
            "ineligible": sum(w.ineligible for w in self.workflows),
            "driver_errors": [w.error for w in self.workflows if w.error],
            "acknowledged": dict(Counter(a.step for a in self.acks)),
            "replayed": sum(a.replayed for a in self.acks),
            "refusals": dict(Counter(f"{r.step}: {r.status} {r.code}" for r in self.refusals)),
            **self.tally.summary(),
        }
