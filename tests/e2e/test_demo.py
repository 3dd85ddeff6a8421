"""`trial demo` (what `make demo` runs) plays a whole trial against a running system on an
accelerated clock, and its closing table holds what the audit ledger and the efficacy summary
say, read here by the test itself, not through the demo's code.

The system: on the embedded backend, `trial run --clock-file` from this working tree with a
temporary data folder and free ports (the route `make demo` takes; a fresh clone would add a
virtualenv's installation to a test that already takes minutes, and test_make_run covers `make
run` itself); on the real one (TRIAL_TEST_BACKEND=real), the e2e system on PostgreSQL and Apache
Kafka with the same clock file and one-second sweeps, as `trial run --clock-file` sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy import infra
from shared.clock import FileClock
from shared.settings import SERVICES
from tests.conftest import REAL
from tests.e2e.conftest import SECRET, system_of_its_own, token

REPO = Path(__file__).resolve().parents[2]
TRIAL = str(REPO / ".venv" / "bin" / "trial")
ARMS = ("msc_low", "msc_high", "mtx")


@contextmanager
def running_system(pg_dsn: str | None, folder: Path) -> Iterator[tuple[str, str, Path]]:
    """(gateway URL, Kafka bootstrap, clock file) of a fresh system on a file clock."""
    folder.mkdir(parents=True, exist_ok=True)
    clock = folder / "clock.txt"
    if REAL:
        FileClock(clock).set(datetime.now(UTC))
        with system_of_its_own(pg_dsn, folder, env={
                "TRIAL_CLOCK_FILE": str(clock), "TRIAL_DOSING_SWEEP_INTERVAL_S": "1",
                "TRIAL_EFFICACY_SWEEP_INTERVAL_S": "1"}) as system:
            yield system.url(), system.bootstrap, clock
        return
    gateway, kafka = infra.free_port(), infra.free_port()
    env = {**os.environ, "TRIAL_JWT_SECRET": SECRET, "TRIAL_DATA_DIR": str(folder / "data"),
           "TRIAL_GATEWAY_PORT": str(gateway), "TRIAL_RUN_KAFKA_PORT": str(kafka),
           **{f"TRIAL_{s.upper()}_PORT": str(infra.free_port()) for s in SERVICES}}
    proc = subprocess.Popen([TRIAL, "run", "--clock-file", str(clock)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while not any(line.startswith("Kafka bootstrap:") for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "run exited:\n" + "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "run said nothing in time:\n" + "".join(lines)
        assert any(line.startswith(f"Clock file:       {clock}") for line in lines), lines
        yield f"http://127.0.0.1:{gateway}", f"127.0.0.1:{kafka}", clock
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def logs(folder: Path) -> str:
    """The end of every service's log, for a failure's message."""
    return "".join(f"\n--- {log}\n" + log.read_text(errors="replace")[-2000:]
                   for log in sorted(folder.rglob("logs/*.log")))


def every(reader: httpx.Client, event_type: str) -> list[dict[str, Any]]:
    """Every audit entry of a type, following the cursor, once per event id."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        r = reader.get("/v1/audit/events", params={
            "type": event_type, "limit": "500", **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        for item in r.json()["items"]:
            found[item["event_id"]] = item
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return list(found.values())


def by_arm(entries: list[dict[str, Any]], arm: str | None = None) -> Counter[str]:
    return Counter(arm or e["data"]["arm"] for e in entries)


