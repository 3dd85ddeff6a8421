"""The event catalogue and the CloudEvents envelope: topics, subjects, schemas, the wire format."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.events import (
    ACCESS,
    CATALOGUE,
    DOSING,
    ENROLLMENT,
    PROTOCOL,
    PUBLISHERS,
    SAFETY,
    TOPICS,
    AccessDenied,
    AdverseEventReported,
    AllocationSlotUsed,
    ArmAssigned,
    ArmSuspended,
    CloudEvent,
    DosingHeld,
    DosingResumed,
    DosingScheduleCreated,
    EnrollmentPaused,
    EventData,
    InfusionGiven,
    MethotrexateDoseGiven,
    PatientDataViewed,
    PatientDosingHeld,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    PlannedVisit,
    RandomizationHoldApplied,
    RandomizationHoldLifted,
    Reason,
    SafetyHoldLifted,
    StoppingRuleTriggered,
    TrialHalted,
    UnknownEventType,
    canonical_json,
    json_schemas,
    may_publish,
    model_for,
    parse_data,
)

AT = datetime(2026, 11, 26, 10, 30, tzinfo=UTC)

# One valid instance of every catalogue event, with the value its subject must be.
SAMPLES: dict[str, tuple[EventData, str]] = {
    "PatientScreened": (PatientScreened(
        screening_id="scr-1", site_id="S1", screening_number="S1-0001", eligible=False,
        reasons=(Reason(criterion="INC-AGE", message="age 17 is outside 18 to 60"),),
        age_years=17, weight_kg=70.0, pasi=14.2, protocol_version="1.0.0", screened_at=AT), "scr-1"),
    "PatientEnrolled": (PatientEnrolled(
        patient_id="p-1", site_id="S1", screening_id="scr-1", baseline_weight_kg=70.0,
        baseline_pasi=14.2, enrolled_at=AT), "p-1"),
    "ArmAssigned": (ArmAssigned(
        patient_id="p-1", site_id="S1", arm="msc_high", randomization_number=1,
        stratum="S1:pasi_lt20", baseline_weight_kg=70.0, assigned_at=AT), "p-1"),
    "PatientWithdrawn": (PatientWithdrawn(
        patient_id="p-1", site_id="S1", reason="moved away", withdrawn_at=AT), "p-1"),
    "DosingScheduleCreated": (DosingScheduleCreated(
        patient_id="p-1", site_id="S1", arm="mtx", anchor_date=date(2026, 11, 26),
        visits=(PlannedVisit(week=0, kind="methotrexate", due_date=date(2026, 11, 26),
                             window_start=date(2026, 11, 24), window_end=date(2026, 11, 28),
                             product="methotrexate", planned_dose_mg=7.5),)), "p-1"),
    "InfusionGiven": (InfusionGiven(
        infusion_id="inf-1", patient_id="p-1", site_id="S1", arm="msc_low", week=0,
        cells_administered=70_000_000, cells_per_kg=1_000_000, weight_kg=70.0, lot_number="L-1",
        given_at=AT), "p-1"),
    "MethotrexateDoseGiven": (MethotrexateDoseGiven(
        dose_id="d-1", patient_id="p-1", site_id="S1", week=3, dose_mg=10.0, given_at=AT), "p-1"),
    "DosingHeld": (DosingHeld(scope="arm", target="msc_high", rule_id="R-ARM", hold_id="h-1"),
                   "msc_high"),
    "DosingResumed": (DosingResumed(scope="trial", target="NCT03424629", rule_id="R-TRIAL",
                                    hold_id="h-2"), "NCT03424629"),
    "AdverseEventReported": (AdverseEventReported(
        adverse_event_id="ae-1", patient_id="p-1", site_id="S1", arm="msc_low", term="fever",
        onset_at=AT, ctcae_grade=2, serious=False, relatedness="possible", expected=True,
        infusion_related=True), "p-1"),
    "StoppingRuleTriggered": (StoppingRuleTriggered(
        rule_id="R-1", rule_set_version="1", scope="patient", target="p-1",
        evidence=("ev-1", "ev-2")), "p-1"),
    "PatientDosingHeld": (PatientDosingHeld(hold_id="h-3", patient_id="p-1", rule_id="R-1"), "p-1"),
    "ArmSuspended": (ArmSuspended(hold_id="h-4", arm="msc_high", rule_id="R-ARM"), "msc_high"),
    "EnrollmentPaused": (EnrollmentPaused(hold_id="h-5", trial_id="NCT03424629", rule_id="R-2"),
                         "NCT03424629"),
    "TrialHalted": (TrialHalted(hold_id="h-6", trial_id="NCT03424629", rule_id="R-3"),
                    "NCT03424629"),
    "SafetyHoldLifted": (SafetyHoldLifted(
        hold_id="h-4", scope="arm", target="msc_high", rationale="DSMB reviewed the cases",
        decided_by="dsmb-1"), "msc_high"),
    # gateway and audit (issue 6)
    "AccessDenied": (AccessDenied(
        access_id="acc-1", service="gateway", method="POST", path="/v1/patients/p-1/infusions",
        status=403, code="forbidden", patient_id="p-1", denied_at=AT), "acc-1"),
    "PatientDataViewed": (PatientDataViewed(
        view_id="view-1", service="dosing", route="/v1/patients/{patient_id}/schedule",
        patient_id="p-1", viewed_at=AT), "view-1"),
    # randomization (issue 3): the allocation and safety holds it keeps as events of its own
    "AllocationSlotUsed": (AllocationSlotUsed(
        randomization_number=1, stratum="S1:pasi_lt20", stratum_slot=1, patient_id="p-1",
        site_id="S1", pasi_band="pasi_lt20", arm="mtx", method="permuted_blocks"), "S1:pasi_lt20"),
    "RandomizationHoldApplied": (RandomizationHoldApplied(
        hold_id="h-5", kind="enrollment_paused", scope="trial", target="NCT03424629",
        rule_id="R-2"), "NCT03424629"),
    "RandomizationHoldLifted": (RandomizationHoldLifted(
        hold_id="h-4", scope="arm", target="msc_high"), "msc_high"),
    # safety (issue 5)
    "AdverseEventFollowedUp": (parse_data("AdverseEventFollowedUp", {
        "follow_up_id": "fu-1", "adverse_event_id": "ae-1", "patient_id": "p-1", "site_id": "S1",
        "ctcae_grade": 3, "reported_at": AT.isoformat()}), "p-1"),
    "LabResultReported": (parse_data("LabResultReported", {
        "lab_result_id": "lab-1", "patient_id": "p-1", "site_id": "S1", "arm": "mtx",
        "collected_at": AT.isoformat(), "reported_at": AT.isoformat(),
        "results": [{"analyte": "ALT", "value": 130.0, "unit": "U/L", "uln": 40.0}]}), "p-1"),
    "SusarReportDue": (parse_data("SusarReportDue", {
        "adverse_event_id": "ae-1", "patient_id": "p-1", "rule_id": "R5-susar", "days": 7,
        "aware_at": AT.isoformat(), "due_at": (AT + timedelta(days=7)).isoformat()}), "p-1"),
    "SusarFollowUpReportDue": (parse_data("SusarFollowUpReportDue", {
        "adverse_event_id": "ae-1", "patient_id": "p-1", "rule_id": "R5-susar", "days": 8,
        "initial_due_at": (AT + timedelta(days=7)).isoformat(),
        "due_at": (AT + timedelta(days=15)).isoformat()}), "p-1"),
    "SeriousAdverseEventReportDue": (parse_data("SeriousAdverseEventReportDue", {
        "adverse_event_id": "ae-1", "patient_id": "p-1", "hours": 24, "aware_at": AT.isoformat(),
        "due_at": (AT + timedelta(hours=24)).isoformat()}), "p-1"),
    "PatientSafetyFactRecorded": (parse_data("PatientSafetyFactRecorded", {
        "patient_id": "p-1", "site_id": "S1", "fact": "infusion", "arm": "msc_low",
        "at": AT.isoformat(), "source_event_id": "ev-1"}), "p-1"),
    # randomization (issue 3); added with dosing, which consumes it
    "ArmCrossedOver": (parse_data("ArmCrossedOver", {
        "patient_id": "p-1", "site_id": "S1", "from_arm": "mtx", "to_arm": "msc_high",
        "reason": "no PASI 50 at week 16", "crossed_over_at": AT.isoformat()}), "p-1"),
    # dosing (issue 4)
    "DosingScheduleReanchored": (parse_data("DosingScheduleReanchored", {
        "patient_id": "p-1", "site_id": "S1", "arm": "mtx", "anchor_date": "2026-11-27",
        "visits": [{"week": 1, "kind": "methotrexate", "due_date": "2026-12-04",
                    "window_start": "2026-12-02", "window_end": "2026-12-06",
                    "product": "methotrexate", "planned_dose_mg": 10.0}]}), "p-1"),
    "ProtocolDeviationRecorded": (parse_data("ProtocolDeviationRecorded", {
        "deviation_id": "dev-1", "patient_id": "p-1", "site_id": "S1", "arm": "msc_low",
        "week": 1, "kind": "infusion", "dose_event_id": "inf-1",
        "deviations": ["out_of_window"], "reason": "patient had flu",
        "recorded_at": AT.isoformat()}), "p-1"),
    "VisitMissed": (parse_data("VisitMissed", {
        "patient_id": "p-1", "site_id": "S1", "arm": "msc_low", "week": 2, "kind": "infusion",
        "due_date": "2026-12-10", "window_end": "2026-12-12",
        "detected_at": AT.isoformat()}), "p-1"),
    "SafetyRecordUnapplied": (parse_data("SafetyRecordUnapplied", {
        "record_id": "trial.safety:1:42", "event_id": "e-1", "type": "PatientDosingHeld",
        "scope": "patient", "target": "p-1", "error": "RuntimeError: a bug",
        "detected_at": AT.isoformat()}), "p-1"),
    "SafetyRecordResolved": (parse_data("SafetyRecordResolved", {
        "record_id": "trial.safety:1:42", "scope": "patient", "target": "p-1",
        "resolved_by": "ops-1", "reason": "applied by hand", "resolved_at": AT.isoformat()}),
        "p-1"),
    "RandomizationRecordUnapplied": (parse_data("RandomizationRecordUnapplied", {
        "record_id": "trial.safety:0:7", "event_id": "e-2", "type": "EnrollmentPaused",
        "scope": "trial", "target": "NCT03424629", "error": "RuntimeError: a bug",
        "detected_at": AT.isoformat()}), "NCT03424629"),
    "RandomizationRecordResolved": (parse_data("RandomizationRecordResolved", {
        "record_id": "trial.safety:0:7", "scope": "trial", "target": "NCT03424629",
        "resolved_by": "ops-1", "reason": "applied by hand", "resolved_at": AT.isoformat()}),
        "NCT03424629"),
    "ProtocolVersionActivated": (parse_data("ProtocolVersionActivated", {
        "service": "dosing", "trial_id": "NCT03424629", "version": "1.1.0",
        "content_hash": "0" * 64, "activated_by": "service:dosing",
        "activated_at": AT.isoformat()}), "dosing"),
    "VisitHeld": (parse_data("VisitHeld", {
        "patient_id": "p-1", "site_id": "S1", "arm": "msc_low", "week": 2, "kind": "infusion",
        "due_date": "2026-12-10", "window_end": "2026-12-12", "hold_id": "h-1",
        "rule_id": "R4-infusion-reaction", "detected_at": AT.isoformat()}), "p-1"),
    "VisitsCancelled": (parse_data("VisitsCancelled", {
        "patient_id": "p-1", "site_id": "S1", "arm": "msc_low", "cause": "withdrawn",
        "visits": [{"week": 3, "kind": "infusion", "due_date": "2026-12-17"}],
        "cancelled_at": AT.isoformat()}), "p-1"),
    # efficacy (issue 11)
    "AssessmentRecorded": (parse_data("AssessmentRecorded", {
        "assessment_id": "as-1", "patient_id": "p-1", "site_id": "S1", "arm": "msc_low",
        "week": 0, "unscheduled": False, "assessed_at": AT.isoformat(),
        "assessed_on": "2026-11-27", "pasi_total": 23.8,
        "pasi_regions": {r: {"erythema": 2, "induration": 1, "desquamation": 1, "area": 2}
                         for r in ("head", "upper_limbs", "trunk", "lower_limbs")},
        "bsa_percent": 18.0, "dlqi_items": [2, 1, 1, 0, 2, 1, 0, 1, 1, 0], "dlqi_total": 9,
        "spga": 3}), "p-1"),
    "AssessmentCorrected": (parse_data("AssessmentCorrected", {
        "correction_id": "c-1", "assessment_id": "as-1", "patient_id": "p-1", "site_id": "S1",
        "week": 0, "changed": ["spga"], "reason": "transcription error", "pasi_total": 23.8,
        "spga": 2, "corrected_at": AT.isoformat()}), "p-1"),
    "FollowUpFactRecorded": (parse_data("FollowUpFactRecorded", {
        "patient_id": "p-1", "site_id": "S1", "fact": "enrolled", "at": AT.isoformat(),
        "source_event_id": "e-1", "screening_pasi": 14.2, "screening_bsa_percent": 12.0,
        "screening_dlqi": 11}), "p-1"),
    "TreatmentDiscontinued": (parse_data("TreatmentDiscontinued", {
        "patient_id": "p-1", "site_id": "S1", "reason": "intolerance",
        "discontinued_at": AT.isoformat(), "decided_by": "inv-1"}), "p-1"),
    "LostToFollowUp": (parse_data("LostToFollowUp", {
        "patient_id": "p-1", "site_id": "S1", "declared_by": "efficacy-sweep",
        "reason": "2 missed", "missed_weeks": [24, 36], "at": AT.isoformat()}), "p-1"),
    "DeathRecorded": (parse_data("DeathRecorded", {
        "patient_id": "p-1", "site_id": "S1", "adverse_event_id": "ae-1",
        "reported_at": AT.isoformat(), "source_event_id": "e-9"}), "p-1"),
    "StudyCompleted": (parse_data("StudyCompleted", {
        "patient_id": "p-1", "site_id": "S1", "assessment_id": "as-8",
        "completed_at": AT.isoformat()}), "p-1"),
    "AssessmentVisitNoted": (parse_data("AssessmentVisitNoted", {
        "patient_id": "p-1", "site_id": "S1", "week": 4, "status": "done",
        "at": AT.isoformat(), "source_event_id": "e-3"}), "p-1"),
    "DosingDispositionNoted": (parse_data("DosingDispositionNoted", {
        "patient_id": "p-1", "site_id": "S1", "disposition": "treatment_discontinued",
        "at": AT.isoformat(), "reason": "intolerance", "source_event_id": "e-4"}), "p-1"),
    "PatientDispositionNoted": (parse_data("PatientDispositionNoted", {
        "patient_id": "p-1", "site_id": "S1", "disposition": "died",
        "at": AT.isoformat(), "source_event_id": "e-5"}), "p-1"),
    # audit: the ledger's chain heads, witnessed on the broker (D27)
    "AuditChainAnchored": (parse_data("AuditChainAnchored", {
        "ledger": "a" * 64, "position": 42, "hash": "b" * 64,
        "anchored_at": AT.isoformat()}), "a" * 64),
}

EXPECTED_TOPIC = {
    "PatientScreened": "trial.enrollment", "PatientEnrolled": "trial.enrollment",
    "ArmAssigned": "trial.enrollment", "PatientWithdrawn": "trial.enrollment",
    "DosingScheduleCreated": "trial.dosing", "InfusionGiven": "trial.dosing",
    "MethotrexateDoseGiven": "trial.dosing", "DosingHeld": "trial.dosing",
    "DosingResumed": "trial.dosing",
    "AdverseEventReported": "trial.safety", "StoppingRuleTriggered": "trial.safety",
    "PatientDosingHeld": "trial.safety", "ArmSuspended": "trial.safety",
    "EnrollmentPaused": "trial.safety", "TrialHalted": "trial.safety",
    "SafetyHoldLifted": "trial.safety",
    "AssessmentRecorded": "trial.efficacy", "AssessmentCorrected": "trial.efficacy",
}


def test_visit_missed_goes_to_dosing_for_doses_and_to_efficacy_for_assessments() -> None:
    dose, _ = SAMPLES["VisitMissed"]
    assessment = dose.model_copy(update={"kind": "assessment"})
    assert (dose.topic_of(), assessment.topic_of()) == ("trial.dosing", "trial.efficacy")
    assert CATALOGUE["VisitMissed"].topics() == ("trial.dosing", "trial.efficacy")


def test_catalogue_names_every_contract_event_and_every_sample() -> None:
    assert set(CATALOGUE) >= set(EXPECTED_TOPIC)
    assert set(SAMPLES) == set(CATALOGUE), "add a sample for every new catalogue event"


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_event_has_a_known_topic_and_its_contract_topic(name: str) -> None:
    cls = CATALOGUE[name]
    assert cls.event_type() == name
    assert cls.topic in TOPICS
    if name in EXPECTED_TOPIC:
        assert cls.topic == EXPECTED_TOPIC[name]


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_event_has_a_working_subject(name: str) -> None:
    cls = CATALOGUE[name]
    sample, subject = SAMPLES[name]
    assert type(sample) is cls
    assert cls.subject_field in cls.model_fields
    assert sample.subject() == subject
    # The subject survives the JSON round trip the store and the relay put it through.
    assert parse_data(name, sample.model_dump(mode="json")).subject() == subject


def test_json_schemas_cover_the_catalogue_and_forbid_unknown_fields() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(CATALOGUE)
    for name, schema in schemas.items():
        assert schema["type"] == "object", name
        assert CATALOGUE[name].subject_field in schema["properties"], name
        assert CATALOGUE[name].subject_field in schema["required"], name
        assert schema["additionalProperties"] is False, name
        json.dumps(schema)  # serialisable, for docs and AsyncAPI


def test_unknown_event_type_raises() -> None:
    with pytest.raises(UnknownEventType):
        model_for("PatientTeleported")
    with pytest.raises(UnknownEventType):
        parse_data("patientenrolled", {})
    assert issubclass(UnknownEventType, ValueError)


def test_unknown_fields_in_event_data_are_rejected() -> None:
    sample, _ = SAMPLES["PatientEnrolled"]
    data = {**sample.model_dump(mode="json"), "patient_name": "Jane Doe"}
    with pytest.raises(ValidationError, match="patient_name"):
        parse_data("PatientEnrolled", data)


def test_event_data_is_frozen() -> None:
    sample, _ = SAMPLES["ArmAssigned"]
    assert isinstance(sample, ArmAssigned)
    with pytest.raises(ValidationError):
        sample.arm = "mtx"  # type: ignore[misc]
    assert sample.arm == "msc_high"


def test_event_data_validates_its_constraints() -> None:
    data = SAMPLES["AdverseEventReported"][0].model_dump(mode="json")
    with pytest.raises(ValidationError):
        parse_data("AdverseEventReported", {**data, "ctcae_grade": 6})
    with pytest.raises(ValidationError):
        parse_data("AdverseEventReported", {**data, "relatedness": "maybe"})
    with pytest.raises(ValidationError):
        parse_data("ArmAssigned", {**SAMPLES["ArmAssigned"][0].model_dump(mode="json"), "arm": "placebo"})


# --- the CloudEvents envelope --------------------------------------------------------------------

FULL_ENVELOPE: dict[str, Any] = {
    "specversion": "1.0",
    "id": "7b0f2c9e-1f7c-4c1e-9b43-0c7c2b0f3a11",
    "source": "/services/randomization",
    "type": "ArmAssigned",
    "subject": "p-1",
    "time": "2026-11-26T10:30:00.123456Z",
    "datacontenttype": "application/json",
    "data": SAMPLES["ArmAssigned"][0].model_dump(mode="json"),
    "schemaversion": 1,
    "sequence": 42,
    "correlationid": "req-1",
    "causationid": "ev-0",
    "actor": "coordinator-7",
}


def test_cloudevent_round_trips_every_contract_field() -> None:
    event = CloudEvent.model_validate(FULL_ENVELOPE)
    raw = event.to_bytes()
    wire = json.loads(raw)
    assert set(FULL_ENVELOPE) <= set(wire)
    for key in ("specversion", "id", "source", "type", "subject", "datacontenttype", "data",
                "schemaversion", "sequence", "correlationid", "causationid", "actor"):
        assert wire[key] == FULL_ENVELOPE[key], key
    assert datetime.fromisoformat(wire["time"]) == datetime(2026, 11, 26, 10, 30, 0, 123456, tzinfo=UTC)
    back = CloudEvent.from_bytes(raw)
    assert back == event
    assert back.typed_data() == SAMPLES["ArmAssigned"][0]


def test_cloudevent_defaults_and_omits_absent_extensions() -> None:
    minimal = {k: FULL_ENVELOPE[k] for k in ("id", "source", "type", "subject", "time", "data", "sequence")}
    event = CloudEvent.model_validate(minimal)
    assert (event.specversion, event.datacontenttype, event.schemaversion) == (
        "1.0", "application/json", 1)
    wire = json.loads(event.to_bytes())
    assert "correlationid" not in wire and "actor" not in wire and "causationid" not in wire
    assert wire["specversion"] == "1.0"


def test_cloudevent_keeps_unknown_extension_attributes() -> None:
    event = CloudEvent.model_validate({**FULL_ENVELOPE, "traceparent": "00-abc-def-01"})
    back = CloudEvent.from_bytes(event.to_bytes())
    assert json.loads(back.to_bytes())["traceparent"] == "00-abc-def-01"


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"[]", b"null", b'"x"', b"\xff\xfe"])
def test_from_bytes_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        CloudEvent.from_bytes(raw)


@pytest.mark.parametrize("missing", ["id", "source", "type", "subject", "time", "data", "sequence"])
def test_from_bytes_rejects_a_missing_required_field(missing: str) -> None:
    envelope = {k: v for k, v in FULL_ENVELOPE.items() if k != missing}
    with pytest.raises(ValidationError, match=missing):
        CloudEvent.from_bytes(json.dumps(envelope).encode())


@pytest.mark.parametrize("bad", [{"specversion": "0.3"}, {"datacontenttype": "text/xml"},
                                 {"sequence": "first"}, {"time": "yesterday"}, {"data": [1, 2]}])
def test_from_bytes_rejects_wrong_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CloudEvent.from_bytes(json.dumps({**FULL_ENVELOPE, **bad}).encode())


def test_typed_data_of_an_unknown_type_raises() -> None:
    event = CloudEvent.model_validate({**FULL_ENVELOPE, "type": "SomethingElse"})
    with pytest.raises(UnknownEventType):
        event.typed_data()


# --- canonical JSON and round trips as properties ------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


def reorder(value: Any) -> Any:
    """The same value with every object's keys in reverse insertion order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


