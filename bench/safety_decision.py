"""Benchmark: one safety decision on a trial of growing size (D79).

    .venv/bin/python -m bench.safety_decision                      # 57, 300, 1,000, 3,000 patients
    .venv/bin/python -m bench.safety_decision --patients 600 --repeats 50

Every fact safety consumes (an enrolment, an assignment, an infusion) and every report is a
decision: the event, then the whole rule set evaluated on the whole state, then the reporting
clocks (`services.safety.domain.decide_fact`). Pure, in this process: no database, no broker.

The state: N patients over the three arms, each enrolled, assigned, dosed six times, with two
adverse events (grade 1 unlikely, grade 2 possible) and one lab result, as safety folds them.
A decision is one more infusion for one patient, a different patient each time (as a consumer
meets them), timed from the event to the events the decision emits.

- kept: as a running service decides, `rules.Readings` warm from the decisions before;
- fresh: the readings forgotten before each decision: every adverse event and lab read again
  under every rule, what each decision cost before D79 (the arm spells sorted once per file
  and the posterior cached are in both).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

from services.safety import domain, rules
from services.safety.state import SafetyState, fold
from shared.decider import Identified
from shared.events import (
    ARMS,
    AdverseEventReported,
    EventData,
    InfusionGiven,
    LabResult,
    LabResultReported,
    PatientSafetyFactRecorded,
)
from shared.protocol import default_protocol

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
INFUSION_WEEKS = (0, 1, 2, 3, 5, 7)


def _id() -> str:
    return str(uuid.uuid4())


def _fact(pid: str, fact: str, arm: str | None, at: datetime) -> Identified[EventData]:
    return Identified(_id(), PatientSafetyFactRecorded.model_validate({
        "patient_id": pid, "site_id": "S1", "fact": fact, "arm": arm, "at": at,
        "source_event_id": _id()}))


def _adverse_event(pid: str, arm: str, grade: int, relatedness: str,
                   onset: datetime) -> Identified[EventData]:
    return Identified(_id(), AdverseEventReported.model_validate({
        "adverse_event_id": "AE-" + _id(), "patient_id": pid, "site_id": "S1", "arm": arm,
        "term": "rash", "onset_at": onset, "ctcae_grade": grade, "serious": False,
        "relatedness": relatedness, "expected": True, "infusion_related": False,
        "reported_at": onset + timedelta(hours=2)}))


def trial_state(trial_id: str, patients: int) -> SafetyState:
    events: list[Identified[EventData]] = []
    for n in range(patients):
        pid, arm = f"P{n:05d}", ARMS[n % len(ARMS)]
        start = T0 + timedelta(days=n % 90)
        events += [_fact(pid, "enrolled", None, start), _fact(pid, "assigned", arm, start)]
        kind = "methotrexate" if arm == "mtx" else "infusion"
        events += [_fact(pid, kind, arm, start + timedelta(weeks=w)) for w in INFUSION_WEEKS]
        events.append(_adverse_event(pid, arm, 1, "unlikely", start + timedelta(days=3)))
        events.append(_adverse_event(pid, arm, 2, "possible", start + timedelta(days=20)))
        events.append(Identified(_id(), LabResultReported.model_validate({
            "lab_result_id": _id(), "patient_id": pid, "site_id": "S1", "arm": arm,
            "collected_at": start + timedelta(days=14), "reported_at": start + timedelta(days=15),
            "results": (LabResult(analyte="ALT", value=31.0, unit="U/L", uln=40.0),)})))
    return fold(trial_id, events)


def measure(patients: int, repeats: int, fresh: bool) -> list[float]:
    protocol = default_protocol()
    config = protocol.safety
    state = trial_state(protocol.trial_id, patients)
    rules.forget_readings()
    domain.with_consequences(config, state, [])  # a running service's readings are warm
    took = []
    for r in range(repeats):
        n = (r * 7919) % patients  # a different patient each time
        pid, arm = f"P{n:05d}", ARMS[n % len(ARMS)]
        given = InfusionGiven.model_validate({
            "infusion_id": _id(), "patient_id": pid, "site_id": "S1", "arm": arm, "week": 9,
            "cells_administered": 70_000_000, "cells_per_kg": 1e6, "weight_kg": 70.0,
            "lot_number": "L1", "given_at": T0 + timedelta(days=200)}) if arm != "mtx" else None
        if fresh:
            rules.forget_readings()
        began = time.perf_counter()
        if given is not None:
            emitted = domain.decide_fact(config, state, _id(), given)
        else:
            emitted = domain.with_consequences(config, state, [_fact(pid, "methotrexate", arm,
                                                                     T0 + timedelta(days=200))])
        took.append(time.perf_counter() - began)
        state = domain.apply(state, emitted)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[57, 300, 1000, 3000])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"{'patients':>9} {'adverse events':>15} {'kept p50 ms':>12} {'kept p95 ms':>12} "
          f"{'fresh p50 ms':>13} {'ratio':>6}")
    for n in args.patients:
        kept = measure(n, args.repeats, fresh=False)
        fresh = measure(n, max(5, args.repeats // 3), fresh=True)
        k50, f50 = statistics.median(kept), statistics.median(fresh)
        k95 = sorted(kept)[min(len(kept) - 1, round(0.95 * len(kept)) - 1)]
        print(f"{n:>9} {2 * n:>15} {k50 * 1000:>12.2f} {k95 * 1000:>12.2f} {f50 * 1000:>13.2f} "
              f"{f50 / k50:>6.1f}x")


if __name__ == "__main__":
    main()
