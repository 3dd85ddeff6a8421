"""Benchmark: this project's event-store append against two peers, in one run, on PostgreSQL.

    .venv/bin/python -m bench.store_peers                      # 8 writers, 2,000 events, 3 rounds
    .venv/bin/python -m bench.store_peers --writers 32 --batch 10
    .venv/bin/python -m bench.store_peers --durable              # fsync and synchronous_commit on

Each round runs the three stores one after the other (interleaved, so a busy moment of the
machine hurts all three alike), each on a fresh database of the dev cluster `deploy/infra.py`
starts; the figures are the medians over the rounds, and the ratios the project's figure over
each peer's (issue 13, target 1):

- `insert`: a plain asyncpg INSERT of the same row shape into a table with the same unique
  keys, no lock, no chain: what the database itself accepts;
- `eventsourcing`: the `eventsourcing` library's PostgreSQL application recorder (psycopg 3, a
  table lock for ordered notification ids), driven by as many threads as writers;
- `project`: `shared.store.EventStore.append` (gapless positions in commit order, expected
  versions, the hash chain, immutability triggers).

`--durable` turns the dev cluster's `fsync`, `synchronous_commit` and `full_page_writes` on for
the run (ALTER SYSTEM and a reload, reset after): production durability, every commit flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import asyncpg

from deploy import infra
from shared.migrate import upgrade
from shared.store import EventStore, NewEvent

DATA = {"patient_id": "PT-0123456789AB", "site_id": "S1", "arm": "msc_low", "week": 3,
        "cells_administered": 70_000_000, "lot_number": "L-1"}
INSERT_TABLE = """CREATE TABLE events (
    position BIGSERIAL PRIMARY KEY, stream_id TEXT NOT NULL, stream_version INT NOT NULL,
    event_id UUID NOT NULL UNIQUE, type TEXT NOT NULL, data JSONB NOT NULL,
    metadata JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream_id, stream_version))"""


def _figures(latencies: list[float], events: int, elapsed: float) -> dict[str, float]:
    latencies.sort()
    return {"events_per_s": events / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000}


async def _drive(writers: int, appends: int, append: Callable[[int, int], Awaitable[None]],
                 batch: int) -> dict[str, float]:
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for n in range(appends):
            started = time.perf_counter()
            await append(w, n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return _figures(latencies, writers * appends * batch, time.perf_counter() - started)


async def project(url: str, writers: int, appends: int, batch: int) -> dict[str, float]:
    await upgrade(url)
    store = EventStore(url)

    async def append(w: int, n: int) -> None:
        await store.append(f"bench-{w}", [NewEvent("InfusionGiven", {**DATA, "n": n, "i": i})
                                          for i in range(batch)], n * batch)
    try:
        return await _drive(writers, appends, append, batch)
    finally:
        await store.close()


async def plain_insert(dsn: str, writers: int, appends: int, batch: int) -> dict[str, float]:
    pool = await asyncpg.create_pool(dsn, min_size=writers, max_size=writers)
    assert pool is not None
    await pool.execute(INSERT_TABLE)
    sql = ("INSERT INTO events (stream_id, stream_version, event_id, type, data, metadata) "
           "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)")

    async def append(w: int, n: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(sql, [
                (f"bench-{w}", n * batch + i, uuid.uuid4(), "InfusionGiven",
                 json.dumps({**DATA, "n": n, "i": i}), json.dumps({"actor": "bench"}))
                for i in range(batch)])
    try:
        return await _drive(writers, appends, append, batch)
    finally:
        await pool.close()


def eventsourcing_recorder(dsn: str, writers: int, appends: int, batch: int) -> dict[str, float]:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    parts = urlsplit(dsn)
    datastore = PostgresDatastore(parts.path.lstrip("/"), parts.hostname or "127.0.0.1",
                                  parts.port or 5432, parts.username or "", parts.password or "",
                                  pool_size=writers, max_overflow=0)
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()
    streams = [uuid.uuid4() for _ in range(writers)]
    latencies: list[float] = []

    def writer(w: int) -> None:
        for n in range(appends):
            events = [StoredEvent(originator_id=streams[w], originator_version=n * batch + i + 1,
                                  topic="InfusionGiven",
                                  state=json.dumps({**DATA, "n": n, "i": i}).encode())
                      for i in range(batch)]
            started = time.perf_counter()
            recorder.insert_events(events)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))
    elapsed = time.perf_counter() - started
    datastore.close()
    return _figures(latencies, writers * appends * batch, elapsed)


DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


@contextmanager
def durable(dsn: str, on: bool) -> Iterator[None]:
    """Production durability on the dev cluster for the duration (a no-op unless `on`)."""
    async def apply(statements: list[str]) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("SELECT pg_reload_conf()")
            settings = {s: await conn.fetchval(f"SHOW {s}") for s in DURABILITY}
            print("  server: " + " ".join(f"{k}={v}" for k, v in settings.items()))
        finally:
            await conn.close()

    if not on:
        yield
        return
    asyncio.run(apply([f"ALTER SYSTEM SET {s} = on" for s in DURABILITY]))
    try:
        yield
    finally:
        asyncio.run(apply([f"ALTER SYSTEM RESET {s}" for s in DURABILITY]))


def _fresh(dsn: str, label: str) -> tuple[str, str]:
    name = f"{label}_{uuid.uuid4().hex[:8]}"
    infra.create_database(dsn, name)
    return name, f"postgresql://{urlsplit(dsn).netloc}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--events", type=int, default=2000, help="events per store per round")
    parser.add_argument("--batch", type=int, default=1, help="events per append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--durable", action="store_true",
                        help="fsync, synchronous_commit and full_page_writes on for the run")
    args = parser.parse_args()
    appends = args.events // (args.writers * args.batch)
    dsn = infra.start_postgres()
    results: dict[str, list[dict[str, float]]] = {"insert": [], "eventsourcing": [],
                                                  "project": []}
    with durable(dsn, args.durable):
        _rounds(dsn, args, appends, results)
    median = {store: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
              for store, runs in results.items()}
    print(f"writers={args.writers} batch={args.batch} events={appends * args.writers * args.batch}"
          f" rounds={args.rounds} durable={args.durable} (medians)")
    for store, figures in median.items():
        print(f"  {store:<14}" + "  ".join(f"{k}={v:.1f}" for k, v in figures.items()))
    ours = median["project"]["events_per_s"]
    print(f"  ratio project/insert={ours / median['insert']['events_per_s']:.2f} "
          f"project/eventsourcing={ours / median['eventsourcing']['events_per_s']:.2f} "
          "(targets >= 0.5 and >= 3)")


def _rounds(dsn: str, args: argparse.Namespace, appends: int,
            results: dict[str, list[dict[str, float]]]) -> None:
    for _ in range(args.rounds):
        for store in results:
            name, url = _fresh(dsn, f"peers_{store}")
            try:
                if store == "insert":
                    found = asyncio.run(plain_insert(url, args.writers, appends, args.batch))
                elif store == "eventsourcing":
                    found = eventsourcing_recorder(url, args.writers, appends, args.batch)
                else:
                    found = asyncio.run(project(url.replace("postgresql://",
                                                            "postgresql+asyncpg://"),
                                                args.writers, appends, args.batch))
                results[store].append(found)
            finally:
                infra.drop_database(dsn, name)


if __name__ == "__main__":
    main()
