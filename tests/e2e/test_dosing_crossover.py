"""Crossover end to end, on a system of its own whose protocol copy allows it: the old arm's
open doses are cancelled and the new arm's calendar is planned and dosed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import infra
from shared.protocol import DEFAULT_PATH, load_protocol
from tests.conftest import REAL, Broker
from tests.e2e.conftest import client, start_system
from tests.e2e.test_dosing_patients import give, randomized_patient, schedule_of
from tooling.launcher import System


def crossover_protocol(folder: Path) -> Path:
    """The built-in protocol with crossover from methotrexate allowed at any time."""
    shutil.copytree(DEFAULT_PATH, folder)
    section = json.loads((folder / "randomization.json").read_text())
    section["crossover"].update({"enabled": True, "min_weeks_since_assignment": 0})
    (folder / "randomization.json").write_text(json.dumps(section))
    load_protocol(folder)
    return folder


@pytest.fixture(scope="module")
def crossover_system(pg_dsn: str | None,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """On a broker of its own: on the session's, the session system's services would share
    their consumer groups ("dosing", ...) with these and take some of their records."""
    folder = tmp_path_factory.mktemp("crossover")
    broker = Broker("kafka" if REAL else "tansu", infra.free_port(), folder / "broker")
    broker.start()
    system, created = start_system(
        broker, pg_dsn, folder, services=("randomization", "dosing", "gateway"),
        env={"TRIAL_PROTOCOL_DIR": str(crossover_protocol(folder / "protocol"))})
    yield system
    system.stop()
    broker.stop()
    for name in created:
        assert pg_dsn is not None
        infra.drop_database(pg_dsn, name)


async def test_crossover_cancels_the_old_arms_doses_and_plans_the_new_arm(
        crossover_system: System) -> None:
    system = crossover_system
    async with client(system) as site, client(system, "investigator") as investigator:
        patient_id, arm = await randomized_patient(site, frozenset({"mtx"}))
        await schedule_of(site, patient_id)
        r = await give(site, patient_id, arm)
        assert r.status_code == 201, r.text
        r = await investigator.post(f"/v1/patients/{patient_id}/crossover",
                                    json={"to_arm": "msc_high", "reason": "no PASI 50 response"})
        assert r.status_code == 200, r.text

        calendar = await schedule_of(site, patient_id, until=lambda s: s["arm"] == "msc_high")
        by_kind: dict[str, list[tuple[int, str]]] = {}
        for v in calendar["visits"]:
            by_kind.setdefault(v["kind"], []).append((v["week"], v["status"]))
        assert by_kind["methotrexate"] == [(0, "given")] + [(w, "cancelled") for w in range(1, 16)]
        assert by_kind["infusion"] == [(w, "planned") for w in (0, 1, 2, 3, 5, 7)]
        assert len(by_kind["assessment"]) == 8  # follow-up continues from the first day 0
        assert {v["arm"] for v in calendar["visits"] if v["kind"] == "infusion"} == {"msc_high"}

        r = await give(site, patient_id, "msc_high")
        assert r.status_code == 201, r.text
        assert (r.json()["arm"], r.json()["cells_administered"]) == ("msc_high", 210_000_000)
        r = await give(site, patient_id, "mtx", week=1)
        assert (r.status_code, r.json()["code"]) == (422, "wrong_arm")
