"""The event catalogue: Pydantic models of every event's data, their topics, and the CloudEvents envelope."""

from __future__ import annotations

import json
from datetime import date, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.settings import SERVICES

ENROLLMENT = "trial.enrollment"
DOSING = "trial.dosing"
SAFETY = "trial.safety"
ACCESS = "trial.access"  # refused write attempts, so monitors see probing (issue 6)
# The audit ledger's chain heads, published outside its database as witnesses (D27).
AUDIT_ANCHORS = "trial.audit.anchors"
PROTOCOL = "trial.protocol"  # which protocol version each service runs, from when (issue 10)
EFFICACY = "trial.efficacy"  # assessments, assessment visits missed, dispositions (issue 11)
TOPICS = (ENROLLMENT, DOSING, SAFETY, EFFICACY, ACCESS, PROTOCOL, AUDIT_ANCHORS)
# What the audit ledger records: everything but its own anchors (which witness the ledger itself).
LEDGER_TOPICS = (ENROLLMENT, DOSING, SAFETY, EFFICACY, ACCESS, PROTOCOL)

# Who may publish to each topic, as the CloudEvents `source` (`/services/<name>`, set by the
# relay): a topic's owner, and every service for the two topics each writes its own facts to.
# A consumer dead-letters a record from anyone else, whatever the broker let through (D42).
PUBLISHERS: dict[str, frozenset[str]] = {
    topic: frozenset(f"/services/{name}" for name in names) for topic, names in {
        ENROLLMENT: ("randomization",), DOSING: ("dosing",), SAFETY: ("safety",),
        EFFICACY: ("efficacy",), AUDIT_ANCHORS: ("audit",),
        ACCESS: SERVICES, PROTOCOL: SERVICES}.items()}


def may_publish(source: str, topic: str) -> bool:
    """Whether a record from `source` belongs on `topic` (a topic not of this trial: anyone)."""
    owners = PUBLISHERS.get(topic)
    return owners is None or source in owners

