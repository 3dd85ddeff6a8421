"""Benchmark: the audit ledger at a million events: the query by patient, and the whole export.

    .venv/bin/python -m bench.audit_scale --backend embedded          # SQLite, 1,000,000 events
    .venv/bin/python -m bench.audit_scale --backend real --events 200000   # PostgreSQL

Issue 13, target 5: a query by patient on a ledger of 1,000,000 events answers with p99 at most
20 ms; the export of the whole ledger streams at 20,000 events/s or more, with flat memory.

Builds the ledger first: `bench.scale`'s patients' lives (70 events each, so 1,000,000 events
are some 14,000 patients), as CloudEvents, filed by the audit consumer's own command
(`services.audit.commands.record`: the patient's stream, the envelope in the metadata) and
appended through `EventStore` 5,000 a transaction (the hash chain is the store's). Then, on
random patients, interleaved, the patient history three ways: the function the route calls
(`services.audit.query.patient_history_json`), the route itself over HTTP (the audit app under
uvicorn in this process), and the peer: one plain SQL SELECT of the same rows (sqlite3 or
asyncpg). Last the export of the whole ledger: the route's stream in process
(`services.audit.export.export_stream`), the route over HTTP, and the peer: a plain SQL cursor
over the same rows; events/s and this process's resident memory while streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import cast

import httpx
import uvicorn

from bench.databases import bench_database
from bench.scale import (
    PER_PATIENT,
    Memory,
    PlainSql,
    Timing,
    clocked,
    cloud_events,
    fill,
    patient_id,
    screening_id,
)
from bench.system import percentile
from services.audit import query
from services.audit.app import spec
from services.audit.commands import record
from services.audit.export import export_stream
from shared.app import Runtime, create_app
from shared.auth import issue_dev_token
from shared.consumer import Delivery
from shared.db import is_sqlite
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore, NewEvent, Transaction

SECRET = "bench-" + uuid.uuid4().hex
QUERY_P99_MS = 20.0
EXPORT_PER_S = 20_000.0
HISTORY_SQL = "SELECT * FROM events WHERE stream_id IN ($1, $2) ORDER BY position"


class Filing:
    """What `record` asks of a transaction, keeping what it files instead of staging it: every
    event id here is new, so its duplicate check has nothing to find."""

    def __init__(self) -> None:
        self.filed: list[tuple[str, NewEvent]] = []

    async def has_event(self, event_id: str) -> bool:
        return False

    async def append(self, stream_id: str, new_events: Sequence[NewEvent],
                     expected_version: int | None) -> None:
        self.filed += [(stream_id, new) for new in new_events]


async def ledger_entries(patients: int) -> AsyncIterator[tuple[str, NewEvent]]:
    filing = Filing()
    for topic, cloud in cloud_events(patients):
        await record(cast(Transaction, filing), Delivery(cloud, None, topic))
        yield filing.filed.pop()


@asynccontextmanager
async def audit_http(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The audit app under uvicorn on a free port (no consumer, relay nor anchorer: only its
    routes), and a client with a DSMB member's token."""
    settings = Settings(service_name="audit", database_url=url, relay_enabled=False,
                        consumers_enabled=False, jwt_secret=SECRET)
    app = create_app(spec, settings)
    app.state.runtime = Runtime(spec, settings)
    # Listening before it serves, so requests queue until it does. IPPROTO_TCP named, or asyncio
    # leaves Nagle on (it sets TCP_NODELAY only on sockets of that proto): 40 ms a response.
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                           access_log=False))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    headers = {"Authorization": f"Bearer {issue_dev_token(SECRET, 'dsmb')}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                     timeout=3600) as client:
            yield client
    finally:
        server.should_exit = True
        await task
        await app.state.runtime.store.close()


Latencies = dict[str, list[Timing]]


async def queries(store: EventStore, peer: PlainSql, client: httpx.AsyncClient,
                  patients: list[int]) -> Latencies:
    """Each patient's history three ways, one after the other; each way's timings."""
    async def in_process(n: int) -> int:
        return len(await query.patient_history_json(store, patient_id(n)))

    async def over_http(n: int) -> int:
        r = await client.get(f"/v1/audit/patients/{patient_id(n)}/history")
        r.raise_for_status()
        return len(r.json()["items"])

    async def plain(n: int) -> int:
        return len(await peer.rows(HISTORY_SQL, patient_id(n), screening_id(n)))

    # The route over HTTP last: it files the DSMB's read under the patient before it answers
    # (D50), so a way after it would see one entry more.
    ways: dict[str, Callable[[int], Awaitable[int]]] = {
        "plain SQL": plain, "project": in_process, "project (HTTP)": over_http}
    timings: Latencies = {way: [] for way in ways}
    for n in patients:
        found = {}
        for way, call in ways.items():
            with clocked() as timing:
                found[way] = await call(n)
            timings[way].append(timing)
        assert len(set(found.values())) == 1 and found["plain SQL"] > 0, (n, found)
    return timings


async def exports(store: EventStore, peer: PlainSql, client: httpx.AsyncClient,
                  total: int) -> dict[str, tuple[Timing, Memory]]:
    """The whole ledger three ways: each way's time and memory."""
    async def in_process(memory: Memory) -> int:
        lines = 0
        async for chunk in export_stream(store, query.Filters(), "ndjson"):
            lines += chunk.count(b"\n")
            memory.sample(lines)
        return lines

    async def over_http(memory: Memory) -> int:
        lines = 0
        async with client.stream("GET", "/v1/audit/export") as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                lines += chunk.count(b"\n")
                memory.sample(lines)
        return lines

    async def plain(memory: Memory) -> int:
        rows = 0
        async for _ in peer.stream("SELECT * FROM events ORDER BY position"):
            rows += 1
            if rows % 1000 == 0:
                memory.sample(rows)
        return rows

    found: dict[str, tuple[Timing, Memory]] = {}
    for way, run in (("plain SQL", plain), ("project", in_process),
                     ("project (HTTP)", over_http)):
        memory = Memory(total)
        with clocked() as timing:
            streamed = await run(memory)
        assert streamed == total, (way, streamed, total)
        found[way] = (timing, memory)
    return found


def p99_ms(timings: list[Timing]) -> float:
    return percentile([t.wall * 1000 for t in timings], 0.99)


def show_queries(timings: Latencies) -> None:
    for way, found in timings.items():
        print(f"  {way:<15} p50 {statistics.median(t.wall for t in found) * 1000:6.2f} ms   "
              f"p99 {p99_ms(found):6.2f} ms   "
              f"cpu {statistics.fmean(t.cpu for t in found) * 1000:5.2f} ms a query")
    p99 = p99_ms(timings["project (HTTP)"])
    print(f"  target p99 <= {QUERY_P99_MS:.0f} ms: {'met' if p99 <= QUERY_P99_MS else 'NOT met'}"
          f" (HTTP p99 / plain SQL p99 = {p99 / p99_ms(timings['plain SQL']):.1f})")


def show_exports(streamed: dict[str, tuple[Timing, Memory]], total: int) -> None:
    for way, (timing, memory) in streamed.items():
        print(f"  {way:<15} {total / timing.wall:9,.0f} events/s "
              f"({total / timing.cpu:9,.0f} a CPU second)   {memory.figures()}")
    rate = total / streamed["project (HTTP)"][0].wall
    print(f"  target >= {EXPORT_PER_S:,.0f} events/s: {'met' if rate >= EXPORT_PER_S else 'NOT met'}"
          f" (HTTP / plain SQL = {rate * streamed['plain SQL'][0].wall / total:.2f})")


async def run(url: str, events: int, sample: int, seed: int) -> None:
    await upgrade(url)
    store = EventStore(url)
    peer = await PlainSql.connect(url)
    try:
        patients = max(1, events // PER_PATIENT)
        with clocked() as built:
            total = await fill(store, ledger_entries(patients))
        print(f"built: {total:,} events of {patients:,} patients in {built.wall:.0f} s "
              f"({total / built.wall:,.0f} events/s, CPU {built.cpu:.0f} s: making the "
              "CloudEvents, `record`, EventStore.append)")
        if not is_sqlite(url):  # what autovacuum does a minute after such a load
            await peer.rows("ANALYZE events")
        chosen = random.Random(seed).sample(range(patients), min(sample, patients))
        async with audit_http(url) as client:
            for n in chosen[:5]:  # warm up: connections, caches
                await query.patient_history_json(store, patient_id(n))
                await client.get(f"/v1/audit/patients/{patient_id(n)}/history")
            timings = await queries(store, peer, client, chosen)
            print(f"query by patient ({len(chosen)} patients, {PER_PATIENT} entries each):")
            show_queries(timings)
            total = await store.head()  # with the DSMB's reads the route filed (D50)
            streamed = await exports(store, peer, client, total)
        print(f"export of the whole ledger ({total:,} events, NDJSON):")
        show_exports(streamed, total)
    finally:
        await peer.close()
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500, help="patients queried")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    print(f"backend={args.backend} events={args.events:,}")
    with bench_database(args.backend, "audit_scale") as url:
        asyncio.run(run(url, args.events, args.queries, args.seed))


if __name__ == "__main__":
    main()
