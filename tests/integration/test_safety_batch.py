"""Safety's consumer decides a fetch's facts in one transaction (D80): each decision is made on
the store plus what the records before it staged, exactly as if each had committed first."""

from __future__ import annotations

import uuid
from datetime import timedelta

from services.safety import domain
from services.safety.handlers import handlers
from services.safety.projection import Projection
from shared.consumer import ConsumerRunner
from shared.events import (
    AdverseEventReported,
    ArmAssigned,
    EventData,
    PatientSafetyFactRecorded,
)
from shared.protocol import default_protocol
from shared.settings import Settings
from shared.store import EventStore, NewEvent, utcnow
from tests.integration.test_consumer import fetched
from tests.integration.test_safety_support import cloud_event

R3 = "R3-related-grade3-cluster"  # two related grade 3 events in distinct patients of one arm


def enrolled(patient_id: str) -> PatientSafetyFactRecorded:
    return PatientSafetyFactRecorded(patient_id=patient_id, site_id="S1", fact="enrolled",
                                     at=utcnow() - timedelta(days=1),
                                     source_event_id=str(uuid.uuid4()))


def related_grade_3(patient_id: str) -> AdverseEventReported:
    """Reported before safety learnt of the patient's arm: it counts for the arm once it does."""
    onset = utcnow() - timedelta(hours=20)
    return AdverseEventReported.model_validate({
        "adverse_event_id": f"AE-{uuid.uuid4().hex[:12]}", "patient_id": patient_id,
        "site_id": "S1", "arm": None, "term": "rash", "onset_at": onset, "ctcae_grade": 3,
        "serious": False, "relatedness": "possible", "expected": True,
        "reported_at": onset + timedelta(hours=1)})


def assigned(patient_id: str, arm: str) -> ArmAssigned:
    return ArmAssigned.model_validate({
        "patient_id": patient_id, "site_id": "S1", "arm": arm, "randomization_number": 1,
        "stratum": "S1:pasi_lt20", "baseline_weight_kg": 70.0,
        "assigned_at": utcnow() - timedelta(days=1)})


async def test_a_fetch_of_facts_is_decided_in_one_transaction_each_on_the_facts_before_it(
        settings: Settings, store: EventStore) -> None:
    # Two patients, each with a related grade 3 adverse event and no arm known yet; then their
    # assignments to one arm arrive in one fetch. The second decision fires R3 only if it sees
    # the first's assignment, which is staged, not stored, when it is made.
    protocol = default_protocol()
    p1, p2 = (f"PT-{uuid.uuid4().hex[:10].upper()}" for _ in range(2))
    for pid in (p1, p2):
        known: list[EventData] = [enrolled(pid), related_grade_3(pid)]
        await store.append(f"patient-{pid}", [NewEvent.of(e) for e in known], 0)
    facts = [cloud_event(assigned(pid, "msc_low")) for pid in (p1, p2)]
    records = await fetched(settings, *(ce.to_bytes() for ce in facts))
    runner = ConsumerRunner(store, settings, [records[0].topic], handlers(protocol),
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    head, commits = await store.head(), store.group_commits
    await runner.handle_batch(records)
    assert store.group_commits - commits == 1  # both decisions, one transaction
    assert (runner.handled, runner.dead_lettered) == (2, 0)
    written = await store.read_all(after=head)
    r3 = [e.data for e in written
          if e.type == "StoppingRuleTriggered" and e.data["rule_id"] == R3]
    assert len(r3) == 1 and r3[0]["target"] == "msc_low"
    # The evidence names both assignments: the first was staged when the rule fired.
    assert {domain.fact_event_id(ce.id) for ce in facts} <= set(r3[0]["evidence"])
    assert [e.data["arm"] for e in written if e.type == "ArmSuspended"
            and e.data["rule_id"] == R3] == ["msc_low"]


async def test_a_decision_folds_what_its_transaction_staged_and_not_what_it_took_back(
        store: EventStore) -> None:
    protocol = default_protocol()
    projection = Projection(protocol.trial_id)
    a, b, c = (f"PT-{uuid.uuid4().hex[:10].upper()}" for _ in range(3))
    async with store.transaction() as tx:
        assert (await projection.load_for(tx)).patients == {}
        await tx.append(f"patient-{a}", [NewEvent.of(enrolled(a))], None)
        assert set((await projection.load_for(tx)).patients) == {a}
        mark = tx.savepoint()  # the next record's part of a consumer's shared transaction
        await tx.append(f"patient-{b}", [NewEvent.of(enrolled(b))], None)
        assert set((await projection.load_for(tx)).patients) == {a, b}
        tx.rollback(mark)  # b's record goes to the next transaction
        await tx.append(f"patient-{c}", [NewEvent.of(enrolled(c))], None)
        assert set((await projection.load_for(tx)).patients) == {a, c}
        assert projection.state.patients == {}  # nothing staged is ever cached
    assert set((await projection.load(store)).patients) == {a, c}