@given(json_objects)
def test_canonical_json_is_key_order_independent(value: dict[str, Any]) -> None:
    assert canonical_json(reorder(value)) == canonical_json(value)


@given(json_objects)
def test_canonical_json_round_trips_and_is_compact(value: dict[str, Any]) -> None:
    text = canonical_json(value)
    assert json.loads(text) == value
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_canonical_json_exact_form() -> None:
    assert canonical_json({"b": [1, {"d": 2, "c": "é"}], "a": None}) == '{"a":null,"b":[1,{"c":"é","d":2}]}'
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1})


identifiers = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
offsets = st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))])


@given(
    event_id=identifiers, source=identifiers, event_type=identifiers, subject=identifiers,
    time=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=offsets),
    data=json_objects, schemaversion=st.integers(1, 99), sequence=st.integers(0, 2**62),
    correlationid=st.none() | identifiers, causationid=st.none() | identifiers,
    actor=st.none() | identifiers,
)
def test_cloudevent_round_trip_property(
    event_id: str, source: str, event_type: str, subject: str, time: datetime, data: dict[str, Any],
    schemaversion: int, sequence: int, correlationid: str | None, causationid: str | None,
    actor: str | None,
) -> None:
    event = CloudEvent(id=event_id, source=source, type=event_type, subject=subject, time=time,
                       data=data, schemaversion=schemaversion, sequence=sequence,
                       correlationid=correlationid, causationid=causationid, actor=actor)
    back = CloudEvent.from_bytes(event.to_bytes())
    assert back == event
    assert back.time.utcoffset() == time.utcoffset()


def test_only_a_topics_owner_may_publish_to_it() -> None:
    assert may_publish("/services/dosing", DOSING)
    assert not may_publish("/services/safety", DOSING)  # a SafetyHoldLifted-shaped forgery
    assert not may_publish("/services/dosing", SAFETY)
    assert not may_publish("dosing", DOSING)  # the source exactly as the relay writes it
    assert may_publish("/services/efficacy", ACCESS) and may_publish("/services/audit", PROTOCOL)
    assert not may_publish("/services/gateway", ENROLLMENT)
    assert may_publish("/services/test", "test.some-topic")  # not a topic of the trial
    # Every topic of the trial has its owners, and the relay's sources are among them.
    assert set(PUBLISHERS) == set(TOPICS)
    for model in CATALOGUE.values():
        assert all(PUBLISHERS[topic] for topic in model.topics())
