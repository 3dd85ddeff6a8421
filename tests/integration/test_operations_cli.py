"""The operators' commands (issue 14) on the test's real database and broker: dead-lettered
records listed, shown and replayed; a store backed up and restored; the audit ledger rebuilt."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from shared.consumer import ConsumerRunner, Delivery
from shared.db import create_engine
from shared.events import PatientWithdrawn, dlq_topic
from shared.kafka import ensure_topics
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore, NewEvent, Transaction
from tests.integration.test_consumer import produce, withdrawal
from tests.support import eventually, read_topic, tamper
from tooling.cli import app


async def trial(*args: str) -> Result:
    """`trial ARGS` in-process (in a thread: each command runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def rows(result: Result) -> list[dict[str, str]]:
    """`trial dlq list` as dicts, by its header line."""
    lines = result.stdout.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


# ------------------------------------------------------------------------------ DLQ


async def test_a_dead_lettered_record_is_listed_shown_and_replayed_into_one_application(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.ops.{uuid.uuid4().hex[:8]}"
    bootstrap = settings.kafka_bootstrap_servers
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    patient = f"P-{uuid.uuid4().hex[:6]}"
    event, poison = withdrawal(patient), b'{"not": "a CloudEvent"}'
    fixed = asyncio.Event()

    async def buggy_until_fixed(tx: Transaction, delivery: Delivery) -> None:
        if not fixed.is_set():
            raise RuntimeError("a bug in the handler")
        assert isinstance(delivery.data, PatientWithdrawn)
        await tx.append(f"seen-{patient}", [NewEvent("Seen", {"event_id": delivery.event.id})],
                        None)

    group = f"g-{uuid.uuid4().hex[:8]}"
    runner = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": buggy_until_fixed},
                            group_id=group)
    await produce(settings, topic, event.to_bytes(), poison)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.dead_lettered >= 2, timeout=120, what="2 dead-lettered")

        listed = await trial("dlq", "list", topic, "--bootstrap", bootstrap)
        assert listed.exit_code == 0, listed.output
        found = rows(listed)
        assert len(found) == 2
        bug, unreadable = found
        assert bug["event_id"] == event.id and bug["type"] == "PatientWithdrawn"
        assert bug["consumer"] == group and "a bug in the handler" in bug["error"]
        assert bug["origin"].startswith(f"{topic}:") and bug["origin"].endswith(":0")
        assert unreadable["event_id"] == "-" and "not a CloudEvent" in unreadable["error"]
        assert unreadable["origin"].endswith(":1")
        as_json = [json.loads(line) for line in (await trial(
            "dlq", "list", topic, "--bootstrap", bootstrap, "--json")).stdout.splitlines()]
        assert [r["event_id"] for r in as_json] == [event.id, None]

        bug_partition, bug_offset = bug["dlq_partition:offset"].split(":")
        shown = await trial("dlq", "show", topic, "--offset", bug_offset, "--partition",
                            bug_partition, "--bootstrap", bootstrap)
        assert shown.exit_code == 0, shown.output
        whole = json.loads(shown.stdout)
        assert whole["value"]["id"] == event.id and whole["value"]["data"]["patient_id"] == patient
        assert whole["headers"]["dlq_consumer"] == group and whole["key"] == "k"

        # An offset the DLQ does not have: refused, nothing sent.
        missing = await trial("dlq", "replay", topic, "--offset", "999", "--bootstrap", bootstrap)
        assert missing.exit_code == 2 and "no dead-lettered record" in missing.output

        # The handler is fixed: the replayed record is applied, once.
        fixed.set()
        replayed = await trial("dlq", "replay", topic, "--offset", bug_offset, "--partition",
                               bug_partition, "--bootstrap", bootstrap)
        assert replayed.exit_code == 0, replayed.output
        assert f"replayed {dlq_topic(topic)}:{bug_partition}:{bug_offset}" in replayed.stdout
        await eventually(lambda: runner.handled >= 1, timeout=60, what="the replay applied")
        # Replayed again (all of the DLQ): applied already, so skipped by its event id; the
        # unreadable record is still poison and goes back to the DLQ.
        again = await trial("dlq", "replay", topic, "--all", "--bootstrap", bootstrap)
        assert again.exit_code == 0, again.output
        assert again.stdout.count("replayed ") == 2
        await eventually(lambda: runner.duplicates >= 1 and runner.dead_lettered >= 3,
                         timeout=120, what="a duplicate skipped and the poison dead-lettered")
    finally:
        stop.set()
        await task
    seen = await store.read_stream(f"seen-{patient}")
    assert [e.data["event_id"] for e in seen] == [event.id]
    assert runner.handled == 1

    # Nothing left the DLQ: both first rows are still there, and the poison's return is marked
    # as the same record again.
    after = rows(await trial("dlq", "list", topic, "--bootstrap", bootstrap))
    assert after[:2] == found
    assert len(after) == 3
    assert after[2]["again_of"] == unreadable["dlq_partition:offset"]
    # The replayed copies on the topic say where they came from.
    copies = await read_topic(bootstrap, topic, lambda rs: len(rs) >= 5)
    provenance = [dict(r.headers).get("dlq_replayed_from") for r in copies]
    assert provenance.count(f"{dlq_topic(topic)}:{bug_partition}:{bug_offset}".encode()) == 2


