"""Operators' commands (issue 14): dead-lettered records, backups, the audit ledger rebuilt.

`trial dlq list|show|replay` reads a topic's `<topic>.dlq` without a consumer group and
republishes records to the topic they came from; nothing is ever removed from a DLQ, so a replay
can always be repeated and every dead-lettered record stays on file. Their Kafka clients connect
as the services' do (`shared.kafka.client_options`: TRIAL_KAFKA_SECURITY_PROTOCOL and the SASL
settings, D48), and name topics by their logical names, mapped to the broker's with
TRIAL_KAFKA_TOPIC_PREFIX (D52). `trial backup` and `trial
restore` copy one service's store (pg_dump/pg_restore, or SQLite's online backup API) with a
manifest that names the chain head, which a restore checks. `trial rebuild-projection audit`
files every ledger topic from its beginning into a fresh audit ledger, through the audit
service's own consumer path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import typer

from shared.db import create_engine, is_sqlite
from shared.events import LEDGER_TOPICS, TOPICS, dlq_topic
from shared.settings import SERVICES, Settings
from shared.store import EventStore

MANIFEST_FORMAT = "uc-msc-trial-backup/1"
READ_TIMEOUT_S = 60.0


class OperationFailed(Exception):
    """What an operator is told, instead of a traceback (exit code 2)."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


T = TypeVar("T")


def _run_or_exit(work: Coroutine[Any, Any, T]) -> T:
    """Run a command's work; what an operator can act on is a message, not a traceback."""
    from aiokafka.errors import KafkaError

    try:
        return asyncio.run(work)
    except (sa.exc.SQLAlchemyError, OSError, KafkaError) as exc:
        raise OperationFailed(f"{type(exc).__name__}: {exc}") from exc


def _bootstrap(given: str | None) -> str:
    return given or Settings().kafka_bootstrap_servers


def kafka_settings(bootstrap: str | None = None) -> Settings:
    """How the operators' Kafka clients connect: as the services do, from the environment
    (TRIAL_KAFKA_SECURITY_PROTOCOL, TRIAL_KAFKA_SASL_*, TRIAL_KAFKA_TOPIC_PREFIX; D48), to
    `bootstrap` when one is given. On a secured broker, an operator's principal (or admin)."""
    return Settings(kafka_bootstrap_servers=_bootstrap(bootstrap))


# --------------------------------------------------------------------------------------------
# Dead-lettered records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One record of `<topic>.dlq`: where it is, where it came from, who gave up on it, why."""

    dlq: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def record_id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def origin_topic(self) -> str | None:
        return self.headers.get("dlq_topic")

    @property
    def origin_partition(self) -> int | None:
        return _int(self.headers.get("dlq_partition"))

    @property
    def origin_offset(self) -> int | None:
        return _int(self.headers.get("dlq_offset"))

    @property
    def consumer(self) -> str:
        return self.headers.get("dlq_consumer", "")

    @property
    def error(self) -> str:
        return self.headers.get("dlq_error", "")

    def envelope(self) -> dict[str, Any] | None:
        """The record's JSON object, if it is one (a CloudEvent or not)."""
        try:
            parsed = json.loads(self.value or b"")
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    @property
    def event_id(self) -> str | None:
        found = (self.envelope() or {}).get("id")
        return found if isinstance(found, str) else None

    @property
    def event_type(self) -> str | None:
        found = (self.envelope() or {}).get("type")
        return found if isinstance(found, str) else None

    def same_record(self) -> tuple[str | None, bytes | None, bytes | None]:
        """Two rows with these equal are one record dead-lettered twice (by two consumer
        groups, or again after a replay): replaying it once does all a replay can."""
        return self.origin_topic, self.key, self.value

    def as_dict(self) -> dict[str, Any]:
        envelope = self.envelope()
        return {
            "dlq": self.dlq, "partition": self.partition, "offset": self.offset,
            "timestamp": datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).isoformat(),
            "origin": {"topic": self.origin_topic, "partition": self.origin_partition,
                       "offset": self.origin_offset},
            "consumer": self.consumer, "error": self.error,
            "event_id": self.event_id, "event_type": self.event_type,
            "key": None if self.key is None else self.key.decode(errors="replace"),
            "headers": self.headers,
            "value": envelope if envelope is not None else (
                None if self.value is None else self.value.decode(errors="replace")),
        }


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


