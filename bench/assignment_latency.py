"""Benchmark (issue 13, target 3): from a randomize request to its ArmAssigned on the broker.

    .venv/bin/python -m bench.assignment_latency                    # SQLite + the embedded broker
    .venv/bin/python -m bench.assignment_latency --backend real     # PostgreSQL + Apache Kafka

Starts the whole system (bench/system.py: every service and the gateway as processes, a broker of
its own, a protocol copy whose cap fits the cohort), screens and enrols the cohort through the
gateway, lets the services catch up, and subscribes an outside aiokafka consumer to
trial.enrollment, from its end, without a group (as a pharmacy or a warehouse would read). Then,
per rate, it sends `POST /v1/patients/{id}/randomization` open-loop (at fixed times, whatever the
answers) for --seconds, and measures, per request, from its send time to the moment the consumer
receives that patient's ArmAssigned. Target: p99 at most 50 ms at 10/s and 100 ms at 50/s.
The peer figure is the same request's HTTP response time: the floor, the commit included, so
the ratio and the difference show what the relay and the broker add. Each answer's
`Server-Timing` (D90) shows where the answer's own time went: the randomization service's wait
for its group commit and for the broker, its whole, and the gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import httpx
from aiokafka import AIOKafkaConsumer

from bench.system import (
    UNLIMITED,
    Running,
    cpu_seconds,
    percentile,
    pids,
    screening,
    token,
    wait_quiet,
    whole_system,
)
from shared.events import ENROLLMENT
from shared.kafka import client_options, known_partitions, physical
from shared.settings import Settings
from shared.timing import entries

TARGETS_MS = {10: 50.0, 50: 100.0}  # rate (requests/s) -> p99 target
# An answer's Server-Timing parts (D90), the innermost first: the randomization service's wait
# for its group commit and for the broker, its whole, the gateway's round trip to it, its whole.
PARTS = ("commit", "publish", "app", "upstream", "gateway")
WARMUP = 5


@dataclass
class Phase:
    rate: float
    sent: dict[str, float] = field(default_factory=dict)  # patient -> send time
    answered: dict[str, float] = field(default_factory=dict)  # patient -> 201 received
    parts: list[dict[str, float]] = field(default_factory=list)  # each 201's Server-Timing (D90)
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cores used while sending
    late: float = 0.0  # the worst delay of a send behind its schedule (the client's own lag)


class Watcher:
    """An outside reader of trial.enrollment: when it first received each patient's ArmAssigned."""

    def __init__(self, bootstrap: str, fetch_wait_ms: int) -> None:
        # The environment's SASL settings and topic prefix, as the services' (D48, D52).
        self.settings = Settings(kafka_bootstrap_servers=bootstrap)
        self.consumer = AIOKafkaConsumer(**client_options(self.settings),
                                         enable_auto_commit=False, fetch_max_wait_ms=fetch_wait_ms)
        self.seen: dict[str, float] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        partitions = await known_partitions(self.consumer, physical(self.settings, ENROLLMENT))
        assert partitions, "trial.enrollment does not exist yet"
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end now, not when the first fetch goes out
            await self.consumer.position(tp)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    event = json.loads(record.value or b"{}")
                    if event.get("type") == "ArmAssigned":
                        self.seen.setdefault(event["subject"], now)

    async def wait_for(self, patients: list[str], timeout: float) -> None:
        for _ in range(int(timeout / 0.05)):
            if all(p in self.seen for p in patients):
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.consumer.stop()


async def enrol(site: httpx.AsyncClient, count: int, concurrency: int = 8) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> str:
        async with gate:
            r = await site.post("/v1/screenings", json=screening(pasi=30.0 if n % 2 else 14.2))
            assert r.status_code == 201 and r.json()["eligible"], r.text
            r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
            assert r.status_code == 201, r.text
            patient: str = r.json()["patient_id"]
            return patient

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def load(site: httpx.AsyncClient, patients: list[str], phase: Phase) -> None:
    """Randomize `patients` at `phase.rate` per second, each at its own scheduled time."""

    async def one(patient: str) -> None:
        phase.sent[patient] = time.perf_counter()
        try:
            r = await site.post(f"/v1/patients/{patient}/randomization")
        except httpx.HTTPError as exc:
            phase.errors.append(f"{type(exc).__name__}")
            return
        if r.status_code == 201:
            phase.answered[patient] = time.perf_counter()
            phase.parts.append(entries(r.headers.get("server-timing", "")))
        else:
            phase.errors.append(f"{r.status_code} {r.json().get('code')}")

    tasks = []
    start = time.perf_counter()
    for n, patient in enumerate(patients):
        due = start + n / phase.rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        phase.late = max(phase.late, time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(patient)))
    await asyncio.gather(*tasks)