async def test_a_dry_run_sends_nothing_and_a_topic_without_a_dlq_is_named(
        settings: Settings) -> None:
    topic = f"test.ops.{uuid.uuid4().hex[:8]}"
    bootstrap = settings.kafka_bootstrap_servers
    absent = await trial("dlq", "list", topic, "--bootstrap", bootstrap)
    assert absent.exit_code == 2 and f"no topic {dlq_topic(topic)}" in absent.output
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    await produce(settings, dlq_topic(topic), b"{}")  # a row without the consumer's headers
    listed = rows(await trial("dlq", "list", topic, "--bootstrap", bootstrap))
    assert len(listed) == 1 and listed[0]["origin"] == "None:None:None"
    dry = await trial("dlq", "replay", topic, "--all", "--dry-run", "--bootstrap", bootstrap)
    # Not from this topic as far as its headers say: never sent, and the exit says so.
    assert dry.exit_code == 1 and "not sent" in dry.stdout


# ------------------------------------------------------------------------------ backups


async def _fill(store: EventStore, count: int) -> list[str]:
    ids = []
    for i in range(count):
        appended = await store.append(f"stream-{i % 3}", [NewEvent("Noted", {"i": i})], None)
        ids += [e.event_id for e in appended]
    return ids


async def _events(url: str) -> list[tuple[int, str, str]]:
    store = EventStore(url)
    try:
        return [(e.position, e.event_id, e.hash) for e in await store.read_all(limit=None)]
    finally:
        await store.close()


async def _refuses_updates(url: str) -> None:
    """The restored events table is still append-only (its triggers came back with it)."""
    engine = create_engine(url)
    try:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            async with engine.begin() as conn:
                await conn.execute(sa.text("UPDATE events SET type = 'Forged' WHERE position = 1"))
    finally:
        await engine.dispose()


async def test_a_backup_restored_into_a_fresh_database_verifies_and_holds_the_same_events(
        store: EventStore, database_url: str, make_database_url: Callable[[str], str],
        tmp_path: Path) -> None:
    await _fill(store, 12)
    out = tmp_path / "backups" / "dosing.backup"
    made = await trial("backup", "dosing", database_url, str(out))
    assert made.exit_code == 0, made.output
    manifest = json.loads(out.with_name("dosing.backup.manifest.json").read_text())
    assert manifest["head_position"] == 12 and manifest["chain_ok"] is True
    assert manifest["head_hash"] == (await store.hashes_at([12]))[12]
    backed_up = await _events(database_url)
    await _fill(store, 1)  # written after the backup: not in it

    target = make_database_url("restored")
    restored = await trial("restore", "dosing", str(out), target)
    assert restored.exit_code == 0, restored.output
    assert "ok=True events_checked=12" in restored.stdout
    assert "matches_backup=yes" in restored.stdout
    assert await _events(target) == backed_up
    await _refuses_updates(target)
    again = EventStore(target)
    try:
        assert (await again.verify()).ok
        # The restored store is a store: it appends on from the backup's head.
        await again.append("stream-x", [NewEvent("Noted", {"i": 99})], None)
        assert (await again.verify()).events_checked == 13
    finally:
        await again.close()

    # A database that holds events is refused, and left as it was.
    refused = await trial("restore", "dosing", str(out), target)
    assert refused.exit_code == 2 and "already holds 13 event(s)" in refused.output
    assert len(await _events(target)) == 13
    # ... unless the operator says so.
    forced = await trial("restore", "dosing", str(out), target, "--force")
    assert forced.exit_code == 0, forced.output
    assert "matches_backup=yes" in forced.stdout and await _events(target) == backed_up