async def read_dlq(settings: Settings, topic: str, timeout: float = READ_TIMEOUT_S
                   ) -> list[DeadLetter]:
    """Every record of `topic`'s DLQ (`topic` a logical name) that existed when asked, by
    partition then offset. Read without a consumer group: nothing is committed, nothing is
    taken off the queue."""
    from aiokafka import AIOKafkaConsumer

    from shared.kafka import client_options, known_partitions, physical

    name = physical(settings, dlq_topic(topic))
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest", metadata_max_age_ms=1000,
                                request_timeout_ms=40_000)
    try:
        await consumer.start()
        tps = await known_partitions(consumer, name)
        if not tps:
            raise OperationFailed(
                f"the broker at {settings.kafka_bootstrap_servers} has no topic {name}")
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        found: list[DeadLetter] = []
        deadline = time.monotonic() + timeout
        left = {tp for tp, end in ends.items() if end > 0}
        while left:
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
            if not left:
                break
            if time.monotonic() > deadline:
                raise OperationFailed(f"timed out reading {name} ({len(found)} records read)")
            batches = await consumer.getmany(*left, timeout_ms=500)
            for tp, records in batches.items():
                found += [DeadLetter(
                    dlq=name, partition=r.partition, offset=r.offset, timestamp_ms=r.timestamp,
                    key=r.key, value=r.value,
                    headers={k: v.decode(errors="replace") for k, v in (r.headers or ())})
                    for r in records if r.offset < ends[tp]]
        return sorted(found, key=lambda d: (d.partition, d.offset))
    finally:
        await consumer.stop()


def _first_seen(records: Sequence[DeadLetter]) -> dict[str, str]:
    """For each row that repeats an earlier one (same record), that earlier row's id."""
    first: dict[tuple[str | None, bytes | None, bytes | None], str] = {}
    repeats: dict[str, str] = {}
    for r in sorted(records, key=lambda d: (d.timestamp_ms, d.partition, d.offset)):
        seen = first.setdefault(r.same_record(), r.record_id)
        if seen != r.record_id:
            repeats[r.record_id] = seen
    return repeats


def _pick(records: Sequence[DeadLetter], offsets: Sequence[int], partition: int | None
          ) -> list[DeadLetter]:
    """The rows named by offset (and partition, needed only where an offset is in several)."""
    chosen: list[DeadLetter] = []
    for offset in offsets:
        matches = [r for r in records if r.offset == offset
                   and (partition is None or r.partition == partition)]
        if not matches:
            where = "" if partition is None else f" in partition {partition}"
            raise OperationFailed(f"no dead-lettered record at offset {offset}{where}")
        if len(matches) > 1:
            raise OperationFailed(
                f"offset {offset} is in partitions "
                f"{', '.join(str(r.partition) for r in matches)}: name one with --partition")
        chosen.append(matches[0])
    return chosen


dlq_app = typer.Typer(help="Records consumers dead-lettered to <topic>.dlq: list, show, replay.",
                      no_args_is_help=True)
BOOTSTRAP = typer.Option(None, "--bootstrap",
                         help="Kafka bootstrap (default: TRIAL_KAFKA_BOOTSTRAP_SERVERS)")


def _read_or_exit(bootstrap: str | None, topic: str) -> list[DeadLetter]:
    try:
        return _run_or_exit(read_dlq(kafka_settings(bootstrap), topic))
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc


@dlq_app.command("list")
def dlq_list(topic: str = typer.Argument(..., help="the topic, e.g. trial.safety (not .dlq)"),
             bootstrap: str | None = BOOTSTRAP,
             consumer: str | None = typer.Option(None, help="only what this group dead-lettered"),
             as_json: bool = typer.Option(False, "--json", help="one JSON object a line")) -> None:
    """One row per dead-lettered record: where it is in the DLQ, where it came from, which
    consumer gave up on it and why, its event id and type when readable; `again_of` names an
    earlier row holding the same record (another group's, or a replay that failed again)."""
    records = [r for r in _read_or_exit(bootstrap, topic)
               if consumer is None or r.consumer == consumer]
    repeats = _first_seen(records)
    if as_json:
        for r in records:
            row = {k: v for k, v in r.as_dict().items() if k not in ("value", "headers", "key")}
            typer.echo(json.dumps({**row, "again_of": repeats.get(r.record_id)}))
        return
    typer.echo("dlq_partition:offset\torigin\tconsumer\tevent_id\ttype\tagain_of\terror")
    for r in records:
        origin = f"{r.origin_topic}:{r.origin_partition}:{r.origin_offset}"
        typer.echo(f"{r.record_id}\t{origin}\t{r.consumer}\t{r.event_id or '-'}\t"
                   f"{r.event_type or '-'}\t{repeats.get(r.record_id, '-')}\t{r.error or '-'}")
    from shared.kafka import physical

    dlq = physical(kafka_settings(bootstrap), dlq_topic(topic))
    typer.echo(f"{len(records)} record(s) in {dlq}", err=True)


