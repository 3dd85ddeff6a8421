"""Benchmark (issue 13, target 4): what the gateway costs on a read, against the service itself.

    .venv/bin/python -m bench.gateway_overhead [--backend real] [--clients 16] [--seconds 10]

Starts the whole system (bench/system.py), randomizes one patient through the gateway and
records the first dose, then for --seconds at a time runs --clients concurrent httpx clients
(each with one keep-alive connection, one request after the other, the same token) reading
`GET /v1/patients/{id}/schedule`, through the gateway and straight from the dosing service,
in interleaved rounds (the order alternates); the figures are the medians of the rounds.
Target: the gateway serves at least 0.7x the requests per second of the service called
directly, and adds at most 5 ms at p99. Every process shares the machine's cores, the
benchmark's own clients included: the CPU each used is printed beside its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.system import (
    UNLIMITED,
    Running,
    cpu_seconds,
    percentile,
    pids,
    screening,
    token,
    whole_system,
)

CELLS_PER_KG = {"msc_low": 1_000_000, "msc_high": 3_000_000}


@dataclass
class Run:
    target: str
    per_s: float
    p50_ms: float
    p99_ms: float
    cores: dict[str, float]


async def prepare(site: httpx.AsyncClient) -> str:
    """A randomized patient whose calendar dosing serves, with its week-0 dose recorded."""
    r = await site.post("/v1/screenings", json=screening())
    r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
    patient: str = r.json()["patient_id"]
    r = await site.post(f"/v1/patients/{patient}/randomization")
    assert r.status_code == 201, r.text
    arm = r.json()["arm"]
    for _ in range(600):  # dosing learns of the assignment from the broker
        if (await site.get(f"/v1/patients/{patient}/schedule")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    given = datetime.now(UTC).isoformat()
    if arm in CELLS_PER_KG:
        body: dict[str, Any] = {"week": 0, "given_at": given, "weight_kg": 70.0,
                                "cells_administered": CELLS_PER_KG[arm] * 70,
                                "lot_number": "L-BENCH-1"}
        r = await site.post(f"/v1/patients/{patient}/infusions", json=body)
    else:
        r = await site.post(f"/v1/patients/{patient}/methotrexate-doses",
                            json={"week": 0, "dose_mg": 7.5, "given_at": given})
    assert r.status_code == 201, r.text
    return patient


async def hammer(running: Running, target: str, path: str, clients: int, seconds: float) -> Run:
    """`clients` closed-loop readers of `path` on `target` for `seconds`."""
    latencies: list[float] = []
    watched = {**pids(running), "bench clients": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    deadline = time.perf_counter() + seconds

    async def reader() -> None:
        async with httpx.AsyncClient(base_url=running.system.url(target), headers=token(),
                                     timeout=30, limits=httpx.Limits(max_connections=1)) as c:
            while (started := time.perf_counter()) < deadline:
                r = await c.get(path)
                latencies.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text

    started = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    cores = {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in watched.items()}
    ms = [v * 1000 for v in latencies]
    return Run(target, len(ms) / elapsed, statistics.median(ms), percentile(ms, 0.99), cores)


def show(run: Run) -> str:
    busy = ", ".join(f"{name} {c:.2f}" for name, c in run.cores.items() if c >= 0.05)
    return (f"{run.target:<8} {run.per_s:7.0f} requests/s  p50={run.p50_ms:5.1f} ms  "
            f"p99={run.p99_ms:5.1f} ms  (cores: {busy})")


async def run(running: Running, clients: int, seconds: float, rounds: int) -> None:
    async with httpx.AsyncClient(base_url=running.system.url(), headers=token(),
                                 timeout=30) as site:
        patient = await prepare(site)
    path = f"/v1/patients/{patient}/schedule"
    for target in ("gateway", "dosing"):  # warm both paths up; not counted
        await hammer(running, target, path, clients, 2.0)
    runs: dict[str, list[Run]] = {"gateway": [], "dosing": []}
    for n in range(rounds):
        for target in ("gateway", "dosing") if n % 2 == 0 else ("dosing", "gateway"):
            result = await hammer(running, target, path, clients, seconds)
            runs[target].append(result)
            print(f"round {n + 1}: {show(result)}")
    gateway, direct = ({k: statistics.median(getattr(r, k) for r in runs[t])
                        for k in ("per_s", "p50_ms", "p99_ms")} for t in ("gateway", "dosing"))
    ratio = gateway["per_s"] / direct["per_s"]
    added = gateway["p99_ms"] - direct["p99_ms"]
    print(f"median of {rounds} rounds, {clients} clients, {seconds:g} s each:")
    for label, figures in (("gateway (project)", gateway), ("dosing direct (peer)", direct)):
        print(f"  {label:<21} {figures['per_s']:7.0f} requests/s  p50={figures['p50_ms']:.1f} ms"
              f"  p99={figures['p99_ms']:.1f} ms")
    verdicts = ["met" if ok else "NOT MET" for ok in (ratio >= 0.7, added <= 5)]
    print(f"  throughput ratio {ratio:.2f}x (target >= 0.7x: {verdicts[0]}); "
          f"p99 added {added:.1f} ms (target <= 5 ms: {verdicts[1]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"backend={args.backend} clients={args.clients} seconds={args.seconds} "
          f"rounds={args.rounds}")
    with whole_system(args.backend, env=UNLIMITED) as running:
        asyncio.run(run(running, args.clients, args.seconds, args.rounds))


if __name__ == "__main__":
    main()
