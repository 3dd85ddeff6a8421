"""Benchmark: concurrent randomizations through the service layer, both backends.

    .venv/bin/python -m bench.randomization_throughput --backend embedded
    .venv/bin/python -m bench.randomization_throughput --backend real   # starts PostgreSQL itself

Each randomization folds the trial-wide `allocation` stream and the `safety-holds` stream and
regenerates the stratum's blocks from the secret, under the store's write lock; this measures
what that costs as the allocation grows (the trial has 57 patients; the default runs 500).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.databases import bench_database
from services.randomization import commands
from shared.auth import Principal
from shared.migrate import upgrade
from shared.protocol import default_protocol
from shared.store import EventStore, Metadata
from tests.integration.test_randomization_store import facts

WHO = Principal("bench", "site_coordinator", "S1")
META = Metadata(actor="bench", role="site_coordinator", site="S1")


async def run(url: str, patients: int, concurrency: int, method: str) -> dict[str, float]:
    await upgrade(url)
    store = EventStore(url)
    base = default_protocol()
    protocol = base.model_copy(update={
        "enrollment_cap": patients,
        "randomization": base.randomization.model_copy(update={"method": method})})
    ids = []
    for n in range(patients):
        screened = await commands.screen(store, facts(14.2 if n % 2 else 30.0), WHO, protocol, META)
        ids.append((await commands.enrol(store, screened.screening_id, WHO, protocol, META)
                    ).patient_id)
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def randomize(patient_id: str | None) -> None:
        assert patient_id is not None
        async with gate:
            started = time.perf_counter()
            await commands.randomize(store, patient_id, WHO, protocol, b"bench-secret", META)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(randomize(p) for p in ids))
    elapsed = time.perf_counter() - started
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == list(range(1, patients + 1))
    await store.close()
    latencies.sort()
    return {"randomizations": patients, "per_s": patients / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--method", choices=["permuted_blocks", "minimization"],
                        default="permuted_blocks")
    args = parser.parse_args()
    with bench_database(args.backend) as url:
        stats = asyncio.run(run(url, args.patients, args.concurrency, args.method))
    print(f"backend={args.backend} method={args.method} concurrency={args.concurrency} " +
          " ".join(f"{k}={v:.1f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
