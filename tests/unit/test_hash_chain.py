"""The hash chain's link function and the recorded event's CloudEvents form, without a database."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.events import ArmAssigned, CloudEvent, DosingHeld, canonical_json
from shared.store import (
    GENESIS_HASH,
    Metadata,
    NewEvent,
    RecordedEvent,
    chained_hash,
    event_hash,
)

RECORDED_AT = datetime(2026, 11, 26, 10, 30, 0, 123456, tzinfo=UTC)
PREV = "a" * 64


def base_row() -> dict[str, Any]:
    return {
        "position": 7,
        "stream_id": "patient-p-1",
        "stream_version": 2,
        "event_id": "7b0f2c9e-1f7c-4c1e-9b43-0c7c2b0f3a11",
        "type": "ArmAssigned",
        "schema_version": 1,
        "data": {"patient_id": "p-1", "arm": "msc_high", "weights": [70.0, 71.5]},
        "metadata": {"actor": "coordinator-7", "role": "site_coordinator", "site": "S1"},
        "recorded_at": RECORDED_AT,
    }


def test_hash_is_deterministic_sha256_hex() -> None:
    first = event_hash(PREV, base_row())
    assert first == event_hash(PREV, base_row())
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert first != event_hash(GENESIS_HASH, base_row())


CHANGES: list[tuple[str, Any]] = [
    ("position", 8),
    ("stream_id", "patient-p-2"),
    ("stream_version", 3),
    ("event_id", "7b0f2c9e-1f7c-4c1e-9b43-0c7c2b0f3a12"),
    ("type", "PatientWithdrawn"),
    ("schema_version", 2),
    ("data", {"patient_id": "p-1", "arm": "msc_low", "weights": [70.0, 71.5]}),
    ("data", {"patient_id": "p-1", "arm": "msc_high", "weights": [71.5, 70.0]}),
    ("data", {"patient_id": "p-1", "arm": "msc_high", "weights": [70.0, 71.5], "extra": None}),
    ("metadata", {"actor": "coordinator-8", "role": "site_coordinator", "site": "S1"}),
    ("metadata", {"actor": "coordinator-7", "role": "site_coordinator", "site": "S1", "reason": "x"}),
    ("metadata", {}),
    ("recorded_at", RECORDED_AT + timedelta(microseconds=1)),
    ("recorded_at", RECORDED_AT - timedelta(days=365)),
]


@pytest.mark.parametrize(("field", "value"), CHANGES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CHANGES)])
def test_hash_changes_when_any_hashed_field_changes(field: str, value: Any) -> None:
    assert event_hash(PREV, {**base_row(), field: value}) != event_hash(PREV, base_row())


def test_hash_changes_when_the_previous_hash_changes() -> None:
    assert event_hash("b" * 64, base_row()) != event_hash(PREV, base_row())
    assert event_hash("a" * 63 + "b", base_row()) != event_hash(PREV, base_row())


def test_hash_ignores_the_stored_link_columns() -> None:
    # verify() hashes the stored row, which also holds prev_hash and hash: they must not count.
    row = base_row()
    assert event_hash(PREV, {**row, "prev_hash": PREV, "hash": "f" * 64}) == event_hash(PREV, row)


def test_hash_ignores_key_order_of_data_and_metadata() -> None:
    row = base_row()
    reordered = {**row,
                 "data": dict(reversed(list(row["data"].items()))),
                 "metadata": dict(reversed(list(row["metadata"].items())))}
    assert event_hash(PREV, reordered) == event_hash(PREV, row)


@pytest.mark.parametrize("same_instant", [
    RECORDED_AT.replace(tzinfo=None),  # naive, as SQLite gives it back
    RECORDED_AT.astimezone(timezone(timedelta(hours=8))),
    RECORDED_AT.astimezone(timezone(timedelta(hours=-5, minutes=-30))),
])
def test_same_instant_hashes_equal_whatever_the_zone(same_instant: datetime) -> None:
    assert event_hash(PREV, {**base_row(), "recorded_at": same_instant}) == event_hash(PREV, base_row())


def test_chain_links_each_hash_to_the_previous_one() -> None:
    rows = [{**base_row(), "position": n, "stream_version": n} for n in (1, 2, 3)]
    hashes: list[str] = []
    prev = GENESIS_HASH
    for row in rows:
        prev = event_hash(prev, row)
        hashes.append(prev)
    assert len(set(hashes)) == 3
    # Tampering with the first event changes every later link.
    tampered = {**rows[0], "data": {**rows[0]["data"], "arm": "mtx"}}
    assert event_hash(GENESIS_HASH, tampered) != hashes[0]
    assert event_hash(event_hash(GENESIS_HASH, tampered), rows[1]) != hashes[1]


# --- RecordedEvent -> CloudEvent ----------------------------------------------------------------

ASSIGNED = ArmAssigned(patient_id="p-1", site_id="S1", arm="msc_high", randomization_number=3,
                       stratum="S1:pasi_lt20", baseline_weight_kg=70.5, assigned_at=RECORDED_AT)


def recorded(new: NewEvent, position: int = 12) -> RecordedEvent:
    row: dict[str, Any] = {
        "position": position, "stream_id": "patient-p-1", "stream_version": 2,
        "event_id": new.event_id, "type": new.type, "schema_version": new.schema_version,
        "data": new.data, "metadata": new.metadata, "recorded_at": RECORDED_AT,
    }
    return RecordedEvent(**row, prev_hash=PREV, hash=event_hash(PREV, row))


def test_to_cloudevent_maps_metadata_and_position() -> None:
    meta = Metadata(actor="coordinator-7", role="site_coordinator", site="S1", request_id="req-1",
                    correlation_id="corr-1", causation_id="ev-0", reason="first dose")
    rec = recorded(NewEvent.of(ASSIGNED, meta, event_id="ev-1"))
    ce = rec.to_cloudevent("/services/randomization")
    assert ce.id == "ev-1"
    assert ce.source == "/services/randomization"
    assert ce.type == "ArmAssigned"
    assert ce.subject == "p-1"
    assert ce.time == RECORDED_AT
    assert ce.sequence == 12
    assert ce.schemaversion == 1
    assert ce.correlationid == "corr-1"
    assert ce.causationid == "ev-0"
    assert ce.actor == "coordinator-7"
    assert ce.actorrole == "site_coordinator"
    assert ce.actorsite == "S1"
    assert ce.reason == "first dose"
    assert ce.data == ASSIGNED.model_dump(mode="json")
    assert CloudEvent.from_bytes(ce.to_bytes()).typed_data() == ASSIGNED


def test_to_cloudevent_falls_back_to_the_request_id_for_correlation() -> None:
    rec = recorded(NewEvent.of(ASSIGNED, Metadata(actor="a", request_id="req-9")))
    assert rec.to_cloudevent("/s").correlationid == "req-9"


def test_to_cloudevent_without_metadata_omits_the_extensions() -> None:
    ce = recorded(NewEvent.of(ASSIGNED)).to_cloudevent("/s")
    assert (ce.correlationid, ce.causationid, ce.actor, ce.actorrole, ce.actorsite) == (
        None, None, None, None, None)
    wire = json.loads(ce.to_bytes())
    assert not {"correlationid", "causationid", "actor", "actorrole", "actorsite"} & set(wire)


def test_to_cloudevent_subject_follows_the_models_subject_field() -> None:
    held = DosingHeld(scope="arm", target="msc_low", rule_id="R-ARM", hold_id="h-1")
    assert recorded(NewEvent.of(held)).to_cloudevent("/s").subject == "msc_low"


def test_new_event_of_carries_type_version_and_json_data() -> None:
    new = NewEvent.of(ASSIGNED, Metadata(actor="a", site=None))
    assert new.type == "ArmAssigned"
    assert new.schema_version == ASSIGNED.schema_version
    assert new.metadata == {"actor": "a"}
    assert new.data["assigned_at"] == "2026-11-26T10:30:00.123456Z"
    assert NewEvent.of(ASSIGNED).event_id != NewEvent.of(ASSIGNED).event_id


# --- the group commit's way to the same hash (D67) -----------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text())
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.text(), _json_values, max_size=6),
       metadata=st.dictionaries(st.text(), st.text() | st.integers(), max_size=6),
       event_id=st.text(), stream_id=st.text(), type_=st.text(),
       position=st.integers(min_value=1, max_value=2**62),
       version=st.integers(min_value=1, max_value=2**31), schema_version=st.integers(1, 99),
       recorded_at=st.datetimes(timezones=st.just(UTC)),
       prev=st.text("0123456789abcdef", min_size=64, max_size=64))
def test_the_commits_hash_from_canonical_texts_is_the_verifiers_hash(
        data: dict[str, Any], metadata: dict[str, Any], event_id: str, stream_id: str,
        type_: str, position: int, version: int, schema_version: int, recorded_at: datetime,
        prev: str) -> None:
    """The group commit hashes each row from its data and metadata in canonical JSON (the text it
    stores) and one ISO timestamp; `verify` hashes the row read back. Every value the JSON columns
    can hold (unicode, NaN and infinities, nested lists and objects) must give the same hash."""
    row = {"position": position, "stream_id": stream_id, "stream_version": version,
           "event_id": event_id, "type": type_, "schema_version": schema_version, "data": data,
           "metadata": metadata, "recorded_at": recorded_at}
    try:
        expected = event_hash(prev, row)
    except UnicodeEncodeError:  # a lone surrogate: neither way can hash it, nor a column hold it
        with pytest.raises(UnicodeEncodeError):
            chained_hash(prev, row, canonical_json(data), canonical_json(metadata),
                         recorded_at.isoformat(timespec="microseconds"))
        return
    assert chained_hash(prev, row, canonical_json(data), canonical_json(metadata),
                        recorded_at.isoformat(timespec="microseconds")) == expected
    # And what the column stores reads back to what was hashed.
    read_back = {**row, "data": json.loads(canonical_json(data)),
                 "metadata": json.loads(canonical_json(metadata))}
    assert event_hash(prev, read_back) == expected


@settings(max_examples=500, deadline=None)
@given(value=_json_values | st.dictionaries(st.text(), _json_values | st.datetimes()
                                            | st.decimals(allow_nan=False), max_size=6))
def test_canonical_json_writes_what_json_dumps_writes(value: Any) -> None:
    """`canonical_json` reuses one C encoder; its text must be `json.dumps`'s with the chain's
    settings, byte for byte, for every value (every stored hash depends on it)."""
    assert canonical_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False, default=str)
