"""The safety service runs the protocol version it is started with: its stopping rules follow the
folder in TRIAL_PROTOCOL_DIR, and a folder without safety.json stops it before it serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy import infra
from shared.protocol import DEFAULT_PATH
from tests.e2e.conftest import client, screening, system_of_its_own
from tests.support import eventually

AMENDED_RULES = "1.0.0-r2-grade3"


def amended_protocol(folder: Path) -> Path:
    """Version 1 with R2 lowered to grade 3, and a cap of one patient."""
    shutil.copytree(DEFAULT_PATH, folder)
    safety = json.loads((folder / "safety.json").read_text())
    (r2,) = [r for r in safety["rules"] if r["id"] == "R2-related-grade4"]
    r2["adverse_events"] = [{"min_grade": 3, "related": True}]
    safety["rule_set_version"] = AMENDED_RULES
    (folder / "safety.json").write_text(json.dumps(safety))
    trial = json.loads((folder / "trial.json").read_text())
    (folder / "trial.json").write_text(json.dumps({**trial, "enrollment_cap": 1}))
    return folder


async def test_the_stopping_rules_follow_the_protocol_folder(pg_dsn: str | None,
                                                             tmp_path: Path) -> None:
    protocol = amended_protocol(tmp_path / "protocol")
    with system_of_its_own(pg_dsn, tmp_path, ("randomization", "safety", "gateway"),
                           env={"TRIAL_PROTOCOL_DIR": str(protocol)}) as system:
        async with client(system) as site:
            r = await site.post("/v1/screenings", json=screening())
            r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
            patient = r.json()["patient_id"]
            r = await site.post(f"/v1/patients/{patient}/randomization")
            assert r.status_code == 201, r.text
            arm = r.json()["arm"]

            async def safety_knows_the_assignment() -> dict[str, object] | None:
                status = (await site.get("/v1/safety/status")).json()
                return status if status["trial"]["enrollment"] == "closed" else None

            # The cap of the folder (1), not of the built-in version (57).
            status = await eventually(safety_knows_the_assignment,
                                      what="safety learning of the assignment")
            assert status["trial"]["rule_set_version"] == AMENDED_RULES
            r = await site.post(f"/v1/patients/{patient}/adverse-events", json={
                "term": "Infusion related reaction", "onset_at": r.json()["assigned_at"],
                "ctcae_grade": 3, "serious": False, "relatedness": "probable", "expected": True})
            assert r.status_code == 201, r.text
            # Version 1's R2 needs grade 4; the folder's fires at grade 3.
            assert "R2-related-grade4" in r.json()["triggered_rules"]
            status = (await site.get("/v1/safety/status")).json()
            assert status["arms"][arm]["status"] == "suspended"
            assert "R2-related-grade4" in {h["rule_id"] for h in status["arms"][arm]["holds"]}


def test_a_folder_without_safety_json_stops_the_service_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "protocol"
    shutil.copytree(DEFAULT_PATH, folder)
    (folder / "safety.json").unlink()
    env = {**os.environ, "TRIAL_PROTOCOL_DIR": str(folder), "TRIAL_SERVICE_NAME": "safety",
           "TRIAL_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'safety.db'}"}
    started = subprocess.run(
        [sys.executable, "-m", "uvicorn", "services.safety.app:app", "--port",
         str(infra.free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert "lacks safety.json" in started.stderr, started.stderr[-2000:]
    assert not (tmp_path / "safety.db").exists()  # refused before touching its database
