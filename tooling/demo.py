"""`trial demo`: a whole trial on an accelerated clock, against a running system, through the
public HTTP API and Kafka only (issue 14).

57 patients over the protocol's two sites, with screen failures that fail real eligibility
criteria; the doses of each arm's schedule and the PASI assessments to week 52; adverse events,
one of which (a grade 3 infusion reaction) trips R4 and holds the patient until a DSMB decision
lifts it; missed visits (their windows left to close, the services' sweeps mark them); one
treatment discontinuation and one withdrawal. It ends with a table per arm whose every figure is
checked against the audit ledger (and the efficacy summary, and the doses on trial.dosing), and
with the audit chain's verification. Exit 0 only when every check matched and the chain verified.

The clock: randomization and safety read the wall clock, dosing and efficacy read "now" from
the clock file the system was started with (`trial run --clock-file`). Every patient is
randomized today, week 0 (first doses, baselines, and every adverse event: safety refuses an
onset in its own future) happens now, and the demo then moves the file clock from one visit
date to the next, to a minute after each visit's time. Without `--url`, the demo starts
`trial run --clock-file` itself on free ports in a temporary data folder, and stops it at the
end: the trial enrols to its cap (57), so it needs an empty system, and moving the clock of a
system that holds anyone's data would corrupt it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import typer

ARMS = ("msc_low", "msc_high", "mtx")
SITES = ("S1", "S2")
SITE_ZONE = ZoneInfo("Asia/Shanghai")  # both sites of protocol v1
WAIT = 120.0  # seconds any eventually-consistent view may take
CONCURRENCY = 6
Json = dict[str, Any]


class DemoError(RuntimeError):
    """The system answered what the demo cannot go on from."""


# --- the script ---------------------------------------------------------------------------------

# Screenings that fail real criteria of protocol v1 (eligibility.json): (site, overrides, why).
SCREEN_FAILURES: list[tuple[str, Json, str]] = [
    ("S1", {"birth_date": "1958-03-02"}, "older than 60"),
    ("S1", {"pasi": 6.0, "bsa_percent": 5.0, "dlqi": 4}, "not moderate-to-severe"),
    ("S1", {"psoriasis_type": "guttate"}, "guttate psoriasis"),
    ("S2", {"prior_biologic_targets": ["IL-17"]}, "prior IL-17 biologic"),
    ("S2", {"hbv": True}, "hepatitis B"),
    ("S2", {"pregnant_or_lactating": True}, "pregnant"),
]
ELIGIBLE = 57
# Adverse events at week 0 (term, grade, serious, relatedness, expected, infusion_related):
# on a patient of this arm, the n-th of it. Only the infusion reaction is related grade >= 3.
ADVERSE_EVENTS: list[tuple[str, int, str, int, bool, str, bool, bool | None]] = [
    ("msc_high", 0, "Infusion related reaction", 3, False, "probable", True, True),  # trips R4
    ("msc_low", 1, "Fever", 1, False, "possible", True, True),
    ("msc_low", 2, "Headache", 1, False, "unlikely", True, False),
    ("msc_low", 3, "Upper respiratory infection", 2, False, "not_related", True, False),
    ("msc_high", 1, "Fever", 2, False, "possible", True, True),
    ("msc_high", 2, "Fatigue", 1, False, "possible", True, False),
    ("msc_high", 3, "Pruritus", 1, False, "unlikely", True, False),
    ("mtx", 1, "Nausea", 1, False, "probable", True, None),
    ("mtx", 2, "Nausea", 2, False, "probable", True, None),
    ("mtx", 3, "Appendicitis", 3, True, "not_related", False, None),
    ("mtx", 4, "Headache", 1, False, "unlikely", True, None),
]
HELD = ("msc_high", 0)  # the patient R4 holds
# Visits left to close undone: (arm, n-th patient of the arm, week, kind).
MISSES: list[tuple[str, int, int, str]] = [
    ("msc_low", 5, 5, "infusion"), ("mtx", 5, 9, "methotrexate"),
    ("mtx", 6, 8, "assessment"), ("msc_high", 5, 24, "assessment"),
    ("msc_low", 6, 36, "assessment")]
DISCONTINUED = ("mtx", 7, 6)  # after its week-6 dose, the investigator stops the treatment
WITHDRAWN = ("msc_low", 7, 10)  # withdraws consent in week 10
# Mean PASI improvement reached by week 12 per arm (a patient varies around it).
RESPONSE = {"msc_low": 0.62, "msc_high": 0.74, "mtx": 0.68}


@dataclass
class Patient:
    patient_id: str
    site: str
    arm: str
    weight_kg: float
    pasi: float
    rng: random.Random
    visits: list[Json] = field(default_factory=list)
    stopped_doses: bool = False
    withdrawn: bool = False


@dataclass
class Tally:
    """What the demo did and what the services answered, per arm."""

    per_arm: dict[str, Counter[str]] = field(
        default_factory=lambda: {arm: Counter() for arm in ARMS})
    trial: Counter[str] = field(default_factory=Counter)


# --- HTTP ---------------------------------------------------------------------------------------


class Api:
    """The gateway, with a development token per (role, site), retrying 429 and 503 as told."""

    def __init__(self, url: str, secret: Any) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=60)
        self.secret = secret
        self.tokens: dict[tuple[str, str | None], str] = {}
        self.requests = 0

    def _token(self, role: str, site: str | None) -> str:
        from shared.auth import issue_dev_token

        key = (role, site)
        if key not in self.tokens:
            self.tokens[key] = issue_dev_token(self.secret, role, site, f"demo-{role}", 6 * 3600)
        return self.tokens[key]

    async def call(self, method: str, path: str, role: str = "monitor", site: str | None = None,
                   body: Json | None = None, params: dict[str, str] | None = None,
                   expect: tuple[int, ...] = (200, 201)) -> Json:
        headers = {"Authorization": f"Bearer {self._token(role, site)}"}
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())  # a retry writes nothing twice
        deadline = time.monotonic() + WAIT
        while True:
            self.requests += 1
            try:
                r = await self.http.request(method, path, json=body, params=params,
                                            headers=headers)
            except httpx.TransportError as exc:
                raise DemoError(f"{method} {path}: the gateway at {self.http.base_url} did not "
                                f"answer ({exc!r})") from exc
            if r.status_code in (429, 503) and time.monotonic() < deadline:
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code not in expect:
                raise DemoError(f"{method} {path} -> {r.status_code}: {r.text[:500]}")
            found: Json = r.json()
            return found

    async def close(self) -> None:
        await self.http.aclose()


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT,
                every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; DemoError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


async def bounded(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, clock_time(hour, minute), SITE_ZONE).astimezone(UTC)


# --- the trial ----------------------------------------------------------------------------------


class Demo:
    def __init__(self, api: Api, clock_file: Path, progress: Any, seed: int) -> None:
        from shared.clock import FileClock

        self.api = api
        self.clock = FileClock(clock_file)
        self.progress = progress
        self.rng = random.Random(seed)
        self.patients: list[Patient] = []
        self.tally = Tally()
        self.notes: list[str] = []

    def by_arm(self, arm: str, n: int) -> Patient:
        return [p for p in self.patients if p.arm == arm][n]

    def at(self, when: datetime) -> None:
        self.clock.set(when)

    async def check_empty(self) -> None:
        summary = await self.api.call("GET", "/v1/efficacy/summary")
        randomized = sum(int(a.get("randomized", 0)) for a in summary["arms"].values())
        if randomized:
            raise DemoError(f"the system already holds {randomized} randomized patients: the "
                            "demo enrols the whole trial (57) and needs an empty system")

    def screening_body(self, site: str, number: str, overrides: Json) -> Json:
        rng = self.rng
        body: Json = {
            "site_id": site, "screening_number": number,
            "birth_date": date(rng.randint(1968, 2000), rng.randint(1, 12),
                               rng.randint(1, 28)).isoformat(),
            "sex": rng.choice(("female", "male")),
            "weight_kg": round(rng.uniform(52, 95), 1),
            "diagnosis_date": date(rng.randint(2010, 2023), rng.randint(1, 12),
                                   rng.randint(1, 28)).isoformat(),
            "psoriasis_type": "plaque", "pasi": round(rng.uniform(10.5, 32.0), 1),
            "bsa_percent": round(rng.uniform(10, 40), 1), "dlqi": rng.randint(8, 25),
            "conventional_therapy_failed": True, "drug_induced": False,
            "ongoing_psoriasis_treatment": False, "prior_biologic_targets": [],
            "active_infection": False, "recurrent_infections": False,
            "malignancy_history": False, "hiv": False, "hbv": False, "hcv": False,
            "pregnant_or_lactating": False, "planning_pregnancy": False,
            "can_attend_follow_up": True,
            "consent_signed_at": (datetime.now(UTC) - timedelta(days=1)).isoformat()}
        body.update(overrides)
        return body

    async def enrol(self) -> None:
        plan: list[tuple[str, Json, str | None]] = [
            (SITES[i % 2], {}, None) for i in range(ELIGIBLE)]
        for k, failure in enumerate(SCREEN_FAILURES):
            plan.insert(3 + 9 * k, failure)
        task = self.progress.add_task("screening and randomizing", total=len(plan))
        numbers: Counter[str] = Counter()
        bodies = []
        for site, overrides, why in plan:
            numbers[site] += 1
            bodies.append((site, self.screening_body(site, f"{site}-{numbers[site]:04d}",
                                                     overrides), why))

        async def one(site: str, body: Json, why: str | None) -> None:
            screened = await self.api.call("POST", "/v1/screenings", "site_coordinator", site,
                                           body)
            self.tally.trial["screened"] += 1
            if why is not None:
                if screened["eligible"]:
                    raise DemoError(f"a screening meant to fail ({why}) was found eligible")
                self.tally.trial["screen_failures"] += 1
                self.notes.append(f"screen failure at {site} ({why}): " + "; ".join(
                    r["criterion"] for r in screened["reasons"]))
            else:
                if not screened["eligible"]:
                    raise DemoError(f"an eligible screening was refused: {screened['reasons']}")
                enrolled = await self.api.call("POST", "/v1/patients", "site_coordinator", site,
                                               {"screening_id": screened["screening_id"]})
                pid = enrolled["patient_id"]
                assigned = await self.api.call("POST", f"/v1/patients/{pid}/randomization",
                                               "site_coordinator", site)
                self.patients.append(Patient(pid, site, assigned["arm"], body["weight_kg"],
                                             body["pasi"], random.Random(self.rng.random())))
                self.tally.per_arm[assigned["arm"]]["randomized"] += 1
            self.progress.advance(task)

        # In order, so randomization numbers follow screening order (the blocks are concealed).
        for site, body, why in bodies:
            await one(site, body, why)
        self.patients.sort(key=lambda p: (p.site, p.patient_id))
        for arm in ARMS:
            if self.tally.per_arm[arm]["randomized"] < 9:
                raise DemoError(f"arm {arm} has too few patients for the script")

    async def schedule(self, p: Patient, fixed: bool = False) -> list[Json]:
        async def read() -> Json | None:
            s = await self.api.call("GET", f"/v1/patients/{p.patient_id}/schedule",
                                    "site_coordinator", p.site, expect=(200, 404))
            return s if "visits" in s and (s.get("day_zero_fixed") or not fixed) else None

        found: Json = await until(read, f"the schedule of {p.patient_id}")
        p.visits = found["visits"]
        return p.visits

    # -- visits --

    def pasi_at(self, p: Patient, week: int) -> float:
        if week == 0:
            return p.pasi
        target = min(0.98, max(0.1, RESPONSE[p.arm] + p.rng.uniform(-0.22, 0.22)))
        gain = target * min(1.0, week / 12) if week <= 16 else target - 0.004 * (week - 16)
        return round(max(0.0, p.pasi * (1 - gain + p.rng.uniform(-0.03, 0.03))), 1)

    async def assess(self, p: Patient, visit: Json, at: datetime) -> None:
        week = visit["week"]
        body = {"week": week, "assessed_at": at.isoformat(),
                "pasi": {"total": min(72.0, self.pasi_at(p, week))},
                "bsa_percent": round(max(0.0, p.rng.uniform(2, 30) * (1 - week / 80)), 1),
                "dlqi": {"total": p.rng.randint(0, 12)}, "spga": p.rng.randint(0, 3)}
        r = await self.api.call("POST", f"/v1/patients/{p.patient_id}/assessments",
                                "site_coordinator", p.site, body)
        self.tally.per_arm[p.arm]["assessments"] += 1
        if week == 12 and r["pasi75"] and not r.get("after_treatment_discontinued"):
            self.tally.per_arm[p.arm]["pasi75_week12"] += 1

    async def dose(self, p: Patient, visit: Json, at: datetime) -> None:
        if visit["kind"] == "infusion":
            kind, body = "infusions", {
                "week": visit["week"], "given_at": at.isoformat(), "weight_kg": p.weight_kg,
                "cells_administered": visit["planned_cells"],
                "lot_number": f"UCMSC-{visit['week']:02d}-{p.site}"}
        else:
            kind, body = "methotrexate-doses", {"week": visit["week"],
                                                "dose_mg": visit["planned_dose_mg"],
                                                "given_at": at.isoformat()}
        await self.api.call("POST", f"/v1/patients/{p.patient_id}/{kind}", "site_coordinator",
                            p.site, body)
        self.tally.per_arm[p.arm]["doses"] += 1

    async def week_zero(self) -> None:
        start = datetime.now(UTC)
        self.at(start + timedelta(minutes=2))
        task = self.progress.add_task("week 0: baselines and first doses",
                                      total=len(self.patients))

        async def one(p: Patient) -> None:
            visits = {(v["week"], v["kind"]): v for v in await self.schedule(p)}
            await self.assess(p, visits[(0, "assessment")], start)
            await self.dose(p, next(v for k, v in visits.items()
                                    if k[0] == 0 and k[1] != "assessment"),
                            start + timedelta(seconds=30))
            self.progress.advance(task)

        await bounded([lambda p=p: one(p) for p in self.patients])  # type: ignore[misc]
        await bounded([lambda p=p: self.schedule(p, fixed=True)  # type: ignore[misc]
                       for p in self.patients])
        await self.adverse_events(start + timedelta(seconds=60))

    async def adverse_events(self, onset: datetime) -> None:
        held = self.by_arm(*HELD)
        dosed = self.tally.per_arm[held.arm]["randomized"]

        # R6 counts toxicities over the patients dosed in the arm: let safety know them all.
        async def safety_knows() -> bool:
            s = await self.api.call("GET", "/v1/safety/status", "dsmb")
            return bool(s["arms"][held.arm]["patients_dosed"] == dosed)

        await until(safety_knows, f"safety to count the {dosed} patients dosed in {held.arm}")
        task = self.progress.add_task("week 0: adverse events", total=len(ADVERSE_EVENTS))
        for arm, n, term, grade, serious, related, expected, infusion in ADVERSE_EVENTS:
            p = self.by_arm(arm, n)
            body: Json = {"term": term, "onset_at": onset.isoformat(), "ctcae_grade": grade,
                          "serious": serious, "relatedness": related, "expected": expected}
            if infusion is not None:
                body["infusion_related"] = infusion
            await self.api.call("POST", f"/v1/patients/{p.patient_id}/adverse-events",
                                "investigator", p.site, body)
            counts = self.tally.per_arm[p.arm]
            counts[f"ae_grade{min(grade, 3)}"] += 1
            counts["ae_serious"] += int(serious)
            self.progress.advance(task)

        status = await self.api.call("GET", "/v1/safety/status", "dsmb")
        fired = [f for f in status["triggered_rules"] if f["target"] == held.patient_id]
        holds = [h for h in status["patient_holds"] if h["patient_id"] == held.patient_id]
        if [f["rule_id"] for f in fired] != ["R4-infusion-reaction"] or not holds:
            raise DemoError(f"the infusion reaction did not hold its patient: {status}")
        others = [f for f in status["triggered_rules"] if f["target"] != held.patient_id]
        if others:
            raise DemoError(f"an unexpected stopping rule fired: {others}")
        self.tally.trial["stopping_rules_triggered"] += 1
        self.notes.append(f"R4-infusion-reaction held patient {held.patient_id} ({held.arm})")

        async def dosing_holds(expected: bool) -> bool:
            s = await self.api.call("GET", f"/v1/patients/{held.patient_id}/schedule",
                                    "site_coordinator", held.site)
            return bool(s["holds"]) == expected

        await until(lambda: dosing_holds(True), "dosing to enforce the R4 hold")
        await self.api.call("POST", "/v1/safety/decisions", "dsmb", None, {
            "scope": "patient", "target": held.patient_id, "decision": "resume",
            "rationale": "Reaction resolved with premedication; the DSMB reviewed the case and "
                         "allows the infusions to resume with a slower rate."})
        self.tally.trial["dsmb_decisions"] += 1
        await until(lambda: dosing_holds(False), "dosing to lift the hold after the DSMB")
        self.notes.append("the DSMB resumed its dosing (POST /v1/safety/decisions)")

    async def follow_up(self) -> None:
        misses = {(self.by_arm(arm, n).patient_id, week, kind)
                  for arm, n, week, kind in MISSES}
        for arm, _, _, kind in MISSES:
            self.tally.per_arm[arm]["missed_assessments" if kind == "assessment"
                                    else "missed_doses"] += 1
        stop = self.by_arm(*DISCONTINUED[:2])
        gone = self.by_arm(*WITHDRAWN[:2])
        days: dict[date, list[tuple[Patient, Json]]] = {}
        for p in self.patients:
            for v in p.visits:
                if v["week"] > 0:
                    days.setdefault(date.fromisoformat(v["due_date"]), []).append((p, v))
        anchor = min(days) - timedelta(days=7)
        task = self.progress.add_task("weeks 1 to 52: doses and assessments",
                                      total=sum(len(v) for v in days.values()))
        last_window = max(date.fromisoformat(v["window_end"]) for p in self.patients
                          for v in p.visits)
        pending = {(self.by_arm(arm, n).patient_id, week, kind): self.by_arm(arm, n)
                   for arm, n, week, kind in MISSES}
        for day in sorted(days):
            week = (day - anchor).days // 7
            self.progress.update(task, description=f"week {week:2d}: doses and assessments")
            self.at(local(day, 10, 5))
            # A window the script left open has closed: its sweep marks it missed before the
            # patient's next visit (a week-52 assessment would end the study first).
            for key in sorted(pending):
                p, w, kind = pending[key], key[1], key[2]
                visit = next(v for v in p.visits if (v["week"], v["kind"]) == (w, kind))
                if date.fromisoformat(visit["window_end"]) < day:
                    await self.marked_missed(p, w, kind)
                    del pending[key]
            jobs: list[Callable[[], Awaitable[None]]] = []
            for p, v in days[day]:
                skip = ((p.patient_id, v["week"], v["kind"]) in misses or p.withdrawn
                        or (p.stopped_doses and v["kind"] != "assessment"))
                if not skip:
                    act = self.assess if v["kind"] == "assessment" else self.dose
                    hour = 9 if v["kind"] == "assessment" else 10
                    jobs.append(lambda act=act, p=p, v=v, h=hour: act(  # type: ignore[misc]
                        p, v, local(date.fromisoformat(v["due_date"]), h)))
            await bounded(jobs)
            self.progress.advance(task, len(days[day]))
            if week == DISCONTINUED[2] and not stop.stopped_doses:
                await self.discontinue(stop)
            if week >= WITHDRAWN[2] and not gone.withdrawn:
                await self.withdraw(gone)
        # Past the last window: the sweeps close whatever is left.
        self.at(local(last_window + timedelta(days=1), 12))

    async def marked_missed(self, p: Patient, week: int, kind: str) -> None:
        async def missed() -> bool:
            visits = await self.schedule(p)
            return any((v["week"], v["kind"], v["status"]) == (week, kind, "missed")
                       for v in visits)

        await until(missed, f"the sweep to mark week {week}'s {kind} of {p.patient_id} missed")
        self.notes.append(f"missed: week {week} {kind} of {p.patient_id} ({p.arm}), marked by "
                          "the sweep once its window closed")

    async def discontinue(self, p: Patient) -> None:
        await self.api.call("POST", f"/v1/patients/{p.patient_id}/treatment-discontinuation",
                            "investigator", p.site,
                            {"reason": "persistent nausea despite folic acid"})
        p.stopped_doses = True
        self.tally.trial["treatment_discontinued"] += 1

        async def cancelled() -> bool:
            visits = await self.schedule(p)
            return all(v["status"] in ("given", "cancelled") for v in visits
                       if v["kind"] != "assessment")

        await until(cancelled, "dosing to cancel the discontinued patient's doses")
        self.notes.append(f"treatment discontinued: {p.patient_id} ({p.arm}), week "
                          f"{DISCONTINUED[2]}; assessments go on")

    async def withdraw(self, p: Patient) -> None:
        await self.api.call("POST", f"/v1/patients/{p.patient_id}/withdrawal",
                            "site_coordinator", p.site, {"reason": "withdrew consent (moved away)"})
        p.withdrawn = True
        self.tally.trial["withdrawn"] += 1

        async def ended() -> bool:
            visits = await self.schedule(p)
            view = await self.api.call("GET", f"/v1/patients/{p.patient_id}/efficacy",
                                       "site_coordinator", p.site)
            return view["disposition"]["study"] == "withdrawn" and all(
                v["status"] in ("given", "done", "cancelled") for v in visits)

        await until(ended, "dosing and efficacy to learn the withdrawal")
        self.notes.append(f"withdrawn: {p.patient_id} ({p.arm}), week {WITHDRAWN[2]}; every "
                          "later visit cancelled")

    def expected_completed(self) -> int:
        return sum(1 for p in self.patients if not p.withdrawn)


# --- the cross-checks ---------------------------------------------------------------------------


async def audit_events(api: Api, event_type: str) -> list[Json]:
    """Every ledger entry of one type, once each (by event id)."""
    found: dict[str, Json] = {}
    cursor: str | None = None
    while True:
        params = {"type": event_type, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = await api.call("GET", "/v1/audit/events", params=params)
        for item in page["items"]:
            found[item["event_id"]] = item
        cursor = page["next_cursor"]
        if cursor is None:
            return list(found.values())


async def audit_figures(api: Api) -> tuple[dict[str, Counter[str]], Counter[str]]:
    """The table's figures, counted from the audit ledger alone."""
    per_arm: dict[str, Counter[str]] = {arm: Counter() for arm in ARMS}
    trial: Counter[str] = Counter()
    for e in await audit_events(api, "ArmAssigned"):
        per_arm[e["data"]["arm"]]["randomized"] += 1
    for e in await audit_events(api, "InfusionGiven"):
        per_arm[e["data"]["arm"]]["doses"] += 1
    per_arm["mtx"]["doses"] += len(await audit_events(api, "MethotrexateDoseGiven"))
    for e in await audit_events(api, "AssessmentRecorded"):
        per_arm[e["data"]["arm"]]["assessments"] += 1
    for e in await audit_events(api, "VisitMissed"):
        kind = "missed_assessments" if e["data"]["kind"] == "assessment" else "missed_doses"
        per_arm[e["data"]["arm"]][kind] += 1
    for e in await audit_events(api, "AdverseEventReported"):
        d = e["data"]
        per_arm[d["arm"]][f"ae_grade{min(d['ctcae_grade'], 3)}"] += 1
        per_arm[d["arm"]]["ae_serious"] += int(d["serious"])
    screened = await audit_events(api, "PatientScreened")
    trial["screened"] = len(screened)
    trial["screen_failures"] = sum(1 for e in screened if not e["data"]["eligible"])
    for name, event_type in (("stopping_rules_triggered", "StoppingRuleTriggered"),
                             ("dsmb_decisions", "SafetyHoldLifted"),
                             ("treatment_discontinued", "TreatmentDiscontinued"),
                             ("withdrawn", "PatientWithdrawn"),
                             ("completed", "StudyCompleted"),
                             ("lost_to_follow_up", "LostToFollowUp")):
        trial[name] = len(await audit_events(api, event_type))
    return per_arm, trial


