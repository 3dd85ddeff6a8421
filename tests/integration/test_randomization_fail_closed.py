"""Randomization fails closed on trial.safety too (issue 10, defect 17): a record it cannot apply
may be a halt, a pause or an arm suspension. One naming an arm closes that arm (patients go on
among the others); one naming the trial, or no one readable, stops randomization until an
operator resolves it."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from services.randomization import commands
from services.randomization.handlers import handlers
from shared.errors import Refused
from shared.events import ArmSuspended, EnrollmentPaused
from shared.settings import Settings
from shared.store import EventStore
from tests.integration.conftest import broken, dead_letter_through
from tests.integration.test_randomization_store import (
    COORDINATOR,
    META,
    PROTOCOL,
    SECRET,
    cloud,
    enrolled,
)
from tooling.cli import app


async def consume(store: EventStore, settings: Settings, *records: bytes) -> None:
    await dead_letter_through(
        store, settings, {**handlers(PROTOCOL), "ArmSuspended": broken, "EnrollmentPaused": broken},
        commands.fail_closed_on_safety_record, *records)


async def randomize(store: EventStore) -> str:
    result = await commands.randomize(store, await enrolled(store), COORDINATOR, PROTOCOL, SECRET,
                                      META)
    return result.assignment.arm


async def test_an_arm_suspension_randomization_cannot_apply_closes_that_arm(
        settings: Settings, store: EventStore) -> None:
    await consume(store, settings,
                  cloud(ArmSuspended(hold_id="H-A", arm="msc_high", rule_id="R2")).to_bytes())
    [unapplied] = await commands.unapplied_safety_records(store)
    assert (unapplied.scope, unapplied.target, unapplied.type) == ("arm", "msc_high",
                                                                   "ArmSuspended")
    arms = {await randomize(store) for _ in range(9)}
    assert arms == {"msc_low", "mtx"}  # as if suspended: never refused, never msc_high


async def test_a_pause_randomization_cannot_apply_stops_randomization_until_resolved(
        settings: Settings, store: EventStore) -> None:
    pause = cloud(EnrollmentPaused(hold_id="H-P", trial_id="NCT03424629", rule_id="R5-susar"))
    await consume(store, settings, pause.to_bytes())
    with pytest.raises(Refused) as refused:
        await randomize(store)
    assert refused.value.code == "safety_record_unapplied"
    [unapplied] = await commands.unapplied_safety_records(store)
    resolved = await asyncio.to_thread(
        CliRunner().invoke, app, ["resolve-safety-record", store.url, unapplied.record_id,
                                  "--service", "randomization", "--by", "ops-1", "--reason",
                                  "no pause was decided: a test record"])
    assert resolved.exit_code == 0, resolved.output
    assert await randomize(store)  # randomization goes on
