"""Dosing fails closed on trial.safety (issue 10, defect 17): a safety record it cannot apply
refuses the doses it may concern, on the real broker and database, until an operator resolves
it; readiness and the record say so."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner, Result

from services.dosing import commands
from services.dosing import holds as holding
from services.dosing.app import spec
from shared.app import Runtime
from shared.consumer import Unapplied
from shared.errors import Refused
from shared.events import DosingHeld, PatientDosingHeld
from shared.settings import Settings
from shared.store import EventStore, NewEvent, Transaction
from tests.integration.conftest import broken, dead_letter_through
from tests.integration.test_dosing_store import (
    HANDLERS,
    NURSE,
    RANDOMIZED,
    assign,
    infusion,
    record_dose,
)
from tests.integration.test_randomization_store import cloud
from tooling.cli import app


async def consume(store: EventStore, settings: Settings, *records: bytes) -> None:
    await dead_letter_through(store, settings, {**HANDLERS, "PatientDosingHeld": broken},
                              commands.fail_closed_on_safety_record, *records)


async def test_a_safety_record_dosing_cannot_apply_refuses_the_doses_it_concerns(
        settings: Settings, store: EventStore) -> None:
    """Defect 17: a valid hold that hit a handler error went to the DLQ and dosing went on."""
    held, other = await assign(store, "msc_low"), await assign(store, "msc_low")
    hold = cloud(PatientDosingHeld(hold_id="H-17", patient_id=held, rule_id="R4"))
    await consume(store, settings, hold.to_bytes())

    with pytest.raises(Refused) as refused:
        await record_dose(store, held, NURSE, infusion(0, RANDOMIZED))
    assert refused.value.code == "safety_record_unapplied"
    assert (refused.value.details["scope"], refused.value.details["target"]) == ("patient", held)
    assert await record_dose(store, other, NURSE, infusion(0, RANDOMIZED))  # not concerned
    [unapplied] = await commands.unapplied_safety_records(store)
    assert (unapplied.event_id, unapplied.type) == (hold.id, "PatientDosingHeld")
    assert "a bug in applying the hold" in unapplied.error

    runtime = Runtime(spec, settings.model_copy(update={"database_url": store.url}))
    try:
        assert (await runtime.ready())["safety_records_applied"] is False  # /readyz: 503
        await commands.resolve_safety_record(store, unapplied.record_id, "ops-on-call",
                                             "applied the hold by hand after the fix")
        assert (await runtime.ready())["safety_records_applied"] is True
    finally:
        await runtime.store.close()
    assert await record_dose(store, held, NURSE, infusion(0, RANDOMIZED))


async def test_an_unreadable_safety_record_refuses_every_dose(
        settings: Settings, store: EventStore) -> None:
    patient = await assign(store, "msc_high")
    await consume(store, settings, b"\x00not a cloudevent")
    [unapplied] = await commands.unapplied_safety_records(store)
    assert (unapplied.scope, unapplied.target) == ("trial", "*")
    with pytest.raises(Refused) as refused:
        await record_dose(store, patient, NURSE, infusion(0, RANDOMIZED))
    assert refused.value.code == "safety_record_unapplied"
    with pytest.raises(Refused):
        await commands.resolve_safety_record(store, "no:such:record", "ops", "typo")


async def test_a_commit_to_the_holds_meanwhile_does_not_lose_the_fail_closed_record(
        settings: Settings, store: EventStore) -> None:
    """The fail-closed write reads the holds stream and appends at the version it read: another
    replica's consumer applying a hold meanwhile moved it, and the ConcurrencyError escaped the
    consumer (its session torn down, the record dead-lettered again on the next). It is run
    again, as every command is."""
    patient = await assign(store, "msc_low")
    raced = False

    async def raced_by_a_hold(tx: Transaction, unapplied: Unapplied) -> None:
        nonlocal raced
        await commands.fail_closed_on_safety_record(tx, unapplied)
        if not raced:  # before this transaction commits, another commits to the holds
            raced = True
            await store.append(holding.HOLDS_STREAM, [NewEvent.of(DosingHeld(
                scope="arm", target="mtx", rule_id="R2", hold_id="H-other"))], None)

    await dead_letter_through(store, settings, HANDLERS, raced_by_a_hold, b"\x00unreadable")
    assert raced
    [unapplied] = await commands.unapplied_safety_records(store)
    assert (unapplied.scope, unapplied.target) == ("trial", "*")
    with pytest.raises(Refused) as refused:
        await record_dose(store, patient, NURSE, infusion(0, RANDOMIZED))
    assert refused.value.code == "safety_record_unapplied"


async def test_operators_list_and_resolve_unapplied_records_from_the_command_line(
        settings: Settings, store: EventStore) -> None:
    await consume(store, settings, b"\x00unreadable")
    [unapplied] = await commands.unapplied_safety_records(store)

    def trial(*args: str) -> Result:
        return CliRunner().invoke(app, ["resolve-safety-record", store.url, *args])

    listed = await asyncio.to_thread(trial)
    assert listed.exit_code == 0 and unapplied.record_id in listed.output
    assert (await asyncio.to_thread(trial, unapplied.record_id)).exit_code == 2  # who and why
    done = await asyncio.to_thread(trial, unapplied.record_id, "--by", "ops-1", "--reason",
                                   "garbage published by a test producer; no hold in it")
    assert done.exit_code == 0, done.output
    assert await commands.unapplied_safety_records(store) == []
    assert (await asyncio.to_thread(trial, unapplied.record_id, "--by", "ops-1", "--reason",
                                    "again")).exit_code == 1