async def broker_doses(bootstrap: str, expected: dict[str, int]) -> dict[str, int]:
    """Doses per arm as a pharmacy reads them from trial.dosing (each event id once), with the
    environment's SASL settings and topic prefix (D48, D52)."""
    from aiokafka import AIOKafkaConsumer

    from shared.events import DOSING
    from shared.kafka import client_options, known_partitions, physical
    from shared.settings import Settings

    settings = Settings(kafka_bootstrap_servers=bootstrap)
    topic = physical(settings, DOSING)
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[str, str] = {}
    try:
        deadline = time.monotonic() + WAIT
        while not (tps := await known_partitions(consumer, topic)):
            if time.monotonic() > deadline:
                raise DemoError(f"{topic} never appeared on the broker")
            await asyncio.sleep(0.2)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=300)
            for records in batch.values():
                for record in records:
                    ce = json.loads(record.value)
                    if ce["type"] == "InfusionGiven":
                        seen[ce["id"]] = ce["data"]["arm"]
                    elif ce["type"] == "MethotrexateDoseGiven":
                        seen[ce["id"]] = "mtx"
            counts = {arm: sum(1 for a in seen.values() if a == arm) for arm in ARMS}
            if counts == expected or (not batch and time.monotonic() > deadline):
                return counts
    finally:
        await consumer.stop()


