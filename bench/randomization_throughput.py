"""Benchmark: concurrent randomizations through the service layer, both backends, and how their
rate holds up as the trial grows (issue 13, target 2: the rate at 500 patients at least 0.9x the
rate at 50).

    .venv/bin/python -m bench.randomization_throughput --backend embedded
    .venv/bin/python -m bench.randomization_throughput --backend real   # starts PostgreSQL itself

For each trial size N (`--at 50,500`), on a fresh database: N patients are screened and enrolled,
N - `--measured` are randomized untimed, then the last `--measured` (50) are randomized by
`--concurrency` (16) callers at once and timed, so each figure is the rate at that size. The run
then checks the randomization numbers are 1..N without a gap. Each randomization reads the
trial-wide `allocation` (only what is newer than the process's snapshot of it, D39), the
`safety-holds` stream and the patient, and draws the stratum's next slot from the secret.
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


async def run(url: str, patients: int, measured: int, concurrency: int,
              method: str) -> dict[str, float]:
    await upgrade(url)
    store = EventStore(url)
    base = default_protocol()
    protocol = base.model_copy(update={
        "enrollment_cap": patients,
        "randomization": base.randomization.model_copy(update={"method": method})})
    ids: list[str] = []
    for n in range(patients):
        screened = await commands.screen(store, facts(14.2 if n % 2 else 30.0), WHO, protocol, META)
        enrolled = await commands.enrol(store, screened.screening_id, WHO, protocol, META)
        assert enrolled.patient_id is not None
        ids.append(enrolled.patient_id)
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def randomize(patient_id: str) -> None:
        async with gate:
            started = time.perf_counter()
            await commands.randomize(store, patient_id, WHO, protocol, b"bench-secret", META)
            latencies.append(time.perf_counter() - started)

    for patient_id in ids[:patients - measured]:  # the trial so far, untimed
        await commands.randomize(store, patient_id, WHO, protocol, b"bench-secret", META)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(randomize(p) for p in ids[patients - measured:]))
    elapsed = time.perf_counter() - started
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == list(range(1, patients + 1))
    await store.close()
    latencies.sort()
    return {"patients": patients, "per_s": measured / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--at", default="50,500", help="trial sizes, comma-separated")
    parser.add_argument("--measured", type=int, default=50,
                        help="randomizations timed at each size (the last ones)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--method", choices=["permuted_blocks", "minimization"],
                        default="permuted_blocks")
    args = parser.parse_args()
    sizes = [int(n) for n in args.at.split(",")]
    found: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    print(f"backend={args.backend} method={args.method} concurrency={args.concurrency} "
          f"measured={args.measured} rounds={args.rounds} (medians; sizes interleaved)")
    for _ in range(args.rounds):
        for size in sizes:
            with bench_database(args.backend) as url:
                found[size].append(asyncio.run(run(url, size, min(args.measured, size),
                                                   args.concurrency, args.method)))
    rates = []
    for runs in found.values():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rates.append(median["per_s"])
        print("  " + " ".join(f"{k}={v:.1f}" for k, v in median.items()))
    print(f"  ratio at {sizes[-1]} / at {sizes[0]} = {rates[-1] / rates[0]:.2f} (target >= 0.9)")

if __name__ == "__main__":
    main()