@dlq_app.command("show")
def dlq_show(topic: str = typer.Argument(..., help="the topic, e.g. trial.safety (not .dlq)"),
             offset: int = typer.Option(..., help="the record's offset in the DLQ"),
             partition: int | None = typer.Option(
                 None, help="its DLQ partition (needed when the offset is in several)"),
             bootstrap: str | None = BOOTSTRAP) -> None:
    """One dead-lettered record whole (headers, key, the event) as JSON."""
    records = _read_or_exit(bootstrap, topic)
    try:
        (record,) = _pick(records, [offset], partition)
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps({**record.as_dict(), "again_of": _first_seen(records).get(
        record.record_id)}, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Replayed:
    record: DeadLetter
    partition: int | None = None  # where the topic now has it (None: skipped)
    offset: int | None = None
    skipped: str | None = None  # why it was not sent


async def replay(settings: Settings, topic: str, chosen: Sequence[DeadLetter],
                 dry_run: bool = False) -> list[Replayed]:
    """Republish `chosen` to `topic` (a logical name, as their dlq_topic header has it) as they
    were (key, value), on the partition they came from when it still exists, each acknowledged
    before the next. The DLQ keeps every record."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from shared.kafka import client_options, physical

    done: list[Replayed] = []
    sent: dict[tuple[str | None, bytes | None, bytes | None], str] = {}
    to_send: list[DeadLetter] = []
    # In the order they were dead-lettered: per original partition, the topic's own order.
    for r in sorted(chosen, key=lambda d: (d.timestamp_ms, d.partition, d.offset)):
        if r.origin_topic != topic:
            done.append(Replayed(r, skipped=f"its dlq_topic header is {r.origin_topic!r}, "
                                            f"not {topic}"))
        elif r.same_record() in sent:
            done.append(Replayed(r, skipped=f"the same record as {sent[r.same_record()]}, "
                                            "replayed once"))
        else:
            sent[r.same_record()] = r.record_id
            to_send.append(r)
    if dry_run:
        return done + [Replayed(r, skipped="dry run") for r in to_send]
    if not to_send:
        return done
    producer = AIOKafkaProducer(**client_options(settings), acks="all",
                                enable_idempotence=False, client_id="trial-dlq-replay")
    on_broker = physical(settings, topic)
    try:
        await producer.start()
        partitions = await producer.partitions_for(on_broker)
        for i, r in enumerate(to_send):
            headers = [("content-type", b"application/cloudevents+json"),
                       ("dlq_replayed_from", f"{r.dlq}:{r.partition}:{r.offset}".encode())]
            if r.event_type:
                headers.append(("ce_type", r.event_type.encode()))
            keep = r.origin_partition if r.origin_partition in partitions else None
            try:
                meta = await producer.send_and_wait(on_broker, value=r.value, key=r.key,
                                                    partition=keep, headers=headers)
            except KafkaError as exc:  # say what was sent before it, and what was not
                done += [Replayed(left, skipped=f"send failed ({type(exc).__name__}: {exc}); "
                                                "may have reached the topic")
                         for left in to_send[i:i + 1]]
                done += [Replayed(left, skipped="not attempted after a failed send")
                         for left in to_send[i + 1:]]
                break
            done.append(Replayed(r, meta.partition, meta.offset))
    finally:
        await producer.stop()
    return sorted(done, key=lambda d: (d.record.partition, d.record.offset))


@dlq_app.command("replay")
def dlq_replay(topic: str = typer.Argument(..., help="the topic, e.g. trial.safety (not .dlq)"),
               offset: list[int] = typer.Option(
                   [], help="a DLQ offset to replay (repeatable)"),
               partition: int | None = typer.Option(
                   None, help="the DLQ partition of --offset (needed when it is in several)"),
               replay_all: bool = typer.Option(False, "--all", help="every record of the DLQ"),
               consumer: str | None = typer.Option(
                   None, help="with --all: only what this group dead-lettered"),
               dry_run: bool = typer.Option(False, "--dry-run", help="say what would be sent"),
               bootstrap: str | None = BOOTSTRAP) -> None:
    """Republish dead-lettered records to the topic they came from, for every consumer group of
    the topic to read again. A group that applied the event already skips it (processed ids);
    one that still cannot goes on dead-lettering it, as a new DLQ row. Nothing is removed from
    the DLQ. Exit 1 if any chosen record was not sent."""
    if replay_all == bool(offset):
        raise _fail("give --offset (one or more) or --all")
    records = _read_or_exit(bootstrap, topic)
    try:
        chosen = ([r for r in records if consumer is None or r.consumer == consumer]
                  if replay_all else _pick(records, offset, partition))
        results = _run_or_exit(replay(kafka_settings(bootstrap), topic, chosen, dry_run))
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc
    from shared.kafka import physical

    target = physical(kafka_settings(bootstrap), topic)
    for d in results:
        r = d.record
        what = f"{r.dlq}:{r.record_id} ({r.event_type or '-'} {r.event_id or '-'})"
        if d.skipped is None:
            typer.echo(f"replayed {what} -> {target}:{d.partition}:{d.offset}")
        else:
            typer.echo(f"not sent {what}: {d.skipped}")
    sent = sum(d.skipped is None for d in results)
    typer.echo(f"{sent} of {len(results)} record(s) republished to {topic}; the DLQ keeps them all",
               err=True)
    if any(d.skipped is not None and not d.skipped.startswith(("the same record", "dry run"))
           for d in results):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# Backup and restore
# --------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What a backup holds, written beside it (`<backup>.manifest.json`): a restore compares."""

    service: str
    backend: str  # sqlite or postgresql
    file: str
    sha256: str
    size: int
    created_at: str
    head_position: int
    head_hash: str | None
    chain_ok: bool
    events_checked: int
    first_broken_position: int | None
    tool: str
    format: str = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path_for(backup: Path) -> Path:
        return backup.with_name(backup.name + ".manifest.json")

    def write(self, backup: Path) -> Path:
        target = self.path_for(backup)
        target.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def read(cls, backup: Path) -> Manifest:
        source = cls.path_for(backup)
        if not source.exists():
            raise OperationFailed(f"{source} is missing: it says what the backup holds")
        document = json.loads(source.read_text())
        if document.get("format") != MANIFEST_FORMAT:
            raise OperationFailed(f"{source} is not a {MANIFEST_FORMAT} manifest")
        return cls(**document)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_facts(path: Path) -> tuple[str, int]:
    return _sha256(path), path.stat().st_size


def _sqlite_path(url: str) -> Path:
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:":
        raise OperationFailed(f"{url} names no SQLite file")
    return Path(database)


def pg_tool(name: str) -> str:
    """A PostgreSQL client program, the newest installed (Debian keeps each major version's in
    /usr/lib/postgresql/<major>/bin, as deploy/infra.py finds the server), else the PATH's."""
    found = [p for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}") if os.access(p, os.X_OK)]
    if found:
        def major(p: Path) -> float:
            try:
                return float(p.parent.parent.name)
            except ValueError:
                return 0.0
        return str(max(found, key=major))
    which = shutil.which(name)
    if which is None:
        raise OperationFailed(f"{name} not found: install PostgreSQL's client programs "
                              "(Debian: postgresql-client) no older than the server")
    return which


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy URL as libpq takes it, the password in the environment (not the argv)."""
    parsed = sa.engine.make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    dsn = parsed.set(drivername="postgresql", password=None).render_as_string(
        hide_password=False)
    return dsn, env


async def _run(cmd: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise OperationFailed(f"{Path(cmd[0]).name} failed ({process.returncode}): "
                              f"{(err or out).decode(errors='replace').strip()}")
    return out.decode(errors="replace").strip()


async def _head_of(store: EventStore) -> tuple[int, str | None]:
    head = await store.head()
    return head, (await store.hashes_at([head])).get(head) if head else None


async def _has_events(url: str) -> int:
    """How many events the database holds (0: none, or no events table yet)."""
    if is_sqlite(url) and not _sqlite_path(url).exists():
        return 0
    engine = create_engine(url, immediate=False)
    try:
        async with engine.connect() as conn:
            if not await conn.run_sync(lambda c: sa.inspect(c).has_table("events")):
                return 0
            return int((await conn.execute(sa.text("SELECT count(*) FROM events"))).scalar_one())
    finally:
        await engine.dispose()


async def backup_store(service: str, url: str, out: Path) -> Manifest:
    """A consistent copy of a running service's store, and its manifest beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        if is_sqlite(url):
            manifest = await _backup_sqlite(service, url, partial)
        else:
            manifest = await _backup_postgres(service, url, partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    manifest.file = out.name
    manifest.write(out)
    return manifest


async def _backup_sqlite(service: str, url: str, partial: Path) -> Manifest:
    source_path = _sqlite_path(url)
    if not source_path.exists():
        raise OperationFailed(f"{source_path} does not exist")

    def copy() -> None:
        # The online backup API copies one consistent snapshot while writers go on.
        source, target = sqlite3.connect(source_path), sqlite3.connect(partial)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
            source.close()

    await asyncio.to_thread(copy)
    copied = EventStore(f"sqlite+aiosqlite:///{partial}")
    try:  # the copy itself is what is checked: its chain, its head
        result = await copied.verify()
        head, head_hash = await _head_of(copied)
    finally:
        await copied.close()
    sha256, size = await asyncio.to_thread(_file_facts, partial)
    return Manifest(service=service, backend="sqlite", file="", sha256=sha256,
                    size=size, created_at=datetime.now(UTC).isoformat(),
                    head_position=head, head_hash=head_hash, chain_ok=result.ok,
                    events_checked=result.events_checked,
                    first_broken_position=result.first_broken_position,
                    tool=f"sqlite3 backup API (SQLite {sqlite3.sqlite_version})")


async def _backup_postgres(service: str, url: str, partial: Path) -> Manifest:
    pg_dump = pg_tool("pg_dump")
    dsn, env = _libpq(url)
    engine = create_engine(url)
    try:
        # One snapshot for the head read here and for pg_dump (--snapshot): the manifest's head
        # is exactly the dump's, however many writes commit meanwhile.
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                snapshot = (await conn.execute(sa.text("SELECT pg_export_snapshot()"))
                            ).scalar_one()
                top = (await conn.execute(sa.text(
                    "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"))).first()
                await _run([pg_dump, "--format=custom", f"--snapshot={snapshot}",
                            f"--file={partial}", f"--dbname={dsn}"], env)
    finally:
        await engine.dispose()
    head, head_hash = (int(top[0]), str(top[1])) if top else (0, None)
    store = EventStore(url)
    try:  # the chain as it stands; the dump's head must be on it with the same hash
        result = await store.verify()
        still = (await store.hashes_at([head])).get(head) if head else None
    finally:
        await store.close()
    ok = result.ok and still == head_hash
    version = await _run([pg_dump, "--version"], env)
    sha256, size = await asyncio.to_thread(_file_facts, partial)
    return Manifest(service=service, backend="postgresql", file="", sha256=sha256,
                    size=size, created_at=datetime.now(UTC).isoformat(),
                    head_position=head, head_hash=head_hash, chain_ok=ok,
                    events_checked=min(result.events_checked, head) if result.ok else
                    result.events_checked,
                    first_broken_position=result.first_broken_position, tool=version)


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    chain_ok: bool
    events_checked: int
    first_broken_position: int | None
    head_position: int
    head_hash: str | None
    replaced: int  # events the target held before (only with force)

    @property
    def matches(self) -> bool:
        return (self.head_position == self.manifest.head_position
                and self.head_hash == self.manifest.head_hash)


async def restore_store(service: str, source: Path, url: str, force: bool = False) -> Restored:
    """Put a backup back into a database, then verify its chain against the manifest."""
    if not await asyncio.to_thread(source.exists):
        raise OperationFailed(f"{source} does not exist")
    manifest = Manifest.read(source)
    if manifest.service != service:
        raise OperationFailed(f"{source} is a backup of {manifest.service}, not {service}")
    backend = "sqlite" if is_sqlite(url) else "postgresql"
    if manifest.backend != backend:
        raise OperationFailed(f"{source} is a {manifest.backend} backup; {url.split(':')[0]} "
                              f"is {backend}")
    if _sha256(source) != manifest.sha256:
        raise OperationFailed(f"{source} is not the file its manifest describes (SHA-256 "
                              "differs): damaged or replaced")
    held = await _has_events(url)
    if held and not force:
        raise OperationFailed(f"the target already holds {held} event(s): restoring over a "
                              "store would replace its history; stop its service, and pass "
                              "--force if that is what you mean")
    if backend == "sqlite":
        await asyncio.to_thread(_restore_sqlite, source, _sqlite_path(url))
    else:
        dsn, env = _libpq(url)
        await _run([pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner",
                    "--no-privileges", "--single-transaction", "--exit-on-error",
                    f"--dbname={dsn}", str(source)], env)
    store = EventStore(url)
    try:
        result = await store.verify()
        head, head_hash = await _head_of(store)
    finally:
        await store.close()
    return Restored(manifest, result.ok, result.events_checked, result.first_broken_position,
                    head, head_hash, held)


def _restore_sqlite(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    backup, live = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(target)
    try:
        backup.backup(live)  # replaces every page of the target, in one go
        live.execute("PRAGMA journal_mode=WAL")  # as the services open it
    finally:
        live.close()
        backup.close()


def _service(name: str) -> str:
    if name not in SERVICES:
        raise _fail(f"service is one of {', '.join(SERVICES)}")
    return name


def backup(service: str = typer.Argument(..., help=", ".join(SERVICES)),
           database_url: str = typer.Argument(..., help="the service's SQLAlchemy async URL"),
           out: Path = typer.Argument(..., help="the backup file to write")) -> None:
    """Copy a service's store while it runs: pg_dump (custom format, one snapshot) on
    PostgreSQL, the online backup API on SQLite. Beside it, OUT.manifest.json records the
    chain head (position, hash), whether the chain verified, and the file's SHA-256.
    Exit 1 (the backup still written) when the chain does not verify."""
    _service(service)
    try:
        manifest = _run_or_exit(backup_store(service, database_url, out))
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"wrote {out} and {Manifest.path_for(out)}: {service} ({manifest.backend}) "
               f"head_position={manifest.head_position} head_hash={manifest.head_hash} "
               f"chain_ok={manifest.chain_ok} sha256={manifest.sha256}")
    if not manifest.chain_ok:
        typer.echo(f"warning: the chain does not verify (first broken position "
                   f"{manifest.first_broken_position}); kept as evidence", err=True)
        raise typer.Exit(1)


def restore(service: str = typer.Argument(..., help=", ".join(SERVICES)),
            source: Path = typer.Argument(..., metavar="IN", help="a file `trial backup` wrote"),
            database_url: str = typer.Argument(..., help="where to restore it (the database "
                                                         "must exist; its service stopped)"),
            force: bool = typer.Option(False, "--force",
                                       help="replace a database that already holds events")
            ) -> None:
    """Restore a backup, then verify the chain and compare its head with the manifest's.
    Refuses a target that already holds events (unless --force), a backup of another service
    or backend, and a file whose SHA-256 is not the manifest's. Exit 1 unless it verifies and
    matches."""
    _service(service)
    try:
        done = _run_or_exit(restore_store(service, source, database_url, force))
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc
    if done.replaced:
        typer.echo(f"replaced {done.replaced} event(s) the target held (--force)", err=True)
    m = done.manifest
    typer.echo(f"restored {service} from {source} (backed up {m.created_at}): "
               f"ok={done.chain_ok} events_checked={done.events_checked} "
               f"first_broken_position={done.first_broken_position} "
               f"head_position={done.head_position} head_hash={done.head_hash} "
               f"matches_backup={'yes' if done.matches else 'no'}")
    if not done.matches:
        typer.echo(f"error: the backup's head was {m.head_position} {m.head_hash}", err=True)
    if not (done.chain_ok and done.matches):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# Rebuilding the audit ledger from the topics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rebuilt:
    group: str
    records: int  # read from the topics
    filed: int  # ledger entries written
    duplicates: int
    dead_lettered: int
    chain_ok: bool
    events_checked: int
    head_position: int
    head_hash: str | None


async def _end_offsets(settings: Settings, topics: Sequence[str], group: str
                       ) -> dict[Any, int]:
    """The ends of `topics` (logical names) now, once it is sure that `group` has committed no
    offset on them (it would resume there, not read from the beginning)."""
    from aiokafka import AIOKafkaConsumer

    from shared.kafka import client_options, known_partitions, physical

    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                group_id=physical(settings, group))  # as ConsumerRunner's
    try:
        await consumer.start()
        tps = [tp for topic in topics
               for tp in await known_partitions(consumer, physical(settings, topic))]
        for tp in tps:
            if await consumer.committed(tp) is not None:
                raise OperationFailed(f"consumer group {group} has read {tp.topic} before: it "
                                      "would not start from the beginning; give a new --group")
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def rebuild_ledger(url: str, bootstrap: str, topics: Sequence[str] = LEDGER_TOPICS,
                         group: str | None = None, timeout: float = 600.0,
                         progress: Any = None) -> Rebuilt:
    """File every record of `topics`, from the beginning to their ends when asked, into the
    empty audit ledger at `url`, with the audit service's own handler and consumer runner (a
    consumer group of its own, so the running service's group is left alone); then verify."""
    from services.audit.handlers import handlers
    from shared.consumer import ConsumerRunner
    from shared.migrate import upgrade
    from shared.protocol import load_protocol

    held = await _has_events(url)
    if held:
        raise OperationFailed(f"the target already holds {held} event(s): rebuild into a fresh "
                              "database")
    group = group or f"audit-rebuild-{uuid.uuid4().hex[:8]}"
    # The environment's SASL settings and topic prefix, as the audit service's (D48, D52).
    settings = Settings(service_name="audit", database_url=url,
                        kafka_bootstrap_servers=bootstrap)
    ends = {tp: end for tp, end in (await _end_offsets(settings, topics, group)).items()
            if end > 0}
    await upgrade(url)
    store = EventStore(url)
    try:
        runner = ConsumerRunner(store, settings, list(topics),
                                handlers(load_protocol(settings.protocol_dir)), group_id=group)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        deadline = time.monotonic() + timeout
        try:
            while any(runner.committed_here.get(tp, 0) < end for tp, end in ends.items()):
                if task.done():
                    task.result()
                    raise OperationFailed("the consumer stopped before the topics' ends")
                if time.monotonic() > deadline:
                    raise OperationFailed(f"timed out after {timeout:.0f} s with "
                                          f"{runner.records_seen} records read")
                if progress is not None:
                    progress(runner.records_seen)
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await task
        result = await store.verify()
        head, head_hash = await _head_of(store)
    finally:
        await store.close()
    return Rebuilt(group, runner.records_seen, runner.handled, runner.duplicates,
                   runner.dead_lettered, result.ok, result.events_checked, head, head_hash)


def rebuild_projection(
        projection: str = typer.Argument(..., help="audit: the one store made only of topics"),
        database_url: str = typer.Argument(..., help="a fresh, empty database for the ledger"),
        bootstrap: str | None = BOOTSTRAP,
        topic: list[str] = typer.Option(
            [], help="a topic to read (repeatable; default: every ledger topic)"),
        group: str | None = typer.Option(
            None, help="a consumer group that has never read these topics (default: a new "
                       "audit-rebuild-…); never the running audit service's"),
        timeout: float = typer.Option(600.0, help="seconds to reach the topics' ends")) -> None:
    """Rebuild the audit ledger in a fresh database from the topics, from their beginning (they
    are kept forever), through the audit service's own consumer path; then verify its chain.

    The rebuilt ledger files records in the order read, so it is a new chain (a new ledger id,
    anchored afresh once the audit service runs on it): compare contents, not hashes, with the
    old one. Exit 1 if its chain does not verify."""
    if projection != "audit":
        raise _fail("only the audit ledger is a projection of the topics (the other services' "
                    "stores hold their own decisions, the topics' source): give `audit`")
    unknown = sorted(set(topic) - set(TOPICS)) if topic else []
    if unknown:
        typer.echo(f"note: not trial topics: {', '.join(unknown)}", err=True)
    try:
        done = _run_or_exit(rebuild_ledger(database_url, _bootstrap(bootstrap),
                                          topic or LEDGER_TOPICS, group, timeout))
    except OperationFailed as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"rebuilt the audit ledger with group {done.group}: records_read={done.records} "
               f"filed={done.filed} duplicates={done.duplicates} "
               f"dead_lettered={done.dead_lettered} ok={done.chain_ok} "
               f"events_checked={done.events_checked} head_position={done.head_position} "
               f"head_hash={done.head_hash}")
    if done.dead_lettered:
        typer.echo(f"warning: {done.dead_lettered} record(s) went to the DLQs (consumer "
                   f"{done.group}): see `trial dlq list`", err=True)
    if not done.chain_ok:
        raise typer.Exit(1)
