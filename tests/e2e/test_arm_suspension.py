"""An arm suspension neither leaks an allocation nor stalls a stratum (issue 10, defect 1), end to
end through the gateway: the DSMB holds msc_high, 30 patients are randomized among the open arms
with no refusal, the answers look alike whether or not an arm is suspended, and the statistician's
offline re-derivation from the secret equals what was assigned."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
from aiokafka import ConsumerRecord

from shared.events import ENROLLMENT, CloudEvent
from tests.e2e.conftest import client, screening, system_of_its_own
from tests.support import read_topic
from tooling.launcher import System

REPO = Path(__file__).resolve().parents[2]


async def randomize(site: httpx.AsyncClient, site_id: str) -> dict[str, Any]:
    r = await site.post("/v1/screenings", json=screening(site_id))
    r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
    r = await site.post(f"/v1/patients/{r.json()['patient_id']}/randomization")
    assert r.status_code == 201, r.text  # never refused
    answer: dict[str, Any] = r.json()
    return answer


async def hold_in_force(system: System, hold_ids: set[str]) -> None:
    """Randomization has recorded the DSMB's hold: from then on it applies it."""
    def seen(records: list[ConsumerRecord]) -> bool:
        events = (CloudEvent.from_bytes(r.value) for r in records)
        return hold_ids <= {e.data.get("hold_id") for e in events
                            if e.type == "RandomizationHoldApplied"}

    await read_topic(system.bootstrap, ENROLLMENT, until=seen, timeout=120)


def allocation_list(secret: str, stratum: str, count: int) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "allocation-list", "--secret", secret,
         "--stratum", stratum, "--count", str(count), "--json"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(line)["arm"] for line in out.splitlines()]


async def test_the_dsmb_holds_msc_high_and_30_patients_are_randomized_among_the_open_arms(
        pg_dsn: str | None, tmp_path: Path) -> None:
    secret = "suspension-secret-" + uuid.uuid4().hex
    with system_of_its_own(pg_dsn, tmp_path, ("randomization", "safety", "gateway"),
                           env={"TRIAL_RANDOMIZATION_SECRET": secret}) as system:
        async with client(system, site="S1") as site, client(system, site="S2") as other, \
                client(system, "dsmb", None) as dsmb:
            before = await randomize(other, "S2")  # an answer with no arm suspended
            r = await dsmb.post("/v1/safety/decisions", json={
                "scope": "arm", "target": "msc_high", "decision": "hold",
                "rationale": "Interim review: hold msc_high pending the DSMB's case review."})
            assert r.status_code == 201, r.text
            await hold_in_force(system, {h["hold_id"] for h in r.json()["held"]})

            answers = [await randomize(site, "S1") for _ in range(30)]
    assert {a["arm"] for a in answers} <= {"msc_low", "mtx"}
    assert {a["arm"] for a in answers} == {"msc_low", "mtx"}  # both open arms are drawn
    assert all(a.keys() == before.keys() for a in answers)  # alike in form
    assert {a["stratum"] for a in answers} == {"S1:pasi_lt20"}
    # The statistician re-derives the sequence over the open arms from the secret alone.
    assigned = [a["arm"] for a in sorted(answers, key=lambda a: a["randomization_number"])]
    assert assigned == allocation_list(secret, "S1:pasi_lt20|msc_low+mtx", 30)