def report(phase: Phase, seen: dict[str, float], target: float | None) -> None:
    ok = [p for p in phase.answered if p in seen]
    observed = [(seen[p] - phase.sent[p]) * 1000 for p in ok]
    http = [(phase.answered[p] - phase.sent[p]) * 1000 for p in phase.answered]
    added = [(seen[p] - phase.answered[p]) * 1000 for p in ok]
    missing = len(phase.answered) - len(ok)
    assigned_anyway = sum(1 for p in phase.sent if p in seen and p not in phase.answered)
    span = max(phase.answered.values(), default=0.0) - min(phase.sent.values())
    served = len(phase.answered) / span if phase.answered else 0.0  # answers/s, first to last
    print(f"rate={phase.rate:g}/s requests={len(phase.sent)} answered 201={len(phase.answered)} "
          f"(served {served:.1f}/s) "
          f"errors={len(phase.errors)} {sorted(set(phase.errors))} never seen={missing} "
          f"errors yet assigned={assigned_anyway} worst send lag={phase.late * 1000:.1f} ms")
    print("  CPU while sending (cores): " + ", ".join(
        f"{name} {cores:.2f}" for name, cores in phase.cpu.items()))
    if not observed:
        return
    p99 = percentile(observed, 0.99)
    verdict = "" if target is None else (
        f"  target p99 <= {target:g} ms: {'met' if p99 <= target else 'NOT MET'}")
    print(f"  ArmAssigned seen (project): p50={statistics.median(observed):.1f} ms "
          f"p99={p99:.1f} ms max={max(observed):.1f} ms{verdict}")
    print(f"  HTTP 201 received (peer: the floor): p50={statistics.median(http):.1f} ms "
          f"p99={percentile(http, 0.99):.1f} ms max={max(http):.1f} ms")
    print(f"  ratio seen/HTTP: p50 {statistics.median(observed) / statistics.median(http):.2f}x, "
          f"p99 {p99 / percentile(http, 0.99):.2f}x; per request, seen minus answered: "
          f"p50={statistics.median(added):.1f} ms p99={percentile(added, 0.99):.1f} ms")
    names = [n for n in PARTS if any(n in parts for parts in phase.parts)]
    if names:  # where the answers' time went, by their Server-Timing
        print("  the answers' parts (Server-Timing, ms, p50 / p99): " + ", ".join(
            f"{n} {statistics.median(got):.1f} / {percentile(got, 0.99):.1f}"
            for n in names if (got := [parts[n] for parts in phase.parts if n in parts])))


async def run(running: Running, rates: list[float], seconds: float, fetch_wait_ms: int) -> None:
    system = running.system
    counts = [round(rate * seconds) for rate in rates]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=system.url(), headers=token(), timeout=60,
                                 limits=limits) as site:
        started = time.perf_counter()
        cohort = await enrol(site, WARMUP + sum(counts))
        print(f"enrolled {len(cohort)} patients in {time.perf_counter() - started:.1f} s")
        warmup, cohort = cohort[:WARMUP], cohort[WARMUP:]
        for patient in warmup:  # the first requests of a process pay for its imports, caches
            r = await site.post(f"/v1/patients/{patient}/randomization")
            assert r.status_code == 201, r.text
        watcher = Watcher(system.bootstrap, fetch_wait_ms)
        await watcher.start()
        try:
            for rate, count in zip(rates, counts, strict=True):
                quiet = await asyncio.to_thread(wait_quiet, running)  # all digested
                print(f"the system was quiet after {quiet:.0f} s "
                      f"(idle after its start: {running.idle_cores:.2f} cores)")
                patients, cohort = cohort[:count], cohort[count:]
                phase = Phase(rate)
                watched = {**pids(running), "bench client": os.getpid()}
                before = {name: cpu_seconds(pid) for name, pid in watched.items()}
                started = time.perf_counter()
                await load(site, patients, phase)
                elapsed = time.perf_counter() - started
                phase.cpu = {name: (cpu_seconds(pid) - before[name]) / elapsed
                             for name, pid in watched.items()}
                await watcher.wait_for(list(phase.answered), timeout=30)
                await watcher.wait_for(list(phase.sent), timeout=5)  # written, yet refused?
                report(phase, watcher.seen, TARGETS_MS.get(int(rate)) if rate.is_integer()
                       else None)
        finally:
            await watcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 50.0],
                        help="requests per second, one phase each, in this order")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--fetch-wait-ms", type=int, default=Settings().kafka_fetch_max_wait_ms,
                        help="the outside consumer's fetch_max_wait_ms (default: the services' own)")
    args = parser.parse_args()
    cap = WARMUP + sum(round(rate * args.seconds) for rate in args.rates)
    print(f"backend={args.backend} rates={args.rates} seconds={args.seconds} "
          f"consumer fetch_max_wait_ms={args.fetch_wait_ms}")
    with whole_system(args.backend, cap=cap, env=UNLIMITED) as running:
        asyncio.run(run(running, args.rates, args.seconds, args.fetch_wait_ms))


if __name__ == "__main__":
    main()