Arm = Literal["msc_low", "msc_high", "mtx"]
ARMS: tuple[Arm, ...] = ("msc_low", "msc_high", "mtx")


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class EventData(BaseModel):
    """Base of every event's data: frozen, strict about unknown fields, bound to one topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: ClassVar[str]
    schema_version: ClassVar[int] = 1
    # The field whose value keys the Kafka record and fills the CloudEvents `subject`.
    subject_field: ClassVar[str] = "patient_id"

    @classmethod
    def event_type(cls) -> str:
        return cls.__name__

    def subject(self) -> str:
        return str(getattr(self, self.subject_field))

    @classmethod
    def topics(cls) -> tuple[str, ...]:
        """Every topic an event of this type may go to (one, but for VisitMissed)."""
        return (cls.topic,)

    def topic_of(self) -> str:
        """The topic this event goes to."""
        return self.topic

    def published(self) -> EventData:
        """The form of this event the relay publishes to Kafka: the event itself, unless its
        type keeps some of its fields in the writing service's store (issue 14, D51).

        A topic is read by more than the trial's services (pharmacies, any subscriber the
        broker's ACLs let in), and is kept forever: what goes on it is the minimum its readers
        need. The store keeps the event whole (its hash chain is over the whole event), and the
        service answers its own API from there. Override it to return a copy without what stays
        home; the copy must still validate as this type, so a field left out is optional.
        """
        return self


# --- records a service could not apply (D32): the same shape on each service's own topic ---


class _UnappliedRecord(EventData):
    """A service could not apply a record of trial.safety (unreadable, or its handler failed
    every try): it refuses what the record may concern until an operator resolves it (D32)."""

    subject_field = "target"
    record_id: str  # topic:partition:offset
    event_id: str | None = None  # the safety event's id and type, when readable
    type: str | None = None
    scope: Literal["patient", "arm", "trial"]
    target: str  # "*" when the record names no one readable: everyone
    error: str
    detected_at: datetime


class _ResolvedRecord(EventData):
    """An operator resolved an unapplied safety record (applied it by hand, or found it did not
    concern the service): what it stopped may go on."""

    subject_field = "target"
    record_id: str
    scope: Literal["patient", "arm", "trial"]
    target: str
    resolved_by: str
    reason: str
    resolved_at: datetime


Disposition = Literal["treatment_discontinued", "withdrawn", "lost_to_follow_up", "died",
                      "completed"]


class _DispositionNoted(EventData):
    """A service learnt of a patient's disposition (from trial.efficacy, or a withdrawal): the
    same fact in its own store, so what it shows and refuses follows it (D37)."""

    patient_id: str
    site_id: str
    disposition: Disposition
    at: datetime
    reason: str | None = None
    source_event_id: str


# --- trial.enrollment -------------------------------------------------------------------------


class Reason(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    criterion: str
    message: str


# What PatientScreened keeps in the randomization store and never publishes (issue 14, D51).
_NEVER_PUBLISHED = ("Kept in the randomization store, never published: on trial.enrollment it is "
                    "always {empty} (issue 14, D51).")


class PatientScreened(EventData):
    """A site screened a patient against the protocol's eligibility criteria, eligible or not.

    On trial.enrollment it carries the minimum (issue 14, D51): no screening number and no
    failing criteria, which only the randomization store keeps."""

    topic = ENROLLMENT
    subject_field = "screening_id"
    screening_id: str
    site_id: str
    screening_number: str | None = Field(
        None, description="The site's own number for the screening (every screening has one). "
                          + _NEVER_PUBLISHED.format(empty="null"))
    eligible: bool
    reasons: tuple[Reason, ...] = Field(
        (), description="Every eligibility criterion the patient failed, with its message. "
                        + _NEVER_PUBLISHED.format(empty="empty"))
    age_years: int
    weight_kg: float
    pasi: float
    protocol_version: str
    screened_at: datetime
    # Added: the site's own date of the screening (ages and windows count in it), when consent
    # was signed, and the baseline BSA and DLQI beside PASI and weight.
    screened_on: date | None = None
    consent_signed_at: datetime | None = None
    bsa_percent: float | None = None
    dlqi: int | None = None
    # Added (reporting): the sex the site recorded (SDTM DM.SEX); no direct identifier.
    sex: Literal["female", "male", "other"] | None = None

    def published(self) -> PatientScreened:
        """Without the screening number and the failing criteria (issue 14, D51): any reader of
        trial.enrollment would otherwise learn which patient failed the HIV or the pregnancy
        criterion, and hold the number that names them at their site. `eligible` stays (enrolment
        and the reports count screen failures); the whole screening stays in the randomization
        store, from which its API answers the site (the screening's answer, and the reasons
        again when an ineligible screening is enrolled)."""
        return self.model_copy(update={"screening_number": None, "reasons": ()})


class PatientEnrolled(EventData):
    topic = ENROLLMENT
    patient_id: str
    site_id: str
    screening_id: str
    baseline_weight_kg: float
    baseline_pasi: float
    enrolled_at: datetime
    baseline_bsa_percent: float | None = None  # added, from the screening
    baseline_dlqi: int | None = None


class ArmAssigned(EventData):
    topic = ENROLLMENT
    patient_id: str
    site_id: str
    arm: Arm
    randomization_number: int = Field(ge=1)
    stratum: str
    baseline_weight_kg: float
    assigned_at: datetime


class PatientWithdrawn(EventData):
    topic = ENROLLMENT
    patient_id: str
    site_id: str
    reason: str
    withdrawn_at: datetime


class ArmCrossedOver(EventData):
    """An investigator moved a randomized patient to another arm, as the protocol allows."""

    topic = ENROLLMENT
    patient_id: str
    site_id: str
    from_arm: Arm
    to_arm: Arm
    reason: str
    crossed_over_at: datetime


class AllocationSlotUsed(EventData):
    """One slot of the trial's allocation went to a patient; it names no future slot."""

    topic = ENROLLMENT
    subject_field = "stratum"
    randomization_number: int = Field(ge=1)
    stratum: str
    stratum_slot: int = Field(ge=1)  # the slot's number within its sequence (below)
    patient_id: str
    site_id: str
    pasi_band: str
    arm: Arm
    method: Literal["permuted_blocks", "minimization"]
    # The sequence the slot was drawn from, when it was not the stratum's own: while arms are
    # suspended, the stratum's sequence over the open arms ("S1:pasi_lt20|msc_low+mtx").
    sequence: str | None = None