COLUMNS = [("randomized", "Randomized"), ("doses", "Doses given"),
           ("assessments", "Assessments"), ("missed_doses", "Missed doses"),
           ("missed_assessments", "Missed assess."), ("ae_grade1", "AE gr 1"),
           ("ae_grade2", "AE gr 2"), ("ae_grade3", "AE gr ≥3"), ("ae_serious", "Serious AE"),
           ("pasi75_week12", "PASI-75 wk 12 (NRI)")]
TRIAL_ROWS = [("screened", "screened"), ("screen_failures", "screen failures"),
              ("stopping_rules_triggered", "stopping rules triggered"),
              ("dsmb_decisions", "DSMB decisions lifting a hold"),
              ("treatment_discontinued", "treatments discontinued"),
              ("withdrawn", "withdrawals"), ("completed", "completed week 52"),
              ("lost_to_follow_up", "lost to follow-up")]


async def cross_check(api: Api, bootstrap: str | None, demo: Demo) -> Json:
    """Every figure from the demo's own tally beside the audit ledger's, the efficacy summary's
    and the broker's; polls until they agree (the ledger is fed by Kafka) or WAIT passes."""
    expected_trial = Counter(demo.tally.trial)
    expected_trial["completed"] = demo.expected_completed()
    expected_trial["lost_to_follow_up"] = 0
    wanted = {arm: {k: demo.tally.per_arm[arm][k] for k, _ in COLUMNS if k != "pasi75_week12"}
              for arm in ARMS}

    async def agreeing() -> tuple[dict[str, Counter[str]], Counter[str]] | None:
        per_arm, trial = await audit_figures(api)
        same = all(per_arm[a][k] == v for a in ARMS for k, v in wanted[a].items()) and all(
            trial[k] == expected_trial[k] for k, _ in TRIAL_ROWS)
        return (per_arm, trial) if same else None

    try:
        per_arm, trial = await until(agreeing, "the audit ledger to agree", every=1.0)
    except DemoError:
        per_arm, trial = await audit_figures(api)  # the table shows where it differs
    summary = await api.call("GET", "/v1/efficacy/summary")
    doses_on_broker = (await broker_doses(bootstrap, {a: wanted[a]["doses"] for a in ARMS})
                       if bootstrap else None)
    report: Json = {"arms": {}, "trial": {}, "ok": True}
    for arm in ARMS:
        row: Json = {}
        week12 = summary["arms"][arm].get("weeks", {}).get("12", {})
        nri = week12.get("nri", {}).get("pasi75", {})
        for key, _ in COLUMNS:
            if key == "pasi75_week12":
                checks = {"demo": demo.tally.per_arm[arm][key],
                          "efficacy_summary": nri.get("count")}
                value = nri.get("count")
                extra = {"n": nri.get("n"), "rate": nri.get("rate"), "ci95": nri.get("ci95")}
            else:
                checks = {"demo": demo.tally.per_arm[arm][key], "audit": per_arm[arm][key]}
                if key == "randomized":
                    checks["efficacy_summary"] = summary["arms"][arm].get("randomized")
                if key == "doses" and doses_on_broker is not None:
                    checks["kafka_trial_dosing"] = doses_on_broker[arm]
                value, extra = per_arm[arm][key], {}
            ok = len(set(checks.values())) == 1
            row[key] = {"value": value, "checks": checks, "ok": ok, **extra}
            report["ok"] &= ok
        report["arms"][arm] = row
    for key, _ in TRIAL_ROWS:
        checks = {"demo": expected_trial[key], "audit": trial[key]}
        ok = len(set(checks.values())) == 1
        report["trial"][key] = {"value": trial[key], "checks": checks, "ok": ok}
        report["ok"] &= ok
    verify = await api.call("GET", "/v1/audit/verify")
    report["verify"] = verify
    report["ok"] &= bool(verify["ok"])
    report["summary_generated_at"] = summary.get("generated_at")
    return report


