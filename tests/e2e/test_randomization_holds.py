"""Safety holds published on trial.safety stop randomization through the gateway; the cap closes it.

A trial of its own (own broker, protocol copy with a cap of 6): the test publishes the safety
service's events itself, as the safety service would, and waits for the randomization service to
acknowledge each hold on trial.enrollment before it tries to randomize.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord

from shared.events import (
    ENROLLMENT,
    SAFETY,
    ArmSuspended,
    CloudEvent,
    EnrollmentPaused,
    EventData,
    PatientDosingHeld,
    SafetyHoldLifted,
    TrialHalted,
    dlq_topic,
)
from shared.store import utcnow
from tests.e2e.conftest import client
from tests.e2e.test_randomization_api import (  # noqa: F401 (a fixture)
    Trial,
    enrol,
    fresh_site,
    own_trial_factory,
    regenerate,
)
from tests.support import read_topic

REPO = Path(__file__).resolve().parents[2]

TRIAL_ID = "NCT03424629"


async def publish(trial: Trial, *items: EventData | bytes) -> None:
    """Publish as the safety service does: one CloudEvent per record, keyed by its subject."""
    producer = AIOKafkaProducer(bootstrap_servers=trial.broker.bootstrap, acks="all")
    await producer.start()
    try:
        for item in items:
            if isinstance(item, bytes):
                await producer.send_and_wait(SAFETY, item, key=b"poison")
                continue
            event = CloudEvent(id=str(uuid.uuid4()), source="/services/safety",
                               type=item.event_type(), subject=item.subject(), time=utcnow(),
                               data=item.model_dump(mode="json"), sequence=1, actor="dsmb-1")
            await producer.send_and_wait(SAFETY, event.to_bytes(), key=event.subject.encode())
    finally:
        await producer.stop()


async def acknowledged(trial: Trial, event_type: str, hold_id: str) -> None:
    """Wait until randomization has recorded the hold (or lift): from then on it enforces it."""
    def seen(records: list[ConsumerRecord]) -> bool:
        return any(e.type == event_type and e.data.get("hold_id") == hold_id
                   for e in (CloudEvent.from_bytes(r.value) for r in records))

    await read_topic(trial.broker.bootstrap, ENROLLMENT, until=seen, timeout=120)


def lift(hold_id: str, scope: str, target: str) -> SafetyHoldLifted:
    return SafetyHoldLifted.model_validate({"hold_id": hold_id, "scope": scope, "target": target,
                                            "rationale": "DSMB reviewed the cases",
                                            "decided_by": "dsmb-1"})


def resolve_unapplied(trial: Trial) -> list[str]:
    """The operator's `trial resolve-safety-record`: list what randomization could not apply,
    and resolve each (here: records with no hold in them)."""
    url = trial.system.database_urls["randomization"]

    def trial_cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "tooling.cli", "resolve-safety-record", url, *args,
             "--service", "randomization"], cwd=REPO, capture_output=True, text=True, check=True,
            timeout=120).stdout

    record_ids = [line.split("\t")[0] for line in trial_cli().splitlines() if line]
    for record_id in record_ids:
        trial_cli(record_id, "--by", "ops-1", "--reason", "unreadable test records, no hold")
    return record_ids


def problem(r: Any) -> tuple[int, str]:
    assert r.headers["content-type"] == "application/problem+json", r.text
    return r.status_code, r.json()["code"]


async def test_holds_from_trial_safety_are_enforced_and_the_cap_closes_enrolment(
        own_trial_factory: Any) -> None:  # noqa: F811
    trial: Trial = own_trial_factory(6)
    site_id = fresh_site()
    slots = regenerate(trial, f"{site_id}:pasi_lt20", 6)
    # A second stratum whose first slot is not the arm we are about to suspend.
    other_site = next(s for s in (fresh_site() for _ in range(50))
                      if regenerate(trial, f"{s}:pasi_lt20", 1)[0].arm != slots[1].arm)
    h = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("p1", "p2", "halt", "arm")}
    async with client(trial.system, site=site_id) as site, \
            client(trial.system, "investigator", site_id) as investigator, \
            client(trial.system, site=other_site) as other:
        p1, p2, p3, p4, p5, p6 = [await enrol(site, site_id) for _ in range(6)]
        q = await enrol(other, other_site)

        # Poison first: dead-lettered, and the consumer goes on to the valid pause after it.
        await publish(trial, b"\x00not a cloudevent",
                      CloudEvent(id=str(uuid.uuid4()), source="/services/safety",
                                 type="EnrollmentPaused", subject=TRIAL_ID, time=utcnow(),
                                 data={"trial_id": TRIAL_ID}, sequence=1).to_bytes(),
                      EnrollmentPaused(hold_id=h["p1"], trial_id=TRIAL_ID, rule_id="R5-susar"))
        await acknowledged(trial, "RandomizationHoldApplied", h["p1"])
        r = await site.post(f"/v1/patients/{p1}/randomization")
        assert problem(r) == (409, "enrollment_paused") and r.json()["rule_id"] == "R5-susar"
        dead = await read_topic(trial.broker.bootstrap, dlq_topic(SAFETY),
                                until=lambda rs: len(rs) >= 2, timeout=120)
        assert dead[0].value == b"\x00not a cloudevent"

        # Two pauses; lifting one leaves the other in force.
        await publish(trial, EnrollmentPaused(hold_id=h["p2"], trial_id=TRIAL_ID, rule_id="R5-susar"),
                      lift(h["p1"], "trial", TRIAL_ID))
        await acknowledged(trial, "RandomizationHoldLifted", h["p1"])
        assert problem(await site.post(f"/v1/patients/{p1}/randomization")) == (
            409, "enrollment_paused")
        await publish(trial, lift(h["p2"], "trial", TRIAL_ID))
        await acknowledged(trial, "RandomizationHoldLifted", h["p2"])
        # The two records it could not apply might have been a halt: it still refuses (it fails
        # closed, D32) until an operator, having read them in the DLQ, resolves them.
        r = await site.post(f"/v1/patients/{p1}/randomization")
        assert problem(r) == (409, "safety_record_unapplied")
        assert len(resolve_unapplied(trial)) == 2
        r = await site.post(f"/v1/patients/{p1}/randomization")
        assert r.status_code == 201 and r.json()["arm"] == slots[0].arm

        # A halt stops randomization (and a crossover, which this protocol disables anyway).
        await publish(trial, TrialHalted(hold_id=h["halt"], trial_id=TRIAL_ID, rule_id="R1-death"))
        await acknowledged(trial, "RandomizationHoldApplied", h["halt"])
        r = await site.post(f"/v1/patients/{p2}/randomization")
        assert problem(r) == (409, "trial_halted") and r.json()["rule_id"] == "R1-death"
        r = await investigator.post(f"/v1/patients/{p1}/crossover",
                                    json={"to_arm": "msc_high", "reason": "no response"})
        assert problem(r) == (409, "crossover_disabled")
        await publish(trial, lift(h["halt"], "trial", TRIAL_ID))
        await acknowledged(trial, "RandomizationHoldLifted", h["halt"])

        # The arm of the stratum's next slot is suspended: its patients are randomized among
        # the open arms, and nothing tells which arm the stratum's own next slot holds (D30).
        await publish(trial, ArmSuspended(hold_id=h["arm"], arm=slots[1].arm, rule_id="R2"),
                      PatientDosingHeld(hold_id="hold-x", patient_id=p2, rule_id="R4"))
        await acknowledged(trial, "RandomizationHoldApplied", h["arm"])
        r = await site.post(f"/v1/patients/{p2}/randomization")
        assert r.status_code == 201 and r.json()["arm"] != slots[1].arm, r.text
        r = await other.post(f"/v1/patients/{q}/randomization")
        assert r.status_code == 201 and r.json()["arm"] != slots[1].arm
        await publish(trial, lift(h["arm"], "arm", slots[1].arm))
        await acknowledged(trial, "RandomizationHoldLifted", h["arm"])
        r = await site.post(f"/v1/patients/{p3}/randomization")
        assert r.status_code == 201 and r.json()["arm"] == slots[1].arm  # the stratum's slot 2

        # Numbers 5 and 6 fill the cap of 6; the next randomization is refused, writing nothing.
        numbers = [r.json()["randomization_number"]]
        for p in (p4, p5):
            r = await site.post(f"/v1/patients/{p}/randomization")
            assert r.status_code == 201, r.text
            numbers.append(r.json()["randomization_number"])
        assert numbers == [4, 5, 6]
        r = await site.post(f"/v1/patients/{p6}/randomization")
        assert problem(r) == (409, "enrollment_closed") and r.json()["cap"] == 6
        view = (await site.get(f"/v1/patients/{p6}")).json()
        assert (view["status"], view["arm"], view["randomization_number"]) == (
            "enrolled", None, None)
