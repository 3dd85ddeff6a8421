"""Benchmark: event-store append throughput and latency under concurrent writers, both backends.

    .venv/bin/python -m bench.store_append --backend embedded
    .venv/bin/python -m bench.store_append --backend real     # starts PostgreSQL itself

Measures what the single store-wide append lock costs: W concurrent writers each append N
one-event transactions to their own stream, through one service's store (the normal case) or,
with --processes, each through its own engine (like replicas sharing one database).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.databases import bench_database
from shared.migrate import upgrade
from shared.store import EventStore, NewEvent


async def run(url: str, writers: int, per_writer: int, shared: bool) -> dict[str, float]:
    await upgrade(url)
    one = EventStore(url)
    stores = [one] * writers if shared else [EventStore(url) for _ in range(writers)]
    latencies: list[float] = []

    async def write(i: int, store: EventStore) -> None:
        for n in range(per_writer):
            started = time.perf_counter()
            await store.append(f"bench-{i}", [NewEvent("BenchHappened", {"n": n, "w": i})], n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(write(i, s) for i, s in enumerate(stores)))
    elapsed = time.perf_counter() - started
    verify_started = time.perf_counter()
    result = await stores[0].verify()
    verify_s = time.perf_counter() - verify_started
    assert result.ok and result.events_checked == writers * per_writer
    for s in set(stores):
        await s.close()
    latencies.sort()
    return {
        "events": writers * per_writer,
        "events_per_s": writers * per_writer / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "verify_events_per_s": result.events_checked / verify_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=250)
    parser.add_argument("--processes", action="store_true",
                        help="one engine per writer (like replicas) instead of one service's store")
    args = parser.parse_args()
    with bench_database(args.backend) as url:
        stats = asyncio.run(run(url, args.writers, args.per_writer, not args.processes))
    mode = "engine-per-writer" if args.processes else "one-store"
    print(f"backend={args.backend} mode={mode} writers={args.writers} " +
          " ".join(f"{k}={v:.1f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
