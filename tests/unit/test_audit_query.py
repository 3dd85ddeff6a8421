"""The audit ledger's pure parts: filing, the patient's history order, reasons, CSV cells."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from services.audit.domain import history_order, ledger_stream, ledger_time, reason_of
from services.audit.export import CSV_COLUMNS, csv_row


def item(event_id: str, time: str, position: int, cause: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id, "time": time, "position": position, "causation_id": cause}


def test_events_are_filed_under_the_patient_they_name() -> None:
    assert ledger_stream("INF-1", {"patient_id": "PT-1"}) == "PT-1"
    assert ledger_stream("msc_high", {"arm": "msc_high"}) == "msc_high"
    assert ledger_stream("acc-1", {"patient_id": None}) == "acc-1"


def test_ledger_time_is_one_comparable_utc_format() -> None:
    t = datetime(2026, 11, 26, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert ledger_time(t) == "2026-11-26T10:00:00.000000+00:00"
    later = ledger_time(datetime(2026, 11, 26, 10, 0, 0, 1, tzinfo=UTC))
    assert ledger_time(t) < later


def test_history_is_in_source_time_then_ledger_position() -> None:
    entries = [item("c", "2026-01-01T00:00:03", 1), item("a", "2026-01-01T00:00:01", 3),
               item("b", "2026-01-01T00:00:01", 2)]
    assert [e["event_id"] for e in history_order(entries)] == ["b", "a", "c"]


def test_an_effect_never_comes_before_its_cause_even_when_clocks_disagree() -> None:
    # The schedule (caused by the assignment) carries an earlier time from a skewed clock.
    entries = [item("assigned", "2026-01-01T00:00:05", 1),
               item("schedule", "2026-01-01T00:00:04", 2, cause="assigned"),
               item("dose", "2026-01-01T00:00:04.5", 3, cause="schedule"),
               item("other", "2026-01-01T00:00:06", 4)]
    assert [e["event_id"] for e in history_order(entries)] == [
        "assigned", "schedule", "dose", "other"]


def test_a_cause_outside_the_history_does_not_hold_anything_back() -> None:
    entries = [item("x", "2026-01-01T00:00:02", 2, cause="elsewhere"),
               item("y", "2026-01-01T00:00:01", 1)]
    assert [e["event_id"] for e in history_order(entries)] == ["y", "x"]


def test_the_reason_comes_from_the_envelope_or_the_data() -> None:
    assert reason_of({"reason": "moved"}, {}) == "moved"
    assert reason_of({}, {"deviation_reason": "late by two days"}) == "late by two days"
    assert reason_of({}, {"rationale": "DSMB reviewed"}) == "DSMB reviewed"
    assert reason_of({}, {"reason": ""}) is None


def test_csv_rows_flatten_the_actor_and_defuse_formulas() -> None:
    row = csv_row({"position": 1, "event_id": "e", "time": "t", "recorded_at": "r",
                   "type": "PatientWithdrawn", "source": "/services/randomization",
                   "topic": "trial.enrollment", "subject": "PT-1",
                   "actor": {"sub": "inv", "role": "investigator", "site": "S1"},
                   "correlation_id": None, "causation_id": None, "reason": "=HYPERLINK(1)",
                   "data": {"b": 1, "a": 2}, "prev_hash": "0", "hash": "1"})
    cells = dict(zip(CSV_COLUMNS, row, strict=True))
    assert (cells["actor_sub"], cells["actor_role"], cells["actor_site"]) == (
        "inv", "investigator", "S1")
    assert cells["reason"] == "'=HYPERLINK(1)"
    assert cells["data"] == '{"a":2,"b":1}'
    assert cells["correlation_id"] == ""