def render(report: Json, notes: list[str], console: Any) -> None:
    from rich.table import Table

    table = Table(title="NCT03424629 on an accelerated clock: per arm, checked against the "
                        "audit ledger and the efficacy summary", show_lines=False)
    table.add_column("Arm", no_wrap=True)
    for _, title in COLUMNS:
        table.add_column(title, justify="right", no_wrap=True)
    for arm in ARMS:
        cells = []
        for key, _ in COLUMNS:
            cell = report["arms"][arm][key]
            text = str(cell["value"])
            if key == "pasi75_week12" and cell.get("n"):
                text = f"{cell['value']}/{cell['n']} ({100 * (cell['rate'] or 0):.0f} %)"
            if not cell["ok"]:
                text = f"[red]{text} ≠ {cell['checks']}[/red]"
            cells.append(text)
        table.add_row(arm, *cells)
    console.print(table)
    trial = Table(title="Trial-wide, checked against the audit ledger")
    trial.add_column("What")
    trial.add_column("Count", justify="right")
    for key, title in TRIAL_ROWS:
        cell = report["trial"][key]
        text = str(cell["value"]) if cell["ok"] else f"[red]{cell['value']} ≠ {cell['checks']}[/red]"
        trial.add_row(title, text)
    console.print(trial)
    for note in notes:
        console.print(f"  • {note}")
    v = report["verify"]
    colour = "green" if v["ok"] else "red"
    console.print(f"[{colour}]Audit chain: ok={v['ok']} events_checked={v['events_checked']} "
                  f"first_broken_position={v['first_broken_position']} "
                  f"anchors_checked={v.get('anchors_checked')}[/{colour}]")
    console.print("[green]Every figure matched the audit ledger and the efficacy summary."
                  "[/green]" if report["ok"] else
                  "[red]Some figure did not match (marked ≠ above), or the chain did not "
                  "verify.[/red]")


