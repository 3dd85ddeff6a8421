"""The example pharmacy subscriber, run as a process against the broker, for a scripted patient."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from tests.e2e.conftest import client
from tests.e2e.test_dosing_holds import hold_for, lift, publish_safety
from tests.e2e.test_dosing_patients import (
    CELLS_PER_KG,
    INFUSION_ARMS,
    give,
    randomized_patient,
    schedule_of,
)
from tooling.launcher import System

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pharmacy_subscriber.py"


async def test_the_pharmacy_sees_the_schedule_the_infusion_and_the_hold(system: System) -> None:
    async with client(system) as site:
        patient_id, arm = await randomized_patient(site, INFUSION_ARMS)
        subscriber = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--bootstrap", system.bootstrap,
            "--group", f"pharmacy-{uuid.uuid4().hex[:8]}", "--patient", patient_id,
            "--until", "DosingResumed", "--max-seconds", "240",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await schedule_of(site, patient_id)
            r = await give(site, patient_id, arm)
            assert r.status_code == 201, r.text
            hold = hold_for(patient_id)
            await publish_safety(system.bootstrap, hold)
            await schedule_of(site, patient_id, until=lambda s: s["holds"])
            await publish_safety(system.bootstrap, lift(hold))
            out, err = await asyncio.wait_for(subscriber.communicate(), 300)
        finally:
            if subscriber.returncode is None:
                subscriber.kill()
                await subscriber.wait()
    assert subscriber.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    cells = CELLS_PER_KG[arm] * 70
    prepare = [line for line in lines if line.startswith(f"PREPARE patient={patient_id} ")]
    # Six infusions from the schedule, six again when the week-0 dose fixes day 0.
    assert len(prepare) == 12 and all(f"product=UC-MSC cells={cells}" in p for p in prepare)
    assert f"GIVEN patient={patient_id} week=0 product=UC-MSC cells={cells} lot=L-E2E-1" in lines
    stop = f"STOP preparing product=any for patient {patient_id} (rule R4-infusion-reaction, " \
           f"hold {hold.hold_id})"
    restart = f"RESTART preparing product=any for patient {patient_id} (hold {hold.hold_id} lifted)"
    assert stop in lines and restart in lines
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in (
        f"SCHEDULE patient={patient_id}", f"GIVEN patient={patient_id}", stop, restart)]
    assert order == sorted(order)