class RandomizationHoldApplied(EventData):
    """A safety hold from trial.safety now stops new randomizations in its scope."""

    topic = ENROLLMENT
    subject_field = "target"
    hold_id: str
    kind: Literal["enrollment_paused", "trial_halted", "arm_suspended"]
    scope: Literal["arm", "trial"]
    target: str
    rule_id: str


class RandomizationHoldLifted(EventData):
    """A DSMB decision lifted the safety hold `hold_id` for randomization."""

    topic = ENROLLMENT
    subject_field = "target"
    hold_id: str
    scope: Literal["patient", "arm", "trial"]
    target: str


class RandomizationRecordUnapplied(_UnappliedRecord):
    """Randomization could not apply a record of trial.safety: an arm it names counts as
    suspended, and one naming the trial, or no one readable, stops every randomization."""

    topic = ENROLLMENT


class RandomizationRecordResolved(_ResolvedRecord):
    """An operator resolved a record randomization could not apply."""

    topic = ENROLLMENT


class PatientDispositionNoted(_DispositionNoted):
    """Randomization learnt of a disposition from trial.efficacy (GET /v1/patients/{id})."""

    topic = ENROLLMENT


# --- trial.dosing -----------------------------------------------------------------------------


class PlannedVisit(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    week: int
    kind: Literal["infusion", "methotrexate", "assessment"]
    due_date: date
    window_start: date
    window_end: date
    product: str | None = None
    planned_cells: int | None = None
    planned_dose_mg: float | None = None


class DosingScheduleCreated(EventData):
    topic = DOSING
    patient_id: str
    site_id: str
    arm: Arm
    anchor_date: date
    visits: tuple[PlannedVisit, ...]
    weight_kg: float | None = None  # the weight the planned cells were computed from


class InfusionGiven(EventData):
    topic = DOSING
    infusion_id: str
    patient_id: str
    site_id: str
    arm: Arm
    week: int
    cells_administered: int
    cells_per_kg: float
    weight_kg: float
    lot_number: str
    given_at: datetime  # UTC
    deviation_reason: str | None = None
    # Added: the site confirmed a weight more than the configured fraction from the last one.
    weight_change_confirmed: bool = False
    # Added: given before the hold `entered_after_hold` took effect, recorded after it.
    late_entry: bool = False
    entered_after_hold: str | None = None


class MethotrexateDoseGiven(EventData):
    topic = DOSING
    dose_id: str
    patient_id: str
    site_id: str
    week: int
    dose_mg: float
    given_at: datetime  # UTC
    deviation_reason: str | None = None
    late_entry: bool = False
    entered_after_hold: str | None = None


class _DosingHoldChange(EventData):
    """A hold on preparing and giving doses, for one patient, one arm or the whole trial."""

    topic = DOSING
    subject_field = "target"
    scope: Literal["patient", "arm", "trial"]
    target: str
    rule_id: str
    hold_id: str
    # Which product stops being prepared: a patient hold may cover only one (safety rules R7, R8).
    product: Literal["any", "infusion", "methotrexate"] = "any"


class DosingHeld(_DosingHoldChange):
    """Stop preparing and giving the product for the hold's scope (a safety rule fired)."""

    # When the hold took effect (the safety decision's time): a dose given before it is not
    # stopped by it, only marked as a late entry. Unknown (None): every dose is stopped.
    held_from: datetime | None = None


class DosingResumed(_DosingHoldChange):
    """The hold `hold_id` was lifted by a DSMB decision: preparing may restart."""

    # (added, D95) When the lift took effect (the DSMB decision's time): a dose given while the
    # hold was in force, from its `held_from` to this, is still refused when entered later.
    # Unknown (resumptions recorded before): the hold's span is not kept.
    resumed_from: datetime | None = None


class SafetyRecordUnapplied(_UnappliedRecord):
    """Dosing could not apply a record of trial.safety: it refuses the doses the record may
    concern (every dose when it cannot tell whose). Pharmacies: stop preparing for the scope, as
    for DosingHeld."""

    topic = DOSING


class SafetyRecordResolved(_ResolvedRecord):
    """An operator resolved a record dosing could not apply: the doses it stopped may go on."""

    topic = DOSING


class DosingScheduleReanchored(EventData):
    """Day 0 is fixed by the week-0 dose: every visit of the current calendar, re-dated from it."""

    topic = DOSING
    patient_id: str
    site_id: str
    arm: Arm
    anchor_date: date
    visits: tuple[PlannedVisit, ...]


class ProtocolDeviationRecorded(EventData):
    """A dose given outside the protocol (window, cell count) with the investigator's reason."""

    topic = DOSING
    deviation_id: str
    patient_id: str
    site_id: str
    arm: Arm
    week: int
    kind: Literal["infusion", "methotrexate"]
    dose_event_id: str  # the InfusionGiven's infusion_id or the MethotrexateDoseGiven's dose_id
    deviations: tuple[Literal["out_of_window", "dose_mismatch", "dose_step_exceeded"], ...]
    reason: str
    recorded_at: datetime


class _ClosedVisit(EventData):
    """A dosing visit whose window closed without a dose."""

    topic = DOSING
    patient_id: str
    site_id: str
    arm: Arm
    week: int
    kind: Literal["infusion", "methotrexate"]
    due_date: date
    window_end: date
    detected_at: datetime


class VisitMissed(_ClosedVisit):
    """A visit whose window closed without it being done: a dose (on trial.dosing, from dosing)
    or an assessment (kind "assessment", on trial.efficacy, from efficacy)."""

    kind: Literal["infusion", "methotrexate", "assessment"]  # type: ignore[assignment]

    @classmethod
    def topics(cls) -> tuple[str, ...]:
        return (DOSING, EFFICACY)

    def topic_of(self) -> str:
        return EFFICACY if self.kind == "assessment" else DOSING


class VisitHeld(_ClosedVisit):
    """A dosing visit whose window closed while a safety hold stopped its dose: held, not
    missed (the dose could not be given)."""

    hold_id: str
    rule_id: str


class VisitRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    week: int
    kind: Literal["infusion", "methotrexate", "assessment"]
    due_date: date


class VisitsCancelled(EventData):
    """The patient's remaining visits end: a withdrawal, or the old arm's doses at a crossover."""

    topic = DOSING
    patient_id: str
    site_id: str
    arm: Arm
    # Added: a treatment discontinuation ends the doses; the end of the study (lost to
    # follow-up, death, completion) ends every visit.
    cause: Literal["withdrawn", "crossover", "treatment_discontinued", "lost_to_follow_up",
                   "died", "completed"]
    visits: tuple[VisitRef, ...]
    cancelled_at: datetime


class AssessmentVisitNoted(EventData):
    """Dosing learnt from trial.efficacy that an assessment visit was done or missed: the
    schedule shows it."""

    topic = DOSING
    patient_id: str
    site_id: str
    week: int
    status: Literal["done", "missed"]
    at: datetime
    source_event_id: str


class DosingDispositionNoted(_DispositionNoted):
    """Dosing learnt of a disposition from trial.efficacy: after a treatment discontinuation no
    dose is given (409 treatment_discontinued); after the study ends no visit is due."""

    topic = DOSING


# --- trial.safety -----------------------------------------------------------------------------


AdverseEventOutcome = Literal["recovered", "recovering", "not_recovered",
                              "recovered_with_sequelae", "fatal", "unknown"]


class AdverseEventReported(EventData):
    topic = SAFETY
    adverse_event_id: str
    patient_id: str
    site_id: str
    arm: Arm | None = None
    term: str
    onset_at: datetime
    ctcae_grade: int = Field(ge=1, le=5)
    serious: bool
    relatedness: Literal["not_related", "unlikely", "possible", "probable", "definite"]
    expected: bool
    infusion_related: bool | None = None
    # When the sponsor learnt of it (the SUSAR clock starts here), and the outcome if known.
    reported_at: datetime | None = None
    outcome: AdverseEventOutcome | None = None
    # Who said `infusion_related`: the reporter, or the service from the infusions it knew of
    # then (derived again when an earlier infusion arrives later). None: recorded before this
    # field, read as the reporter's.
    infusion_related_source: Literal["reporter", "derived"] | None = None


class StoppingRuleTriggered(EventData):
    topic = SAFETY
    subject_field = "target"
    rule_id: str
    rule_set_version: str
    scope: Literal["patient", "arm", "trial"]
    target: str
    evidence: tuple[str, ...]
    triggered_at: datetime | None = None
    protocol_version: str | None = None  # added: the protocol version whose rule fired


class _SafetyHold(EventData):
    """A stopping rule's hold: `scope` and `target` say whom it stops until the DSMB lifts it."""

    topic = SAFETY
    scope: ClassVar[Literal["patient", "arm", "trial"]]
    hold_id: str
    rule_id: str
    # A hold the DSMB imposed itself (its rule id is the protocol's DSMB id): its decision.
    decision_id: str | None = None
    decided_by: str | None = None
    rationale: str | None = None

    @property
    def target(self) -> str:
        return self.subject()


class PatientDosingHeld(_SafetyHold):
    scope = "patient"
    patient_id: str
    product: Literal["any", "infusion", "methotrexate"] = "any"


class ArmSuspended(_SafetyHold):
    scope = "arm"
    subject_field = "arm"
    arm: Arm


class _TrialHold(_SafetyHold):
    scope = "trial"
    subject_field = "trial_id"
    trial_id: str


class EnrollmentPaused(_TrialHold):
    """No new randomizations until lifted."""


class TrialHalted(_TrialHold):
    """No randomization and no dosing in the whole trial until lifted."""


SafetyHold = PatientDosingHeld | ArmSuspended | EnrollmentPaused | TrialHalted


class SafetyHoldLifted(EventData):
    topic = SAFETY
    subject_field = "target"
    hold_id: str
    scope: Literal["patient", "arm", "trial"]
    target: str
    rationale: str
    decided_by: str


class AdverseEventFollowedUp(EventData):
    """A later report on an adverse event: only the fields that changed; the first stays as it was."""

    topic = SAFETY
    follow_up_id: str
    adverse_event_id: str
    patient_id: str
    site_id: str
    ctcae_grade: int | None = Field(None, ge=1, le=5)
    serious: bool | None = None
    relatedness: Literal["not_related", "unlikely", "possible", "probable", "definite"] | None = None
    expected: bool | None = None
    outcome: AdverseEventOutcome | None = None
    resolved_at: datetime | None = None
    reported_at: datetime
    infusion_related: bool | None = None  # the reporter's judgment, replacing any derived one


class LabResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    analyte: Literal["ALT", "AST", "WBC", "neutrophils", "platelets"]
    value: float
    unit: str
    uln: float | None = None  # upper limit of normal, in `unit` (required for ALT and AST)


class LabResultReported(EventData):
    """A patient's laboratory results (the methotrexate rules R7 and R8 read them)."""

    topic = SAFETY
    lab_result_id: str
    patient_id: str
    site_id: str
    arm: Arm | None = None
    collected_at: datetime
    results: tuple[LabResult, ...]
    reported_at: datetime


class SusarReportDue(EventData):
    """A suspected unexpected serious adverse reaction must reach the regulator by `due_at`."""

    topic = SAFETY
    adverse_event_id: str
    patient_id: str
    rule_id: str
    days: int
    aware_at: datetime
    due_at: datetime
    # Set when a follow-up made the SUSAR fatal or life-threatening: the deadline in force
    # before (this one is `days` after the follow-up; whichever comes first binds).
    previous_due_at: datetime | None = None


class SusarFollowUpReportDue(EventData):
    """The complete report of a fatal or life-threatening SUSAR must follow its first report to
    the regulator: `days` further calendar days after that report's deadline."""

    topic = SAFETY
    adverse_event_id: str
    patient_id: str
    rule_id: str
    days: int
    initial_due_at: datetime
    due_at: datetime


class SeriousAdverseEventReportDue(EventData):
    """A serious adverse event's initial report is due `hours` after safety learnt it was serious."""

    topic = SAFETY
    adverse_event_id: str
    patient_id: str
    hours: int
    aware_at: datetime
    due_at: datetime


class PatientSafetyFactRecorded(EventData):
    """What safety learnt about a patient from enrolment or dosing: its rules' own evidence trail."""

    topic = SAFETY
    patient_id: str
    site_id: str
    fact: Literal["enrolled", "assigned", "withdrawn", "crossed_over", "infusion", "methotrexate"]
    arm: Arm | None = None
    at: datetime
    source_event_id: str


# --- trial.efficacy ---------------------------------------------------------------------------


class PasiRegionScores(BaseModel):
    """One region's signs (erythema, induration, desquamation: 0-4) and area score (0-6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    erythema: int = Field(ge=0, le=4)
    induration: int = Field(ge=0, le=4)
    desquamation: int = Field(ge=0, le=4)
    area: int = Field(ge=0, le=6)


PasiRegionName = Literal["head", "upper_limbs", "trunk", "lower_limbs"]


class _Measurements(EventData):
    """What an assessment measured, every component kept: the PASI from its four regions (or
    only its total, when a site's system sends only that), BSA, DLQI and sPGA."""

    topic = EFFICACY
    pasi_regions: dict[PasiRegionName, PasiRegionScores] | None = None
    pasi_total: float = Field(ge=0, le=72)  # exact to 0.1 when from regions; as sent otherwise
    bsa_percent: float | None = Field(None, ge=0, le=100)
    # The ten answers as recorded (a score 0-3, an answer's name, question 7's two parts, or
    # null when unanswered), or None when only the total was sent.
    dlqi_items: tuple[Any, ...] | None = None
    dlqi_total: int | None = Field(None, ge=0, le=30)  # None: not scored (2+ unanswered)
    spga: int | None = Field(None, ge=0, le=5)


class AssessmentRecorded(_Measurements):
    """A site assessed a patient: at a scheduled assessment week, or unscheduled (week None)."""

    assessment_id: str
    patient_id: str
    site_id: str
    arm: Arm  # the randomized arm (the analysis is by intention to treat)
    week: int | None
    unscheduled: bool
    assessed_at: datetime  # UTC
    assessed_on: date  # the site's own date
    # Assessed after the patient's treatment was discontinued: counted, and a non-response
    # under non-responder imputation.
    after_treatment_discontinued: bool = False
    late_entry: bool = False  # recorded after its window closed and the visit was marked missed


class AssessmentCorrected(_Measurements):
    """A correction of an assessment, with its reason: the measurements as they now stand (the
    recorded ones are never changed) and which of them changed."""

    correction_id: str
    assessment_id: str
    patient_id: str
    site_id: str
    week: int | None
    changed: tuple[str, ...]
    reason: str
    corrected_at: datetime


class FollowUpFactRecorded(EventData):
    """What efficacy learnt from trial.enrollment and trial.dosing about a patient's follow-up:
    its own evidence trail (screening baseline, arm, withdrawal, assessment visits and dates)."""

    topic = EFFICACY
    patient_id: str
    site_id: str
    fact: Literal["enrolled", "randomized", "crossed_over", "withdrawn", "assessment_visits"]
    at: datetime
    source_event_id: str
    arm: Arm | None = None
    screening_pasi: float | None = None
    screening_bsa_percent: float | None = None
    screening_dlqi: int | None = None
    visits: tuple[PlannedVisit, ...] = ()  # the assessment visits, dated (assessment_visits)
    reason: str | None = None
    # (added, D95) assessment_visits: dated from the first dose (true) or, until it is given,
    # provisionally from the randomization day (false); none in facts recorded before.
    day_zero_fixed: bool | None = None


class TreatmentDiscontinued(EventData):
    """The investigator stopped the patient's treatment: no more doses; the assessments go on to
    week 52 (stopping treatment is not leaving the study)."""

    topic = EFFICACY
    patient_id: str
    site_id: str
    reason: str
    discontinued_at: datetime
    decided_by: str


class LostToFollowUp(EventData):
    """The patient left the study without a word: `missed_in_a_row` assessments in a row were
    missed (by the sweep), or the investigator declared it."""

    topic = EFFICACY
    patient_id: str
    site_id: str
    declared_by: str  # the investigator's subject, or "efficacy-sweep"
    reason: str
    missed_weeks: tuple[int, ...] = ()
    at: datetime


class DeathRecorded(EventData):
    """Safety reported a fatal adverse event: the patient's study ends."""

    topic = EFFICACY
    patient_id: str
    site_id: str
    adverse_event_id: str
    reported_at: datetime
    source_event_id: str


class StudyCompleted(EventData):
    """The patient's week-52 assessment was done: the study is complete for them."""

    topic = EFFICACY
    patient_id: str
    site_id: str
    assessment_id: str
    completed_at: datetime


# --- trial.access -----------------------------------------------------------------------------


class AccessDenied(EventData):
    """A known principal's write was refused (403 or 404): who is in the envelope's actor."""

    topic = ACCESS
    subject_field = "access_id"
    access_id: str
    service: str  # which one refused: the gateway or the owning service
    method: str
    path: str
    status: int
    code: str
    patient_id: str | None = None  # when the path names a patient
    denied_at: datetime


class PatientDataViewed(EventData):
    """A monitor's or the DSMB's read of one patient's data, answered: the audit trail of who saw
    what (21 CFR 11). Who is in the envelope's actor; no patient data is repeated here."""

    topic = ACCESS
    subject_field = "view_id"
    view_id: str
    service: str  # which one answered the read
    route: str  # the route template read, e.g. /v1/patients/{patient_id}/schedule
    patient_id: str
    viewed_at: datetime


# --- trial.protocol ---------------------------------------------------------------------------


class ProtocolVersionActivated(EventData):
    """A service started applying a protocol version (the first one included): which, its
    content's hash (so two folders both called 1.1.0 cannot pass for one), who, and when."""

    topic = PROTOCOL
    subject_field = "service"
    service: str
    trial_id: str
    version: str
    content_hash: str  # SHA-256 of the canonical JSON of the whole validated configuration
    activated_by: str
    activated_at: datetime


# --- trial.audit.anchors ----------------------------------------------------------------------


class AuditChainAnchored(EventData):
    """The audit ledger's chain, verified up to `position`, ends in `hash`.

    Kept on the broker, outside the ledger's database: someone who rewrites a ledger entry and
    recomputes every hash after it still cannot change the anchors already published, so
    `GET /v1/audit/verify` catches the rewrite. `ledger` is the hash at position 1, which names
    one ledger among others on the same broker.
    """

    topic = AUDIT_ANCHORS
    subject_field = "ledger"
    ledger: str
    position: int = Field(ge=1)
    hash: str
    anchored_at: datetime


def _catalogue() -> dict[str, type[EventData]]:
    """Every EventData subclass defined in this module is in the catalogue: define, don't list."""
    found: dict[str, type[EventData]] = {}
    todo = list(EventData.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == __name__ and not cls.__name__.startswith("_"):  # not the bases
            found[cls.event_type()] = cls
    return dict(sorted(found.items()))


CATALOGUE: dict[str, type[EventData]] = _catalogue()


class UnknownEventType(ValueError):
    pass


def model_for(event_type: str) -> type[EventData]:
    try:
        return CATALOGUE[event_type]
    except KeyError:
        raise UnknownEventType(event_type) from None


def parse_data(event_type: str, data: dict[str, Any]) -> EventData:
    return model_for(event_type).model_validate(data)


# --- the wire format --------------------------------------------------------------------------


class CloudEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode: the value of every Kafka record the system writes."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: AwareDatetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any]
    schemaversion: int = 1
    sequence: int
    correlationid: str | None = None
    causationid: str | None = None
    actor: str | None = None
    actorrole: str | None = None
    actorsite: str | None = None
    reason: str | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CloudEvent:
        return cls.model_validate_json(raw)

    def typed_data(self) -> EventData:
        return parse_data(self.type, self.data)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every event's data, keyed by event type (for docs and AsyncAPI)."""
    return {name: cls.model_json_schema() for name, cls in CATALOGUE.items()}


def catalogue_document() -> dict[str, Any]:
    """The published catalogue: the envelope's schema, and each event's topic, version and data."""
    return {
        "$comment": "Generated by `trial schemas`; do not edit by hand.",
        "envelope": CloudEvent.model_json_schema(),
        "events": {
            name: {"topic": cls.topic, "topics": list(cls.topics()),
                   "schemaversion": cls.schema_version,
                   "subject": cls.subject_field, "data": cls.model_json_schema()}
            for name, cls in sorted(CATALOGUE.items())
        },
    }


# `canonical_json`'s encoder, made once: the C encoder `json.dumps` itself builds on every call
# with these settings (sorted keys, no spaces, UTF-8 as is, NaN allowed, `str` for the rest),
# without the circular-reference check (no event's data refers to itself). Twice as fast; the
# same text, pinned by a property test against `json.dumps` (D67). None where CPython's C
# accelerator is missing: `json.dumps` then.
_CANONICAL = (c_make_encoder(None, str, encode_basestring, None, ":", ",", True, False, True)
              if c_make_encoder is not None else None)


def canonical_json(value: Any) -> str:
    """The one serialisation the hash chain is computed over: sorted keys, no spaces, UTF-8."""
    if _CANONICAL is not None:
        return "".join(_CANONICAL(value, 0))
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
