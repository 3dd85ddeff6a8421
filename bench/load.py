"""Load test (issue 13, target 8): the site workflow through the gateway, stepped up until it breaks.

    .venv/bin/python -m bench.load                                  # SQLite + the embedded broker
    .venv/bin/python -m bench.load --backend real                   # PostgreSQL + Apache Kafka
    .venv/bin/python -m bench.load --users 4,8,20 --seconds 30 --pacing 4 --dose-after 1

Starts the whole system as `make run` does, on free ports and a broker of its own
(bench/system.py), with a protocol copy whose enrolment cap fits every patient the steps can
make, and runs locust headless against the gateway (bench/locustfile.py, one locust process per
step): each user is a site coordinator with a token of its own who takes a new patient every
--pacing seconds through screening, enrolment, randomization, the week-0 dose (--dose-after
the randomization's answer: a site does not dose the second it randomizes; 0 sends it at once,
and then it waits for dosing to hear of the patient over the broker) and a grade 1 adverse event
that no stopping rule counts (five POSTs, each with an Idempotency-Key). Each step
runs --users users for --seconds, so it offers users / pacing workflows a second; a --warmup
step at the first step's users comes first and is not judged, and the consumers are left to
drain (the system idle) before every step.

Per step: workflows and requests a second achieved, p50 and p99 of every request (exact, from
each request's own time as locust measured it), failures by route and answer, the CPU each
process used, the load average (the machine is shared), and what the services wrote to their
logs. A step is held when p99 < 200 ms, no request failed and at least 90 % of the offered
workflows completed. The verdict: the highest step held, and the first that is not (where it
breaks); the run stops there unless --keep-going. At the end the audit ledger is reconciled with
the answers: one event per 201 of each route, no stopping rule fired and no access denied. Patients accumulate
over the steps and a randomization folds the whole allocation stream, so each step says how
many patients had been randomized before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from bench.system import SECRET, Running, cpu_seconds, percentile, pids, token, wait_quiet, whole_system

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
P99_LIMIT_MS = 200.0
COMPLETED_FRACTION = 0.9
# Each route's 201 is one event of this type in the audit ledger (which reads every topic).
WRITES = {"/v1/screenings": "PatientScreened", "/v1/patients": "PatientEnrolled",
          "/v1/patients/{id}/randomization": "ArmAssigned",
          "/v1/patients/{id}/infusions": "InfusionGiven",
          "/v1/patients/{id}/methotrexate-doses": "MethotrexateDoseGiven",
          "/v1/patients/{id}/adverse-events": "AdverseEventReported"}
RANDOMIZE, ADVERSE_EVENT = "/v1/patients/{id}/randomization", "/v1/patients/{id}/adverse-events"
# No rule fires on the load's adverse events, and a site's writes about its own patients are
# never refused accesses (a 403/404 on a POST is recorded as AccessDenied, for monitors).
NONE_EXPECTED = ("StoppingRuleTriggered", "AccessDenied")


@dataclass(frozen=True)
class Sample:
    """One request as locust measured it (start time in epoch seconds)."""

    t: float
    name: str
    ms: float
    status: int
    error: str | None
    request_id: str | None
    path: str | None = None


@dataclass
class Step:
    label: str
    users: int
    offered: float  # workflows a second
    randomized_before: int
    load_before: str
    samples: list[Sample] = field(default_factory=list)
    cores: dict[str, float] = field(default_factory=dict)
    load_after: str = ""
    logged: dict[str, list[str]] = field(default_factory=dict)  # service -> new log lines

    @property
    def span(self) -> float:
        """From the first request sent to the last answer received, in seconds."""
        if not self.samples:
            return 0.0
        return max(s.t + s.ms / 1000 for s in self.samples) - min(s.t for s in self.samples)

    def ms(self, name: str | None = None) -> list[float]:
        return [s.ms for s in self.samples if name is None or s.name == name]

    def created(self, name: str) -> int:
        return sum(1 for s in self.samples if s.name == name and s.status == 201)

    @property
    def failures(self) -> Counter[tuple[str, str]]:
        return Counter((s.name, s.error) for s in self.samples if s.error is not None)

    @property
    def workflows_per_s(self) -> float:
        return self.created(ADVERSE_EVENT) / self.span if self.span else 0.0

    @property
    def p99(self) -> float:
        return percentile(self.ms(), 0.99) if self.samples else float("inf")

    @property
    def held(self) -> bool:
        return (self.p99 < P99_LIMIT_MS and not self.failures
                and self.workflows_per_s >= COMPLETED_FRACTION * self.offered)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def children_cpu() -> float:
    """CPU seconds of the children this process has waited for (each step's locust)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


class LogWatch:
    """What the services wrote to their logs since the last look (they log warnings and worse)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.offsets: dict[Path, int] = {}

    def new_lines(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for log in sorted(self.folder.glob("*.log")):
            with log.open("rb") as f:
                f.seek(self.offsets.get(log, 0))
                text = f.read()
                self.offsets[log] = f.tell()
            lines = [line for line in text.decode(errors="replace").splitlines() if line.strip()]
            if lines:
                found[log.stem] = lines
        return found


@dataclass(frozen=True)
class Plan:
    pacing: float  # seconds between the starts of one user's workflows
    dose_after: float  # seconds between a randomization's answer and the dose
    warmup: int
    seconds: int


def run_locust(running: Running, folder: Path, label: str, users: int, plan: Plan,
               seconds: int) -> list[Sample]:
    """One headless locust run of `users` site coordinators against the gateway."""
    samples_file, log_file = folder / f"{label}.jsonl", folder / f"{label}-locust.log"
    env = {**os.environ, "LOAD_JWT_SECRET": SECRET, "LOAD_PACING_S": str(plan.pacing),
           "LOAD_DOSE_AFTER_S": str(plan.dose_after),
           "LOAD_SAMPLES_FILE": str(samples_file), "PYTHONDONTWRITEBYTECODE": "1",
           "TRIAL_PROTOCOL_DIR": running.system.env["TRIAL_PROTOCOL_DIR"]}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "--users", str(users), "--spawn-rate", f"{users / plan.pacing:g}",  # starts spread evenly
               "--run-time", f"{seconds}s", "--stop-timeout", "120", "--only-summary",
               "--loglevel", "WARNING", "--host", running.system.url()]
    with log_file.open("wb") as log:
        done = subprocess.run(command, cwd=LOCUSTFILE.parents[1], env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode not in (0, 1):  # 1: some request failed, which the figures report
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust exited with {done.returncode}:\n{tail}")
    if not samples_file.exists():
        return []
    return [Sample(**json.loads(line)) for line in samples_file.read_text().splitlines() if line]


def run_step(running: Running, folder: Path, logs: LogWatch, label: str, users: int,
             plan: Plan, seconds: int, randomized_before: int) -> Step:
    wait_quiet(running)  # the consumers have digested the step before
    logs.new_lines()  # what was logged before this step is not this step's
    step = Step(label, users, users / plan.pacing, randomized_before, load_average())
    watched = pids(running)
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    locust_before, started = children_cpu(), time.monotonic()
    step.samples = run_locust(running, folder, label, users, plan, seconds)
    elapsed = time.monotonic() - started
    step.cores = {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in watched.items()}
    step.cores["locust"] = (children_cpu() - locust_before) / elapsed
    step.load_after = load_average()
    step.logged = logs.new_lines()
    return step


def report(step: Step) -> None:
    ms = step.ms()
    print(f"\n{step.label}: {step.users} users, {step.offered:g} workflows/s offered "
          f"({step.randomized_before} patients randomized before), load average "
          f"{step.load_before} -> {step.load_after}")
    if not ms:
        print("  no request was answered")
        return
    print(f"  achieved {len(ms) / step.span:.1f} requests/s, {step.workflows_per_s:.1f} workflows/s;"
          f" p50 {statistics.median(ms):.0f} ms, p99 {step.p99:.0f} ms, max {max(ms):.0f} ms; "
          f"{sum(step.failures.values())} failed of {len(ms)}: "
          f"{'HELD' if step.held else 'NOT HELD'}")
    for name in dict.fromkeys(s.name for s in step.samples):
        route = step.ms(name)
        print(f"    {name:<40} {len(route):6d}  p50 {statistics.median(route):6.0f} ms  "
              f"p99 {percentile(route, 0.99):6.0f} ms  max {max(route):6.0f} ms")
    for (name, error), count in step.failures.most_common():
        ids = [s.request_id for s in step.samples
               if (s.name, s.error) == (name, error) and s.request_id][:2]
        print(f"    FAILED {count:5d} x {name}: {error}"
              + (f" (X-Request-ID {', '.join(ids)})" if ids else ""))
    busy = ", ".join(f"{name} {c:.2f}" for name, c in step.cores.items() if c >= 0.05)
    print(f"  cores: {busy}")
    for service, lines in step.logged.items():
        distinct = list(dict.fromkeys(line[:240] for line in lines))
        print(f"  {service}.log: {len(lines)} new lines, e.g.")
        for line in distinct[:4]:
            print(f"    | {line}")


def ledger_counts(running: Running) -> dict[str, int]:
    """How many events of each type the audit ledger holds (every topic reaches it)."""
    counts = {}
    with httpx.Client(base_url=running.system.url(), headers=token("monitor", None),
                      timeout=120) as client:
        for event_type in (*dict.fromkeys(WRITES.values()), *NONE_EXPECTED):
            r = client.get("/v1/audit/export", params={"type": event_type, "format": "ndjson"})
            r.raise_for_status()
            counts[event_type] = sum(1 for line in r.text.splitlines() if line.strip())
    return counts


def reconcile(running: Running, steps: list[Step]) -> list[str]:
    """Each route's 201s against the ledger's events; the differences (none if all is well)."""
    answered = Counter(dict.fromkeys(WRITES.values(), 0))
    for step in steps:
        answered.update(WRITES[s.name] for s in step.samples if s.name in WRITES and s.status == 201)
    for _ in range(3):  # the audit consumer may still be reading the last step
        wait_quiet(running)
        counts = ledger_counts(running)
        problems = [f"{event_type}: {counts.get(event_type, 0)} in the ledger, {n} answered 201"
                    for event_type, n in answered.items() if counts.get(event_type, 0) != n]
        problems += [f"{event_type}: {counts[event_type]} in the ledger, none expected"
                     for event_type in NONE_EXPECTED if counts[event_type]]
        if not problems:
            break
    print(f"\nledger: {', '.join(f'{k} {v}' for k, v in counts.items())}")
    return problems


def verdict(backend: str, steps: list[Step]) -> str:
    judged = [s for s in steps if s.label != "warm-up"]
    broke = next((s for s in judged if not s.held), None)
    held = judged[:judged.index(broke)] if broke else judged
    return (f"verdict ({backend}, p99 < {P99_LIMIT_MS:.0f} ms, no failure, >= "
            f"{COMPLETED_FRACTION:.0%} of the workflows offered): held up to "
            + (f"{held[-1].offered:g} workflows/s ({len(held[-1].ms()) / held[-1].span:.0f} "
               "requests/s)" if held else "no step")
            + (f"; breaks at {broke.offered:g} workflows/s (p99 {broke.p99:.0f} ms, "
               f"{sum(broke.failures.values())} failed)" if broke else "; no step broke"))


def unknown_patients(running: Running, steps: list[Step], examples: int = 3) -> None:
    """For a few `404 patient_not_found` answers about patients this run randomized: when each
    of the patient's events was committed by its service (`time`) and reached the audit ledger
    (`recorded_at`), in ms from the refused request's send."""
    refused = [s for step in steps for s in step.samples
               if s.error and s.error.startswith("404 patient_not_found") and s.path]
    if not refused:
        return
    print(f"\n{len(refused)} answers 404 patient_not_found about randomized patients, e.g.:")
    with httpx.Client(base_url=running.system.url(), headers=token("monitor", None),
                      timeout=60) as client:
        for sample in refused[:examples]:
            assert sample.path is not None
            patient = sample.path.split("/")[3]
            print(f"  POST {sample.path} (X-Request-ID {sample.request_id}) answered 404 after "
                  f"{sample.ms:.0f} ms; the patient's events, ms from its send "
                  "(committed by their service / reached the ledger):")
            for e in client.get(f"/v1/audit/patients/{patient}/history").json()["items"]:
                committed, arrived = (datetime.fromisoformat(e[k]).timestamp() - sample.t
                                      for k in ("time", "recorded_at"))
                print(f"    {e['type']:<28} {committed * 1000:+8.0f} / {arrived * 1000:+8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--users", default="4,8,20,40,80,160,320",
                        help="users per step, comma-separated (each: one workflow per --pacing)")
    parser.add_argument("--seconds", type=int, default=30, help="length of each step")
    parser.add_argument("--pacing", type=float, default=4.0,
                        help="seconds between the starts of one user's workflows")
    parser.add_argument("--dose-after", type=float, default=1.0,
                        help="seconds between a randomization's answer and the dose (0: at once, "
                        "so the dose waits for dosing to hear of the patient over the broker)")
    parser.add_argument("--warmup", type=int, default=10, help="seconds of the unjudged warm-up")
    parser.add_argument("--keep-going", action="store_true", help="run every step, past a break")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the services' logs in a temporary folder (kept anyway on a defect)")
    args = parser.parse_args()
    users = [int(n) for n in args.users.split(",")]
    plan = Plan(args.pacing, args.dose_after, args.warmup, args.seconds)
    offered = (sum(users) * plan.seconds + users[0] * plan.warmup) / plan.pacing
    cap = int(2 * offered) + 1000
    print(f"backend={args.backend} users={users} pacing={plan.pacing:g} s dose after "
          f"{plan.dose_after:g} s, {plan.seconds} s a step, warm-up {plan.warmup} s, enrolment cap "
          f"{cap}; load average {load_average()}")
    steps: list[Step] = []
    with whole_system(args.backend, cap=cap) as running:
        folder = Path(tempfile.mkdtemp(prefix="load-", dir=running.folder))
        logs = LogWatch(running.system.log_dir)
        randomized = 0
        for label, n, seconds in [("warm-up", users[0], plan.warmup)] + [
                (f"step {i + 1}", n, plan.seconds) for i, n in enumerate(users)]:
            step = run_step(running, folder, logs, label, n, plan, seconds, randomized)
            randomized += step.created(RANDOMIZE)
            report(step)
            steps.append(step)
            if label != "warm-up" and not step.held and not args.keep_going:
                break
        problems = reconcile(running, steps)
        unknown_patients(running, steps)
        for problem in problems:
            print(f"  LEDGER MISMATCH {problem}")
        if args.keep_logs or problems or any(s.failures or s.logged for s in steps):
            kept = Path(tempfile.mkdtemp(prefix="bench-load-logs-"))
            shutil.copytree(running.system.log_dir, kept / "logs")
            shutil.copytree(folder, kept / "requests")
            print(f"the services' logs and every request are kept in {kept}")
    print("\n" + verdict(args.backend, steps))


if __name__ == "__main__":
    main()
