"""A ledger entry encoded straight from the stored row (`query.entry_json`, what the history
route and the NDJSON export send) is the entry `domain.entry` makes of the decoded row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.audit.query import entry_json, raw_entry
from shared.store import RawEvent

META = {"topic": "trial.safety", "source": "/services/safety", "subject": "PT-1",
        "time": "2026-01-01T00:00:00.000000+00:00", "sequence": 7, "actor": "inv-1",
        "role": "investigator", "site": "S1", "correlation_id": "c-1", "causation_id": "e-0"}


def row(data: str, metadata: dict[str, Any] | str = META,
        recorded_at: datetime = datetime(2026, 1, 1, 0, 0, 1, 5)) -> RawEvent:
    return RawEvent(position=12, stream_id="PT-1", stream_version=3, event_id="e-1",
                    type="AdverseEventReported", schema_version=1, data=data,
                    metadata=metadata if isinstance(metadata, str) else json.dumps(metadata),
                    recorded_at=recorded_at, prev_hash="0" * 64, hash="f" * 64)


@pytest.mark.parametrize("data", [
    '{"patient_id": "PT-1", "grade": 2, "weight_kg": 70.0, "given": null, "ok": true}',
    '{"patient_id":"PT-1","deviation_reason":"late"}',
    '{"reason": {"code": "typo"}, "rationale": "transcription"}',
    '{"reason": ""}',
    '{"re\\u0061son": "spelled with an escape"}',  # a key only decoding can read
    '{"site": "Z\\u00fcrich \\u2192 Gen\\u00e8ve", "note": "a\\nb \\"quoted\\""}',
    '{"site": "Zürich → Genève"}',  # raw UTF-8, as PostgreSQL may hold it
    '{\n  "patient_id": "PT-1",\r\n  "reason": "pretty-printed"\n}',  # line breaks between tokens
    '{"big": 12345678901234567890, "small": 1e-07, "nested": [{"a": [1, 2, {"b": null}]}]}',
])
def test_the_encoded_entry_is_the_decoded_entry(data: str) -> None:
    r = row(data)
    meta, text = entry_json(r)
    assert meta == META
    assert "\n" not in text and "\r" not in text  # one NDJSON line
    expected = raw_entry(r)
    assert json.loads(text) == expected
    assert list(json.loads(text)) == list(expected)  # the fields in the entry's order
    assert text == json.dumps({**expected, "data": "@"}, separators=(",", ":")).replace(
        '"data":"@"', '"data":' + (data if "\n" not in data else json.dumps(
            json.loads(data), separators=(",", ":"))))


def test_the_reason_comes_from_the_envelope_first_and_times_are_utc() -> None:
    meta = {**META, "reason": "the envelope's", "actor": None, "time": None, "extra": [1, 2]}
    for at in (datetime(2026, 1, 1, 0, 0, 1), datetime(2026, 1, 1, 2, 0, 1,
                                                     tzinfo=timezone(timedelta(hours=2)))):
        r = row('{"reason": "the data\'s"}', meta, at)
        found = json.loads(entry_json(r)[1])
        assert found == raw_entry(r)
        assert found["reason"] == "the envelope's"
        assert found["actor"] == {"sub": None, "role": "investigator", "site": "S1"}
        assert found["recorded_at"] == "2026-01-01T00:00:01+00:00"
        assert datetime.fromisoformat(found["recorded_at"]) == datetime(2026, 1, 1, 0, 0, 1,
                                                                        tzinfo=UTC)