async def test_a_restore_refuses_another_services_backup_and_a_changed_file(
        store: EventStore, database_url: str, make_database_url: Callable[[str], str],
        tmp_path: Path) -> None:
    await _fill(store, 3)
    out = tmp_path / "safety.backup"
    assert (await trial("backup", "safety", database_url, str(out))).exit_code == 0
    target = make_database_url("restored")
    await upgrade(target)  # as a service's start leaves it: the schema, no events
    other = await trial("restore", "dosing", str(out), target)
    assert other.exit_code == 2 and "a backup of safety, not dosing" in other.output
    original = out.read_bytes()
    out.write_bytes(original + b"\0")
    changed = await trial("restore", "safety", str(out), target)
    assert changed.exit_code == 2 and "SHA-256 differs" in changed.output
    assert await _events(target) == []
    out.write_bytes(original)  # the file as backed up
    # A manifest that names another head than the file holds: restored, and said to differ.
    manifest_path = out.with_name("safety.backup.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "head_position": 2}))
    differs = await trial("restore", "safety", str(out), make_database_url("elsewhere"))
    assert differs.exit_code == 1 and "matches_backup=no" in differs.stdout, differs.output
    manifest_path.write_text(json.dumps(manifest))
    # The true manifest, over the empty schema:
    restored = await trial("restore", "safety", str(out), target)
    assert restored.exit_code == 0 and "matches_backup=yes" in restored.stdout, restored.output
    assert await _events(target) == await _events(database_url)


async def test_a_backup_of_a_broken_chain_is_written_and_says_so(
        store: EventStore, database_url: str, tmp_path: Path) -> None:
    await _fill(store, 4)
    await tamper(store, "UPDATE events SET type = 'Forged' WHERE position = 2")
    out = tmp_path / "audit.backup"
    made = await trial("backup", "audit", database_url, str(out))
    assert made.exit_code == 1 and "first broken position 2" in made.output
    manifest = json.loads(out.with_name("audit.backup.manifest.json").read_text())
    assert manifest["chain_ok"] is False and out.exists()


# ------------------------------------------------------------------------------ rebuild


async def test_the_audit_ledger_is_rebuilt_from_a_topic_from_its_beginning(
        settings: Settings, make_database_url: Callable[[str], str]) -> None:
    topic = f"test.ledger.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    first, second = withdrawal(f"P-{uuid.uuid4().hex[:6]}"), withdrawal("P-other")
    # The relay may have published one twice; one record is poison.
    await produce(settings, topic, first.to_bytes(), first.to_bytes(), b"garbage",
                  second.to_bytes())
    ledger = make_database_url("ledger")
    group = f"audit-rebuild-{uuid.uuid4().hex[:8]}"
    rebuilt = await trial("rebuild-projection", "audit", ledger, "--topic", topic,
                          "--bootstrap", settings.kafka_bootstrap_servers, "--group", group)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "filed=2 duplicates=1 dead_lettered=1 ok=True events_checked=2" in rebuilt.stdout
    # A group that has read the topic would resume where it stopped: refused.
    resumed = await trial("rebuild-projection", "audit", make_database_url("other"), "--topic",
                          topic, "--bootstrap", settings.kafka_bootstrap_servers,
                          "--group", group)
    assert resumed.exit_code == 2 and f"group {group} has read {topic}" in resumed.output
    store = EventStore(ledger)
    try:
        entries = await store.read_all(limit=None)
        assert [e.event_id for e in entries] == [first.id, second.id]
        assert entries[0].metadata["topic"] == topic
    finally:
        await store.close()
    # Into a ledger that has entries: refused.
    again = await trial("rebuild-projection", "audit", ledger, "--topic", topic,
                        "--bootstrap", settings.kafka_bootstrap_servers)
    assert again.exit_code == 2 and "already holds 2 event(s)" in again.output
    other = await trial("rebuild-projection", "dosing", make_database_url("x"))
    assert other.exit_code == 2


async def test_backup_needs_a_known_service(database_url: str, tmp_path: Path) -> None:
    await upgrade(database_url)
    wrong = await trial("backup", "pharmacy", database_url, str(tmp_path / "x"))
    assert wrong.exit_code == 2 and "service is one of" in wrong.output
