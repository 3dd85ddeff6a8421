"""`ledger_cloudevent` gives back the envelope an entry was filed from (D93): what the audit
service publishes of the reads made through it is the record its ledger, and a ledger rebuilt
from the topics, file as the same entry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.audit.commands import ledger_cloudevent, ledger_entry
from shared.consumer import Delivery
from shared.events import ACCESS, CloudEvent, PatientDataViewed


@pytest.mark.parametrize("envelope", [
    {"correlationid": "req-1", "actor": "dora", "actorrole": "dsmb"},
    {},
    {"correlationid": "req-2", "causationid": "e-0", "actor": "mona", "actorrole": "monitor",
     "actorsite": "S1", "reason": "source data verification"},
])
@pytest.mark.parametrize("zone", [UTC, timezone(timedelta(hours=8))])
def test_an_entry_gives_back_the_envelope_it_was_filed_from(envelope: dict[str, Any],
                                                             zone: timezone) -> None:
    viewed = PatientDataViewed(view_id="v-1", service="audit",
                               route="/v1/audit/patients/{patient_id}/history",
                               patient_id="PT-1",
                               viewed_at=datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=zone))
    cloud = CloudEvent(id="e-1", source="/services/audit", type=viewed.event_type(),
                       subject=viewed.subject(), time=viewed.viewed_at,
                       data=viewed.model_dump(mode="json"), sequence=0, **envelope)
    stream, entry = ledger_entry(Delivery(cloud, viewed, ACCESS))
    back = ledger_cloudevent(entry.event_id, entry.type, entry.schema_version, entry.data,
                             entry.metadata)
    assert back == cloud  # the same instant, given back in UTC
    assert back.time.utcoffset() == timedelta(0)
    assert ledger_entry(Delivery(back, back.typed_data(), ACCESS)) == (stream, entry)