async def run_demo(url: str, bootstrap: str | None, clock_file: Path, seed: int) -> Json | None:
    """The demo and its closing table; the cross-checked report, or None if it stopped."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from shared.settings import Settings

    console = Console(width=None if sys.stdout.isatty() else 160)  # a log keeps the table whole
    api = Api(url, Settings().jwt_secret)
    started = time.monotonic()
    try:
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            demo = Demo(api, clock_file, progress, seed)
            await demo.check_empty()
            await demo.enrol()
            await demo.week_zero()
            await demo.follow_up()
            check = progress.add_task("cross-checking the audit ledger", total=None)
            report = await cross_check(api, bootstrap, demo)
            progress.update(check, total=1, completed=1)
        render(report, demo.notes, console)
    except DemoError as exc:
        console.print(f"[red]demo stopped: {exc}[/red]")
        return None
    finally:
        await api.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["requests"] = api.requests
    console.print(f"{api.requests} requests in {report['seconds']} s")
    return report


def _finish(report: Json | None, json_out: Path | None) -> int:
    if report is not None and json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return 0 if report is not None and report["ok"] else 1


# --- the command --------------------------------------------------------------------------------


def _own_system(folder: Path) -> tuple[subprocess.Popen[str], str, str, Path]:
    """`trial run --clock-file` on free ports in `folder`: (process, gateway, bootstrap, clock)."""
    from deploy import infra
    from shared.settings import SERVICES

    clock = folder / "clock.txt"
    env = {**os.environ, "TRIAL_DATA_DIR": str(folder / "data"),
           "TRIAL_GATEWAY_PORT": str(infra.free_port()),
           "TRIAL_RUN_KAFKA_PORT": str(infra.free_port()),
           **{f"TRIAL_{s.upper()}_PORT": str(infra.free_port()) for s in SERVICES}}
    proc = subprocess.Popen([sys.executable, "-m", "tooling.cli", "run", "--clock-file",
                             str(clock)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not any(line.startswith("Kafka bootstrap:") for line in lines):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise DemoError("trial run exited:\n" + "".join(lines))
        lines.append(line)
        typer.echo(line, nl=False)
    gateway = f"http://127.0.0.1:{env['TRIAL_GATEWAY_PORT']}"
    return proc, gateway, f"127.0.0.1:{env['TRIAL_RUN_KAFKA_PORT']}", clock


def demo(url: str | None = typer.Option(
             None, help="the gateway of a system started with `trial run --clock-file` and "
                        "holding no patient yet; omitted: the demo starts one of its own"),
         bootstrap: str | None = typer.Option(
             None, help="its Kafka bootstrap (the doses are also counted on trial.dosing)"),
         clock_file: Path | None = typer.Option(
             None, help="the clock file that system was started with (required with --url)"),
         seed: int = typer.Option(14, help="seeds the patients' data (not the allocation)"),
         json_out: Path | None = typer.Option(None, "--json",
                                              help="also write the closing table as JSON")
         ) -> None:
    """A whole trial on an accelerated clock: 57 patients, 52 weeks, adverse events, a DSMB
    decision, missed visits; a closing table checked against the audit ledger. Exit 0 only when
    every figure matched and the audit chain verified."""
    if url is not None:
        if clock_file is None:
            typer.echo("error: --clock-file is required with --url", err=True)
            raise typer.Exit(2)
        sys.exit(_finish(asyncio.run(run_demo(url.rstrip("/"), bootstrap, clock_file, seed)),
                         json_out))
    with tempfile.TemporaryDirectory(prefix="trial-demo-") as tmp:
        proc, gateway, broker, clock = _own_system(Path(tmp))
        try:
            code = _finish(asyncio.run(run_demo(gateway, bootstrap or broker, clock, seed)),
                           json_out)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    sys.exit(code)