@pytest.mark.timeout(900)
def test_the_demo_plays_a_whole_trial_and_its_table_is_the_audit_ledgers(
        pg_dsn: str | None, tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    with running_system(pg_dsn, tmp_path / "system") as (gateway, bootstrap, clock):
        demo = subprocess.run(
            [TRIAL, "demo", "--url", gateway, "--bootstrap", bootstrap, "--clock-file",
             str(clock), "--json", str(out)],
            cwd=REPO, env={**os.environ, "TRIAL_JWT_SECRET": SECRET}, capture_output=True,
            text=True, timeout=600)  # "a few minutes": about two on a 2-core machine
        assert demo.returncode == 0, demo.stdout[-6000:] + demo.stderr[-3000:] + logs(tmp_path)
        table = json.loads(out.read_text())
        assert "Every figure matched" in demo.stdout and "Audit chain: ok=True" in demo.stdout

        # The clock went through the trial's 52 weeks (randomization read the wall clock).
        assert FileClock(clock).now() > datetime.now(UTC) + timedelta(weeks=52)

        with httpx.Client(base_url=gateway, timeout=60, headers={
                "Authorization": f"Bearer {token('monitor')}"}) as monitor:
            assigned = every(monitor, "ArmAssigned")
            infusions = every(monitor, "InfusionGiven")
            mtx = every(monitor, "MethotrexateDoseGiven")
            assessed = every(monitor, "AssessmentRecorded")
            missed = every(monitor, "VisitMissed")
            adverse = every(monitor, "AdverseEventReported")
            screened = every(monitor, "PatientScreened")
            fired = every(monitor, "StoppingRuleTriggered")
            lifted = every(monitor, "SafetyHoldLifted")
            summary = monitor.get("/v1/efficacy/summary").json()
            verified = monitor.get("/v1/audit/verify").json()

    # What the script plays: 57 randomized of 63 screened (6 failing real criteria), one R4
    # hold lifted by the DSMB, 2 missed doses and 3 missed assessments, both arms of follow-up.
    assert (len(screened), sum(1 for e in screened if not e["data"]["eligible"])) == (63, 6)
    assert len(assigned) == 57
    assert [e["data"]["rule_id"] for e in fired] == ["R4-infusion-reaction"]
    assert [e["data"]["target"] for e in lifted] == [fired[0]["data"]["target"]]
    assert sorted(e["data"]["kind"] for e in missed) == [
        "assessment", "assessment", "assessment", "infusion", "methotrexate"]
    assert len(adverse) == 11
    assert verified["ok"] is True and table["verify"]["ok"] is True
    assert table["ok"] is True

    doses = by_arm(infusions) + by_arm(mtx, "mtx")
    missed_doses = by_arm([e for e in missed if e["data"]["kind"] != "assessment"])
    missed_assessments = by_arm([e for e in missed if e["data"]["kind"] == "assessment"])
    grades = {g: by_arm([e for e in adverse if min(e["data"]["ctcae_grade"], 3) == g])
              for g in (1, 2, 3)}
    serious = by_arm([e for e in adverse if e["data"]["serious"]])
    for arm in ARMS:
        row = {k: v["value"] for k, v in table["arms"][arm].items()}
        week12 = summary["arms"][arm]["weeks"]["12"]["nri"]["pasi75"]
        expected = {
            "randomized": by_arm(assigned)[arm], "doses": doses[arm],
            "assessments": by_arm(assessed)[arm], "missed_doses": missed_doses[arm],
            "missed_assessments": missed_assessments[arm], "ae_grade1": grades[1][arm],
            "ae_grade2": grades[2][arm], "ae_grade3": grades[3][arm],
            "ae_serious": serious[arm], "pasi75_week12": week12["count"]}
        assert row == expected, (arm, row, expected)
        assert summary["arms"][arm]["randomized"] == row["randomized"] == week12["n"]
        assert table["arms"][arm]["pasi75_week12"]["n"] == week12["n"]
    # Every dose of each arm's schedule but the missed and the cancelled ones: 6 infusions per
    # UC-MSC patient, 16 methotrexate doses per methotrexate patient, one missed dose each in
    # msc_low and mtx, and the discontinued methotrexate patient's weeks 7 to 15 (9 doses).
    n = by_arm(assigned)
    assert doses == {"msc_low": 6 * n["msc_low"] - 1, "msc_high": 6 * n["msc_high"],
                     "mtx": 16 * n["mtx"] - 1 - 9}
