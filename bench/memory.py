"""Benchmark (issue 13, target 7): the memory of the whole embedded system, idle and under load.

    .venv/bin/python -m bench.memory [--settle 10] [--load 30]

Starts the whole system as `make run` does (bench/system.py: the five services, the efficacy
service among them, and the gateway as uvicorn processes, SQLite files, a Tansu broker of its
own), waits until it is ready and quiet, lets it settle, then sums the proportional set size
(PSS: a page shared by n processes counts 1/n in each, so shared pages count once) of every
process of the system, each with its children, from /proc/<pid>/smaps_rollup; RSS beside it
for comparison (it counts shared pages in every process that maps them). PSS also gives a
share of a page to any process outside the system that maps it (this one, another interpreter
of the same virtualenv, another Tansu), so "each page once" counts the system's resident page
frames from /proc/<pid>/pagemap (root only), each once, whoever else maps them. The launcher's
part is played by this process; it is shown, not counted. With --load SECONDS, a light load
(screen, enrol and randomize --rate patients a second, and read their calendars --reads times
a second) runs while the memory is sampled every two seconds; the largest total is reported.
Target: at most 500 MB PSS idle (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from array import array
from pathlib import Path

import httpx

from bench.system import UNLIMITED, Running, pids, screening, token, wait_quiet, whole_system

TARGET_MB = 500.0
TRIAL_CAP = 57  # the built-in protocol's; a longer load gets a copy with room for its patients
PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK, PRESENT = (1 << 55) - 1, 1 << 63
Sample = dict[str, tuple[float, float]]  # process -> (PSS, RSS) in MB


def children(pid: int) -> list[int]:
    """`pid` and every process under it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo += parents.get(current, [])
    return found


def pss_rss(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of one process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values["Pss"], values["Rss"]


def frames(pid: int) -> set[int]:
    """The physical page frames `pid` has in memory (/proc/<pid>/pagemap; needs root)."""
    found: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            if start >= 1 << 47:  # [vsyscall]: not in the pagemap
                continue
            pagemap.seek(start // PAGE * 8)
            entries = array("Q", pagemap.read((end - start) // PAGE * 8))
            found.update(e & PFN_MASK for e in entries if e & PRESENT)
    return found


def once_mb(running: Running) -> float:
    """The system's resident memory with each page counted once, whoever else maps it: PSS
    gives a share of a page to processes outside the system that map it too (another
    interpreter of the same virtualenv, another Tansu), this does not."""
    found: set[int] = set()
    for pid in pids(running).values():
        for p in children(pid):
            found |= frames(p)
    return len(found) * PAGE / 1e6


def sample(running: Running) -> tuple[Sample, float]:
    """(PSS, RSS) of each process of the system, and the system's pages counted once."""
    found: Sample = {}
    for name, pid in pids(running).items():
        figures = [pss_rss(p) for p in children(pid)]
        found[name] = (sum(f[0] for f in figures), sum(f[1] for f in figures))
    return found, once_mb(running)


def total(measured: tuple[Sample, float]) -> float:
    return sum(pss for pss, _ in measured[0].values())


def show(title: str, measured: tuple[Sample, float]) -> None:
    figures, once = measured
    print(title)
    for name, (pss, rss) in figures.items():
        print(f"  {name:<16} PSS {pss:6.1f} MB   RSS {rss:6.1f} MB")
    print(f"  {'total':<16} PSS {total(measured):6.1f} MB   RSS "
          f"{sum(rss for _, rss in figures.values()):6.1f} MB   each page once {once:.1f} MB")


async def load(running: Running, seconds: float, rate: float, reads: float
               ) -> list[tuple[Sample, float]]:
    """Randomize `rate` new patients a second and read calendars `reads` times a second, for
    `seconds`, sampling the memory every two seconds; the samples."""
    randomized: list[str] = []
    samples: list[tuple[Sample, float]] = []
    errors: list[int] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=running.system.url(), headers=token(),
                                 timeout=30) as site:

        async def patients() -> None:
            while time.monotonic() < deadline:
                next_at = time.monotonic() + 1 / rate
                r = await site.post("/v1/screenings", json=screening())
                r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
                r = await site.post(f"/v1/patients/{r.json()['patient_id']}/randomization")
                if r.status_code == 201:
                    randomized.append(r.json()["patient_id"])
                else:
                    errors.append(r.status_code)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def schedules() -> None:
            n = 0
            while time.monotonic() < deadline:
                next_at = time.monotonic() + 1 / reads
                if randomized:
                    n += 1
                    r = await site.get(f"/v1/patients/{randomized[n % len(randomized)]}/schedule")
                    if r.status_code not in (200, 503):  # 503: dosing has not read it yet
                        errors.append(r.status_code)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append(await asyncio.to_thread(sample, running))
                await asyncio.sleep(2.0)

        await asyncio.gather(patients(), schedules(), sampler())
    print(f"load: {len(randomized)} patients randomized, calendar reads at {reads:g}/s, "
          f"errors {errors or 'none'}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait once the system is ready and quiet")
    parser.add_argument("--load", type=float, default=0.0, metavar="SECONDS",
                        help="then run a light load this long and measure again")
    parser.add_argument("--rate", type=float, default=1.0, help="randomizations per second")
    parser.add_argument("--reads", type=float, default=20.0, help="calendar reads per second")
    args = parser.parse_args()
    needed = round(args.load * args.rate) + 5
    with whole_system(cap=needed if needed > TRIAL_CAP else None, env=UNLIMITED) as running:
        wait_quiet(running)
        time.sleep(args.settle)
        measured = sample(running)
        show("idle (ready, quiet, settled):", measured)
        idle = total(measured)
        print(f"  not counted: this process (the launcher's part) PSS "
              f"{pss_rss(os.getpid())[0]:.1f} MB")
        print(f"target: at most {TARGET_MB:g} MB PSS idle: "
              f"{'met' if idle <= TARGET_MB else 'NOT MET'} ({idle:.1f} MB, "
              f"{idle / TARGET_MB:.2f}x the target)")
        if args.load > 0:
            samples = asyncio.run(load(running, args.load, args.rate, args.reads))
            peak = max(samples, key=total)
            show(f"under load (the largest of {len(samples)} samples):", peak)
            wait_quiet(running)
            show("after the load, quiet again:", sample(running))


if __name__ == "__main__":
    main()
