"""CDISC SDTM tabulations (SDTMIG 3.4) of the trial, built from the audit ledger's history: DM,
EX, AE, DS, QS and SV, as CSV (RFC 4180) or SAS transport version 5 (XPT).

Pure: the standard library, the event catalogue, the efficacy scoring and the CTCAE table; only
`read_xpt` (the reverse of `to_xpt`, for tests and checks) needs pyreadstat.

How events become records (what a define.xml would say):
- Subjects: everyone enrolled (PatientEnrolled) or randomized (ArmAssigned). USUBJID is
  "<STUDYID>-<patient id>", SUBJID the patient id. An enrolled patient never randomized has a DM
  record with ARMNRS "NOT ASSIGNED"; one randomized but never dosed has ARMCD/ARM and ARMNRS
  "ASSIGNED, NOT TREATED" with ACTARMCD/ACTARM null (SDTMIG 3.4 DM). ACTARMCD/ACTARM is the arm
  after the last ArmCrossedOver.
- Dates: every --DTC is a UTC date and time, "YYYY-MM-DDThh:mm:ss" (every event time is one, so
  no value is a date alone). RFSTDTC and RFXSTDTC are the first dose (either product), RFENDTC
  and RFXENDTC the last. --DY counts from the date of RFSTDTC (day 1; the day before is -1, no
  day 0), on the UTC dates of both, so that it agrees with the --DTC it is computed from.
- --SEQ numbers a subject's records from 1, in time order (the ledger's order breaking ties).
- Visits: VISITNUM is the protocol week (VISIT "WEEK n", planned study day VISITDY 7n + 1): an
  assessment week and the dose of the same week are one visit. An unscheduled assessment is
  VISIT "UNSCHEDULED" with VISITNUM = the last planned visit the subject had done before it
  + 0.01, 0.02, ... in time order (SDTMIG 4.4.5), the same number in QS and SV.
- EX: one record per InfusionGiven (EXTRT "UC-MSC", EXDOSE = cells given / weight in kg,
  "cells/kg", "INJECTION, SUSPENSION", "INTRAVENOUS", EXLOT) or MethotrexateDoseGiven
  ("METHOTREXATE", mg, "TABLET", "ORAL"); EXADJ is the deviation reason. EXENDTC is EXSTDTC for a
  tablet (a point in time) and null for an infusion (its end is not recorded).
- AE: one record per AdverseEventReported with its follow-ups applied in ledger order (each
  changes only what it names): AETOXGR is the CTCAE grade "1".."5", AEENDTC the resolution.
  AETERM is coded by `ctcae.code`: AELLT and AEDECOD are the CTCAE v5.0 term, AEBODSYS and AESOC
  its system organ class; an unmatched term has AEDECOD null and AEBODSYS "UNCODED". MedDRA codes
  and AEACN are not recorded by any event: null.
- DS: "INFORMED CONSENT OBTAINED" per enrolled patient (the screening's consent time) and
  "RANDOMIZED" per ArmAssigned, both DSCAT "PROTOCOL MILESTONE"; and one DSCAT "DISPOSITION EVENT"
  record per disposition fact, which are exactly the PatientWithdrawn ("WITHDRAWAL BY SUBJECT"),
  TreatmentDiscontinued (DSSCAT "STUDY TREATMENT", DSDECOD from its reason, "PHYSICIAN DECISION"
  when the reason names none of `_DISCONTINUATION_REASONS`), LostToFollowUp ("LOST TO
  FOLLOW-UP"), DeathRecorded ("DEATH", DSTERM the fatal adverse event's term) and
  StudyCompleted ("COMPLETED") facts; the others have DSSCAT "STUDY PARTICIPATION". DSSTDTC of a
  death is the fatal adverse event's resolution (null when unknown), DSDTC when it was reported.
- QS: per AssessmentRecorded, the measurements of its latest AssessmentCorrected if any: PASI
  (QSCAT "PASI": the 16 region components PASIHEER..PASILLAR when recorded, and PASITOT, derived
  when from regions), BSA (%), sPGA, DLQI (DLQI01..DLQI10 when the answers were recorded, with the
  answer as QSORRES and its score as QSSTRESN; DLQITOT). An unanswered question, or a DLQI total
  not scored (two or more unanswered), is QSSTAT "NOT DONE". QSBLFL is "Y" on week-0 results,
  QSLOBXFL on each test's last result before the first dose.
- SV: one record per visit (SDTMIG 3.4: one per VISITNUM): a planned visit with a dose or a
  scheduled assessment done has SVPRESP "Y", SVOCCUR "Y", SVSTDTC/SVENDTC its first and last
  activity; a planned visit with nothing done and a VisitMissed (or VisitHeld: a safety hold
  stopped the dose) has SVOCCUR "N" (SVREASOC names the hold); an unscheduled assessment has
  SVPRESP and SVOCCUR null, SVUPDES "UNSCHEDULED ASSESSMENT".
- Text longer than its variable (200 bytes of UTF-8 at most, XPT v5's limit) is cut there, and
  trailing blanks are dropped (XPT keeps none); SDTMIG 4.5.3.2 would carry the rest of a long
  reason in a SUPP-- dataset, which this module does not build.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from services.audit import ctcae
from services.audit.history import Fact, History
from services.efficacy import scoring
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    AssessmentCorrected,
    AssessmentRecorded,
    DeathRecorded,
    InfusionGiven,
    LostToFollowUp,
    MethotrexateDoseGiven,
    PasiRegionName,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    StudyCompleted,
    TreatmentDiscontinued,
    VisitHeld,
    VisitMissed,
)

STANDARD = "SDTMIG 3.4"
DOMAINS = ("DM", "EX", "AE", "DS", "QS", "SV")
TEXT_MAX = 200  # the longest character value SAS transport version 5 holds

Value = str | float | None
Row = dict[str, Value]


@dataclass(frozen=True)
class Variable:
    """One SDTM variable: name (8 characters at most), label (40 at most), type, length (bytes:
    the most a value may take in `metadata()`, the most this dataset's values take in a
    `Dataset`, 8 for a number) and core (Req, Exp or Perm in SDTMIG 3.4)."""

    name: str
    label: str
    type: Literal["Char", "Num"]
    length: int
    core: Literal["Req", "Exp", "Perm"] = "Perm"


@dataclass(frozen=True)
class Dataset:
    """One domain's records: every row has every variable, None where null."""

    domain: str
    label: str
    variables: tuple[Variable, ...]
    rows: list[Row]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)


# ------------------------------------------------------------------------------ the variables

_Core = Literal["Req", "Exp", "Perm"]
_DTC = 19  # "YYYY-MM-DDThh:mm:ss"


def _char(name: str, label: str, core: _Core = "Perm", length: int = TEXT_MAX) -> Variable:
    return Variable(name, label, "Char", length, core)


def _num(name: str, label: str, core: _Core = "Perm") -> Variable:
    return Variable(name, label, "Num", 8, core)


def _ids(seq: str | None) -> tuple[Variable, ...]:
    ids = (_char("STUDYID", "Study Identifier", "Req", 20), _char("DOMAIN", "Domain Abbreviation", "Req", 2),
           _char("USUBJID", "Unique Subject Identifier", "Req"))
    return ids + ((_num(seq, "Sequence Number", "Req"),) if seq else ())


@dataclass(frozen=True)
class _Spec:
    label: str
    structure: str
    keys: tuple[str, ...]
    variables: tuple[Variable, ...]


_SPECS: Mapping[str, _Spec] = {
    "DM": _Spec("Demographics", "One record per subject", ("STUDYID", "USUBJID"), (
        *_ids(None),
        _char("SUBJID", "Subject Identifier for the Study", "Req", 64),
        _char("RFSTDTC", "Subject Reference Start Date/Time", "Exp", _DTC),
        _char("RFENDTC", "Subject Reference End Date/Time", "Exp", _DTC),
        _char("RFXSTDTC", "Date/Time of First Study Treatment", "Exp", _DTC),
        _char("RFXENDTC", "Date/Time of Last Study Treatment", "Exp", _DTC),
        _char("RFICDTC", "Date/Time of Informed Consent", "Exp", _DTC),
        _char("RFPENDTC", "Date/Time of End of Participation", "Exp", _DTC),
        _char("DTHDTC", "Date/Time of Death", "Exp", _DTC),
        _char("DTHFL", "Subject Death Flag", "Exp", 1),
        _char("SITEID", "Study Site Identifier", "Req", 20),
        _num("AGE", "Age", "Exp"),
        _char("AGEU", "Age Units", "Exp", 6),
        _char("SEX", "Sex", "Req", 16),
        _char("RACE", "Race", "Exp", 60),
        _char("ARMCD", "Planned Arm Code", "Exp", 20),
        _char("ARM", "Description of Planned Arm", "Exp"),
        _char("ACTARMCD", "Actual Arm Code", "Exp", 20),
        _char("ACTARM", "Description of Actual Arm", "Exp"),
        _char("ARMNRS", "Reason Arm and/or Actual Arm is Null", "Exp", 40),
        _char("ACTARMUD", "Description of Unplanned Actual Arm", "Exp"),
        _char("COUNTRY", "Country", "Req", 3),
    )),
    "EX": _Spec("Exposure", "One record per study treatment administration per subject",
                ("STUDYID", "USUBJID", "EXTRT", "EXSTDTC"), (
        *_ids("EXSEQ"),
        _char("EXSPID", "Sponsor-Defined Identifier", "Perm", 64),
        _char("EXTRT", "Name of Treatment", "Req", 20),
        _num("EXDOSE", "Dose", "Exp"),
        _char("EXDOSU", "Dose Units", "Exp", 20),
        _char("EXDOSFRM", "Dose Form", "Exp", 40),
        _char("EXROUTE", "Route of Administration", "Perm", 20),
        _char("EXLOT", "Lot Number", "Perm", 40),
        _char("EXADJ", "Reason for Dose Adjustment"),
        _num("VISITNUM", "Visit Number"),
        _char("VISIT", "Visit Name", "Perm", 20),
        _char("EXSTDTC", "Start Date/Time of Treatment", "Exp", _DTC),
        _char("EXENDTC", "End Date/Time of Treatment", "Exp", _DTC),
        _num("EXSTDY", "Study Day of Start of Treatment"),
        _num("EXENDY", "Study Day of End of Treatment"),
    )),
    "AE": _Spec("Adverse Events", "One record per adverse event per subject",
                ("STUDYID", "USUBJID", "AEDECOD", "AESTDTC"), (
        *_ids("AESEQ"),
        _char("AESPID", "Sponsor-Defined Identifier", "Perm", 64),
        _char("AETERM", "Reported Term for the Adverse Event", "Req"),
        _char("AELLT", "Lowest Level Term", "Exp", 100),
        _num("AELLTCD", "Lowest Level Term Code", "Exp"),
        _char("AEDECOD", "Dictionary-Derived Term", "Req", 100),
        _num("AEPTCD", "Preferred Term Code", "Exp"),
        _char("AEHLT", "High Level Term", "Exp", 100),
        _num("AEHLTCD", "High Level Term Code", "Exp"),
        _char("AEHLGT", "High Level Group Term", "Exp", 100),
        _num("AEHLGTCD", "High Level Group Term Code", "Exp"),
        _char("AEBODSYS", "Body System or Organ Class", "Exp", 100),
        _num("AEBDSYCD", "Body System or Organ Class Code", "Exp"),
        _char("AESOC", "Primary System Organ Class", "Exp", 100),
        _num("AESOCCD", "Primary System Organ Class Code", "Exp"),
        _char("AESER", "Serious Event", "Exp", 1),
        _char("AEACN", "Action Taken with Study Treatment", "Exp", 40),
        _char("AEREL", "Causality", "Exp", 20),
        _char("AEOUT", "Outcome of Adverse Event", "Perm", 40),
        _char("AESDTH", "Results in Death", "Perm", 1),
        _char("AETOXGR", "Standard Toxicity Grade", "Perm", 1),
        _char("AESTDTC", "Start Date/Time of Adverse Event", "Exp", _DTC),
        _char("AEENDTC", "End Date/Time of Adverse Event", "Exp", _DTC),
        _num("AESTDY", "Study Day of Start of Adverse Event"),
        _num("AEENDY", "Study Day of End of Adverse Event"),
    )),
    "DS": _Spec("Disposition", "One record per disposition status or protocol milestone per subject",
                ("STUDYID", "USUBJID", "DSDECOD", "DSSTDTC"), (
        *_ids("DSSEQ"),
        _char("DSSPID", "Sponsor-Defined Identifier", "Perm", 64),
        _char("DSTERM", "Reported Term for the Disposition Event", "Req"),
        _char("DSDECOD", "Standardized Disposition Term", "Req", 40),
        _char("DSCAT", "Category for Disposition Event", "Exp", 20),
        _char("DSSCAT", "Subcategory for Disposition Event", "Perm", 20),
        _char("DSDTC", "Date/Time of Collection", "Perm", _DTC),
        _char("DSSTDTC", "Start Date/Time of Disposition Event", "Exp", _DTC),
        _num("DSSTDY", "Study Day of Start of Disposition Event", "Exp"),
    )),
    "QS": _Spec("Questionnaires", "One record per question per assessment per subject",
                ("STUDYID", "USUBJID", "QSCAT", "QSTESTCD", "VISITNUM"), (
        *_ids("QSSEQ"),
        _char("QSGRPID", "Group ID", "Perm", 64),
        _char("QSTESTCD", "Question Short Name", "Req", 8),
        _char("QSTEST", "Question Name", "Req", 40),
        _char("QSCAT", "Category of Question", "Req", 20),
        _char("QSORRES", "Finding in Original Units", "Exp", 40),
        _char("QSORRESU", "Original Units", "Perm", 10),
        _char("QSSTRESC", "Character Result/Finding in Std Format", "Exp", 40),
        _num("QSSTRESN", "Numeric Finding in Standard Units"),
        _char("QSSTRESU", "Standard Units", "Perm", 10),
        _char("QSSTAT", "Completion Status", "Perm", 8),
        _char("QSREASND", "Reason Not Performed", "Perm", 60),
        _char("QSLOBXFL", "Last Observation Before Exposure Flag", "Exp", 1),
        _char("QSBLFL", "Baseline Flag", "Perm", 1),
        _char("QSDRVFL", "Derived Flag", "Perm", 1),
        _num("VISITNUM", "Visit Number", "Exp"),
        _char("VISIT", "Visit Name", "Perm", 20),
        _char("QSDTC", "Date/Time of Finding", "Exp", _DTC),
        _num("QSDY", "Study Day of Finding"),
    )),
    "SV": _Spec("Subject Visits", "One record per subject per actual or planned visit",
                ("STUDYID", "USUBJID", "VISITNUM"), (
        *_ids(None),
        _num("VISITNUM", "Visit Number", "Req"),
        _char("VISIT", "Visit Name", "Perm", 20),
        _char("SVPRESP", "Pre-specified", "Exp", 1),
        _char("SVOCCUR", "Occurrence", "Exp", 1),
        _char("SVREASOC", "Reason for Occur Value", "Perm", 100),
        _num("VISITDY", "Planned Study Day of Visit"),
        _char("SVSTDTC", "Start Date/Time of Observation", "Exp", _DTC),
        _char("SVENDTC", "End Date/Time of Observation", "Exp", _DTC),
        _num("SVSTDY", "Study Day of Start of Observation"),
        _num("SVENDY", "Study Day of End of Observation"),
        _char("SVUPDES", "Description of Unplanned Visit", "Perm", 100),
    )),
}


def metadata() -> dict[str, Any]:
    """Every domain's label, structure, keys and variables (name, label, type, length, core):
    one JSON document, the ceilings a define.xml would state."""
    return {
        "standard": STANDARD,
        "domains": {
            domain: {"label": spec.label, "structure": spec.structure, "keys": list(spec.keys),
                     "variables": [{"name": v.name, "label": v.label, "type": v.type,
                                    "length": v.length, "core": v.core} for v in spec.variables]}
            for domain, spec in _SPECS.items()
        },
    }


# ------------------------------------------------------------------------------ the vocabulary

_ARMS: Mapping[Arm, tuple[str, str]] = {
    "msc_low": ("MSCLOW", "Low-Dose UC-MSCs"),
    "msc_high": ("MSCHIGH", "High-Dose UC-MSCs"),
    "mtx": ("MTX", "Methotrexate"),
}
COUNTRY = "CHN"  # both sites are in China
_RELATEDNESS = {"not_related": "NOT RELATED", "unlikely": "UNLIKELY RELATED",
                "possible": "POSSIBLY RELATED", "probable": "PROBABLY RELATED",
                "definite": "RELATED"}
_OUTCOMES = {"recovered": "RECOVERED/RESOLVED", "recovering": "RECOVERING/RESOLVING",
             "not_recovered": "NOT RECOVERED/NOT RESOLVED",
             "recovered_with_sequelae": "RECOVERED/RESOLVED WITH SEQUELAE",
             "fatal": "FATAL", "unknown": "UNKNOWN"}
# NCOMPLT terms a treatment discontinuation's free-text reason may name, first match wins.
_DISCONTINUATION_REASONS: tuple[tuple[str, str], ...] = (
    (r"\bpregnan", "PREGNANCY"),
    (r"\badverse (event|reaction)|\btoxicit|\bside[- ]effect|\bintoleran", "ADVERSE EVENT"),
    (r"\black of (efficacy|response)|\bno (clinical )?(response|improvement)|\bineffective",
     "LACK OF EFFICACY"),
    (r"\bprotocol (deviation|violation)", "PROTOCOL DEVIATION"),
    (r"\bnon-?complian", "NON-COMPLIANCE WITH STUDY DRUG"),
    (r"\b(patient|subject)('s)? (request|decision|choice)|\brefus|\bwithdr[ae]w consent",
     "WITHDRAWAL BY SUBJECT"),
)

_REGIONS: tuple[tuple[PasiRegionName, str, str], ...] = (
    ("head", "HE", "Head"), ("upper_limbs", "UL", "Upper Limbs"), ("trunk", "TR", "Trunk"),
    ("lower_limbs", "LL", "Lower Limbs"))
_SIGNS = (("erythema", "ER", "Erythema"), ("induration", "IN", "Induration"),
          ("desquamation", "DE", "Desquamation"), ("area", "AR", "Area Score"))
_DLQI_QUESTIONS = ("Itchy, Sore, Painful or Stinging", "Embarrassed or Self-Conscious",
                   "Shopping, Home or Garden", "Clothes You Wear", "Social or Leisure Activities",
                   "Sport", "Working or Studying", "Partner, Friends or Relatives",
                   "Sexual Difficulties", "Treatment a Problem")
_NOT_SCORED = "2 OR MORE QUESTIONS UNANSWERED"


def decoded_discontinuation(reason: str) -> str:
    """The NCOMPLT term a treatment discontinuation's reason names, else PHYSICIAN DECISION
    (the investigator decided it)."""
    for pattern, term in _DISCONTINUATION_REASONS:
        if re.search(pattern, reason, re.IGNORECASE):
            return term
    return "PHYSICIAN DECISION"


# ------------------------------------------------------------------------------ times

def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _dtc(moment: datetime | None) -> str | None:
    return None if moment is None else _utc(moment).strftime("%Y-%m-%dT%H:%M:%S")


def _study_day(reference: date | None, moment: datetime | None) -> float | None:
    """SDTMIG 4.4.4: day 1 is the reference date, the day before it -1."""
    if reference is None or moment is None:
        return None
    days = (_utc(moment).date() - reference).days
    return float(days + 1 if days >= 0 else days)


# ------------------------------------------------------------------------------ the facts, folded

_Dose = InfusionGiven | MethotrexateDoseGiven
_Measured = AssessmentRecorded | AssessmentCorrected
_LAST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _AdverseEvent:
    fact: Fact
    reported: AdverseEventReported
    grade: int
    serious: bool
    relatedness: str
    outcome: str | None
    resolved_at: datetime | None

    @property
    def fatal(self) -> bool:
        return self.outcome == "fatal" or self.grade == 5


@dataclass(frozen=True)
class _Assessment:
    fact: Fact
    recorded: AssessmentRecorded
    measured: _Measured  # the latest correction's measurements, else the recorded ones


@dataclass(frozen=True)
class _Visit:
    number: float
    name: str
    planned_day: float | None


class _Trial:
    """The history read once for every domain: who, their doses, adverse events, assessments."""

    def __init__(self, history: History, study_id: str) -> None:
        self.history = history
        self.study_id = study_id
        self.screenings = {s.screening_id: s for s in history.data(PatientScreened)}
        self.enrolled: dict[str, tuple[Fact, PatientEnrolled]] = {}
        for fact, enrolled in history.of(PatientEnrolled):
            self.enrolled.setdefault(enrolled.patient_id, (fact, enrolled))
        self.assigned: dict[str, tuple[Fact, ArmAssigned]] = {}
        for fact, assigned in history.of(ArmAssigned):
            self.assigned.setdefault(assigned.patient_id, (fact, assigned))
        self.actual_arm: dict[str, Arm] = {p: a.arm for p, (_, a) in self.assigned.items()}
        for crossed in history.data(ArmCrossedOver):
            self.actual_arm[crossed.patient_id] = crossed.to_arm
        self.doses: list[tuple[Fact, _Dose]] = sorted(
            ((fact, dose) for fact, dose in history.of(InfusionGiven, MethotrexateDoseGiven)
             if isinstance(dose, InfusionGiven | MethotrexateDoseGiven)),
            key=lambda fd: (_utc(fd[1].given_at), fd[0].position))
        self.exposure: dict[str, tuple[datetime, datetime]] = {}
        for _, dose in self.doses:
            first, _last = self.exposure.get(dose.patient_id, (dose.given_at, dose.given_at))
            self.exposure[dose.patient_id] = (first, dose.given_at)
        self.adverse_events = self._adverse_events()
        self.assessments = self._assessments()
        self.visits = self._unscheduled_visits()

    def usubjid(self, patient_id: str) -> str:
        return f"{self.study_id}-{patient_id}"

    def reference(self, patient_id: str) -> date | None:
        """The date of RFSTDTC: the first dose's (UTC) date."""
        found = self.exposure.get(patient_id)
        return None if found is None else _utc(found[0]).date()

    def _adverse_events(self) -> list[_AdverseEvent]:
        follow_ups: dict[str, list[AdverseEventFollowedUp]] = defaultdict(list)
        for follow_up in self.history.data(AdverseEventFollowedUp):
            follow_ups[follow_up.adverse_event_id].append(follow_up)
        found = []
        for fact, ae in self.history.of(AdverseEventReported):
            event = _AdverseEvent(fact, ae, ae.ctcae_grade, ae.serious, ae.relatedness, ae.outcome,
                                  None)
            for f in follow_ups[ae.adverse_event_id]:  # in ledger order: the latest wins
                event = replace(
                    event, grade=f.ctcae_grade if f.ctcae_grade is not None else event.grade,
                    serious=f.serious if f.serious is not None else event.serious,
                    relatedness=f.relatedness or event.relatedness,
                    outcome=f.outcome or event.outcome,
                    resolved_at=f.resolved_at or event.resolved_at)
            found.append(event)
        return found

    def death_at(self, death: DeathRecorded) -> datetime | None:
        """When the patient died: the end of the fatal adverse event, when known."""
        for ae in self.adverse_events:
            if ae.reported.adverse_event_id == death.adverse_event_id and ae.fatal:
                return ae.resolved_at
        return None

    def fatal_term(self, death: DeathRecorded) -> str | None:
        return next((ae.reported.term for ae in self.adverse_events
                     if ae.reported.adverse_event_id == death.adverse_event_id), None)

    def _assessments(self) -> list[_Assessment]:
        latest: dict[str, AssessmentCorrected] = {}
        for correction in self.history.data(AssessmentCorrected):
            latest[correction.assessment_id] = correction  # ledger order: the last is the latest
        return [_Assessment(fact, a, latest.get(a.assessment_id, a))
                for fact, a in self.history.of(AssessmentRecorded)]

    def _unscheduled_visits(self) -> dict[str, _Visit]:
        """VISITNUM of each unscheduled assessment (by assessment id): the last planned visit done
        before it, + 0.01 for the first unscheduled one after that visit, + 0.02 for the next."""
        done: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
        for _, dose in self.doses:
            done[dose.patient_id].append((_utc(dose.given_at), dose.week))
        unscheduled = []
        for a in self.assessments:
            if a.recorded.week is None or a.recorded.unscheduled:
                unscheduled.append(a)
            else:
                done[a.recorded.patient_id].append((_utc(a.recorded.assessed_at), a.recorded.week))
        unscheduled.sort(key=lambda a: (_utc(a.recorded.assessed_at), a.fact.position))
        counts: dict[tuple[str, int], int] = defaultdict(int)
        visits = {}
        for a in unscheduled:
            at = _utc(a.recorded.assessed_at)
            base = max((week for when, week in done[a.recorded.patient_id] if when <= at), default=0)
            counts[(a.recorded.patient_id, base)] += 1
            visits[a.recorded.assessment_id] = _Visit(
                round(base + counts[(a.recorded.patient_id, base)] / 100, 2), "UNSCHEDULED", None)
        return visits

    def visit_of(self, assessment: _Assessment) -> _Visit:
        found = self.visits.get(assessment.recorded.assessment_id)
        week = assessment.recorded.week
        if found is None:
            assert week is not None  # a scheduled assessment has its week
            return _planned_visit(week)
        return found


def _planned_visit(week: int) -> _Visit:
    return _Visit(float(week), f"WEEK {week}", float(7 * week + 1))


# ------------------------------------------------------------------------------ the domains

_SortKey = tuple[datetime, int, int]
_Keyed = tuple[str, _SortKey, Row]  # patient id, order within the subject, the record


def _dm(trial: _Trial) -> list[_Keyed]:
    ends: dict[str, datetime | None] = {}
    last_contact: dict[str, datetime] = {}
    contacts = [(dose.patient_id, dose.given_at) for _, dose in trial.doses] + [
        (a.recorded.patient_id, a.recorded.assessed_at) for a in trial.assessments]
    for patient, when in contacts:
        last_contact[patient] = max(last_contact.get(patient, _utc(when)), _utc(when))
    deaths: dict[str, DeathRecorded] = {}
    for fact in trial.history.facts:
        match fact.data:
            case PatientWithdrawn(patient_id=p, withdrawn_at=at) | StudyCompleted(
                    patient_id=p, completed_at=at):
                ends.setdefault(p, at)
            case LostToFollowUp(patient_id=p, at=at):
                ends.setdefault(p, last_contact.get(p, at))
            case DeathRecorded(patient_id=p) as died:
                deaths.setdefault(p, died)
                ends.setdefault(p, trial.death_at(died))
    rows: list[_Keyed] = []
    for patient in sorted(set(trial.enrolled) | set(trial.assigned)):
        enrolled = trial.enrolled.get(patient)
        assigned = trial.assigned.get(patient)
        screening = trial.screenings.get(enrolled[1].screening_id) if enrolled else None
        exposure = trial.exposure.get(patient)
        first, last = (_dtc(exposure[0]), _dtc(exposure[1])) if exposure else (None, None)
        arm = _ARMS[assigned[1].arm] if assigned else (None, None)
        actual = _ARMS[trial.actual_arm[patient]] if assigned and exposure else (None, None)
        not_arm = None if assigned and exposure else (
            "ASSIGNED, NOT TREATED" if assigned else "NOT ASSIGNED")
        death = deaths.get(patient)
        site = (enrolled[1].site_id if enrolled else None) or (assigned[1].site_id if assigned else None)
        rows.append((patient, (_LAST, 0, 0), {
            "USUBJID": trial.usubjid(patient), "SUBJID": patient,
            "RFSTDTC": first, "RFENDTC": last, "RFXSTDTC": first, "RFXENDTC": last,
            "RFICDTC": _dtc(screening.consent_signed_at) if screening else None,
            "RFPENDTC": _dtc(ends.get(patient)),
            "DTHDTC": _dtc(trial.death_at(death)) if death else None,
            "DTHFL": "Y" if death else None,
            "SITEID": site,
            "AGE": float(screening.age_years) if screening else None,
            "AGEU": "YEARS" if screening else None,
            # CDISC SEX codelist: F, M, U (undifferentiated "other" and unknown alike).
            "SEX": _SEX.get(screening.sex or "", "U") if screening else None,
            "RACE": None,
            "ARMCD": arm[0], "ARM": arm[1], "ACTARMCD": actual[0], "ACTARM": actual[1],
            "ARMNRS": not_arm, "ACTARMUD": None, "COUNTRY": COUNTRY,
        }))
    return rows


_SEX = {"female": "F", "male": "M"}


def _ex(trial: _Trial) -> list[_Keyed]:
    rows: list[_Keyed] = []
    for index, (fact, dose) in enumerate(trial.doses):
        reference = trial.reference(dose.patient_id)
        visit = _planned_visit(dose.week)
        given = _dtc(dose.given_at)
        treatment: Row
        if isinstance(dose, InfusionGiven):
            spid, treatment = dose.infusion_id, {
                "EXTRT": "UC-MSC", "EXDOSE": dose.cells_administered / dose.weight_kg,
                "EXDOSU": "cells/kg", "EXDOSFRM": "INJECTION, SUSPENSION",
                "EXROUTE": "INTRAVENOUS", "EXLOT": dose.lot_number, "EXENDTC": None,
                "EXENDY": None}
        else:
            spid, treatment = dose.dose_id, {
                "EXTRT": "METHOTREXATE", "EXDOSE": dose.dose_mg, "EXDOSU": "mg",
                "EXDOSFRM": "TABLET", "EXROUTE": "ORAL", "EXLOT": None, "EXENDTC": given,
                "EXENDY": _study_day(reference, dose.given_at)}
        rows.append((dose.patient_id, (_utc(dose.given_at), fact.position, index), {
            "USUBJID": trial.usubjid(dose.patient_id), "EXSPID": spid, **treatment,
            "EXADJ": dose.deviation_reason, "VISITNUM": visit.number, "VISIT": visit.name,
            "EXSTDTC": given, "EXSTDY": _study_day(reference, dose.given_at)}))
    return rows


def _ae(trial: _Trial) -> list[_Keyed]:
    rows: list[_Keyed] = []
    for ae in trial.adverse_events:
        reported = ae.reported
        coded = ctcae.code(reported.term)
        reference = trial.reference(reported.patient_id)
        rows.append((reported.patient_id, (_utc(reported.onset_at), ae.fact.position, 0), {
            "USUBJID": trial.usubjid(reported.patient_id), "AESPID": reported.adverse_event_id,
            "AETERM": reported.term.strip(),
            "AELLT": coded[0] if coded else None, "AEDECOD": coded[0] if coded else None,
            "AEBODSYS": coded[1] if coded else ctcae.UNCODED,
            "AESOC": coded[1] if coded else None,
            "AESER": "Y" if ae.serious else "N", "AEACN": None,
            "AEREL": _RELATEDNESS[ae.relatedness],
            "AEOUT": _OUTCOMES[ae.outcome] if ae.outcome else None,
            "AESDTH": "Y" if ae.outcome == "fatal" else ("N" if ae.outcome not in (None, "unknown")
                                                         else None),
            "AETOXGR": str(ae.grade),
            "AESTDTC": _dtc(reported.onset_at), "AEENDTC": _dtc(ae.resolved_at),
            "AESTDY": _study_day(reference, reported.onset_at),
            "AEENDY": _study_day(reference, ae.resolved_at)}))
    return rows


def _ds(trial: _Trial) -> list[_Keyed]:
    rows: list[_Keyed] = []

    def add(fact: Fact, patient: str, term: str, decod: str, cat: str, scat: str | None,
            at: datetime | None, collected: datetime | None = None) -> None:
        collected = at if collected is None else collected
        rows.append((patient, (_utc(at or collected or fact.time), fact.position, len(rows)), {
            "USUBJID": trial.usubjid(patient), "DSSPID": fact.event_id, "DSTERM": term,
            "DSDECOD": decod, "DSCAT": cat, "DSSCAT": scat, "DSDTC": _dtc(collected),
            "DSSTDTC": _dtc(at), "DSSTDY": _study_day(trial.reference(patient), at)}))

    milestone, event = "PROTOCOL MILESTONE", "DISPOSITION EVENT"
    participation, treatment = "STUDY PARTICIPATION", "STUDY TREATMENT"
    for fact in trial.history.facts:
        match fact.data:
            case PatientEnrolled(patient_id=p, screening_id=s):
                if trial.enrolled[p][0] is fact:
                    screening = trial.screenings.get(s)
                    add(fact, p, "INFORMED CONSENT OBTAINED", "INFORMED CONSENT OBTAINED", milestone,
                        None, screening.consent_signed_at if screening else None)
            case ArmAssigned(patient_id=p, assigned_at=at):
                if trial.assigned[p][0] is fact:
                    add(fact, p, "RANDOMIZED", "RANDOMIZED", milestone, None, at)
            case PatientWithdrawn(patient_id=p, reason=reason, withdrawn_at=at):
                add(fact, p, reason.strip(), "WITHDRAWAL BY SUBJECT", event, participation, at)
            case TreatmentDiscontinued(patient_id=p, reason=reason, discontinued_at=at):
                add(fact, p, reason.strip(), decoded_discontinuation(reason), event, treatment, at)
            case LostToFollowUp(patient_id=p, reason=reason, at=at):
                add(fact, p, reason.strip(), "LOST TO FOLLOW-UP", event, participation, at)
            case DeathRecorded(patient_id=p, reported_at=reported) as death:
                add(fact, p, trial.fatal_term(death) or "DEATH", "DEATH", event, participation,
                    trial.death_at(death), reported)
            case StudyCompleted(patient_id=p, completed_at=at):
                add(fact, p, "COMPLETED", "COMPLETED", event, participation, at)
    return rows


DISPOSITION_EVENTS = (PatientWithdrawn, TreatmentDiscontinued, LostToFollowUp, DeathRecorded,
                      StudyCompleted)  # one DS record with DSCAT "DISPOSITION EVENT" each


@dataclass(frozen=True)
class _Finding:
    testcd: str
    test: str
    cat: str
    result: str | None  # QSORRES
    standard: str | None = None  # QSSTRESC, when not the same text as QSORRES
    number: float | None = None  # QSSTRESN
    unit: str | None = None
    derived: bool = False
    not_done: str | None = None  # QSREASND, when QSSTAT is NOT DONE ("" for no reason given)


def _number_text(value: float) -> str:
    """A number as text: a whole number without ".0", else its shortest exact decimal."""
    if math.isfinite(value) and value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


def _dlqi_answers(items: tuple[Any, ...]) -> list[tuple[str | None, int | None]]:
    """Each DLQI answer as recorded (QSORRES) and its score, as the efficacy scoring reads them
    (None, None: unanswered)."""
    try:
        parsed = scoring.DlqiItems.model_validate({"items": list(items)}).items
    except ValueError:  # not as efficacy records them: the scores it sent, nothing else
        return [(None if item is None else str(item), item if isinstance(item, int) else None)
                for item in items]
    answers: list[tuple[str | None, int | None]] = []
    for item in parsed:
        score = scoring.item_score(item)
        if isinstance(item, scoring.Question7):
            text = item.prevented_work_or_study.replace("_", " ").upper()
            if item.problem_at_work_or_study is not None:
                text += ", " + item.problem_at_work_or_study.replace("_", " ").upper()
            answers.append((text, score))
        elif isinstance(item, scoring.DlqiResponse):
            answers.append((item.value.replace("_", " ").upper(), score))
        else:
            answers.append((None if item is None else str(item), score))
    return answers


def _findings(measured: _Measured) -> list[_Finding]:
    found: list[_Finding] = []
    if measured.pasi_regions is not None:
        for region, region_code, region_name in _REGIONS:
            scores = measured.pasi_regions.get(region)
            for sign, sign_code, sign_name in _SIGNS:
                value = None if scores is None else getattr(scores, sign)
                found.append(_Finding(f"PASI{region_code}{sign_code}", f"PASI-{region_name} {sign_name}",
                                      "PASI", None if value is None else str(value),
                                      number=None if value is None else float(value),
                                      not_done=None if value is not None else ""))
    found.append(_Finding("PASITOT", "PASI-Total Score", "PASI", _number_text(measured.pasi_total),
                          number=measured.pasi_total, derived=measured.pasi_regions is not None))
    if measured.bsa_percent is not None:
        found.append(_Finding("BSA", "Body Surface Area Involved", "BSA",
                              _number_text(measured.bsa_percent), number=measured.bsa_percent,
                              unit="%"))
    if measured.spga is not None:
        found.append(_Finding("SPGA", "Static Physician Global Assessment", "SPGA",
                              str(measured.spga), number=float(measured.spga)))
    if measured.dlqi_items is not None:
        answers = _dlqi_answers(measured.dlqi_items)
        for question, (label, (answer, score)) in enumerate(zip(_DLQI_QUESTIONS, answers,
                                                               strict=False), start=1):
            found.append(_Finding(f"DLQI{question:02d}", f"DLQI{question:02d}-{label}", "DLQI",
                                  answer, None if score is None else str(score),
                                  None if score is None else float(score),
                                  not_done="" if answer is None else None))
    if measured.dlqi_items is not None or measured.dlqi_total is not None:
        total = measured.dlqi_total
        found.append(_Finding("DLQITOT", "DLQI-Total Score", "DLQI",
                              None if total is None else str(total),
                              number=None if total is None else float(total),
                              derived=measured.dlqi_items is not None,
                              not_done=_NOT_SCORED if total is None else None))
    return found


def _qs(trial: _Trial) -> list[_Keyed]:
    rows: list[_Keyed] = []
    for a in trial.assessments:
        recorded = a.recorded
        patient, at = recorded.patient_id, recorded.assessed_at
        visit = trial.visit_of(a)
        baseline = recorded.week == 0 and not recorded.unscheduled
        for index, finding in enumerate(_findings(a.measured)):
            done = finding.not_done is None
            rows.append((patient, (_utc(at), a.fact.position, index), {
                "USUBJID": trial.usubjid(patient), "QSGRPID": recorded.assessment_id,
                "QSTESTCD": finding.testcd, "QSTEST": finding.test, "QSCAT": finding.cat,
                "QSORRES": finding.result, "QSORRESU": finding.unit if done else None,
                "QSSTRESC": finding.standard or finding.result, "QSSTRESN": finding.number,
                "QSSTRESU": finding.unit if done else None,
                "QSSTAT": None if done else "NOT DONE", "QSREASND": finding.not_done or None,
                "QSLOBXFL": None, "QSBLFL": "Y" if baseline and done else None,
                "QSDRVFL": "Y" if finding.derived and done else None,
                "VISITNUM": visit.number, "VISIT": visit.name, "QSDTC": _dtc(at),
                "QSDY": _study_day(trial.reference(patient), at)}))
    # QSLOBXFL: each subject's and test's last result before the first dose.
    last: dict[tuple[str, Any], _Keyed] = {}
    for keyed in rows:
        patient, key, row = keyed
        exposure = trial.exposure.get(patient)
        if exposure and row["QSSTAT"] is None and key[0] < _utc(exposure[0]):
            previous = last.get((patient, row["QSTESTCD"]))
            if previous is None or previous[1] < key:
                last[(patient, row["QSTESTCD"])] = keyed
    for _, _, row in last.values():
        row["QSLOBXFL"] = "Y"
    return rows


def _sv(trial: _Trial) -> list[_Keyed]:
    done: dict[tuple[str, int], list[tuple[datetime, int]]] = defaultdict(list)
    for fact, dose in trial.doses:
        done[(dose.patient_id, dose.week)].append((_utc(dose.given_at), fact.position))
    unscheduled = []
    for a in trial.assessments:
        if a.recorded.assessment_id in trial.visits:
            unscheduled.append(a)
        elif a.recorded.week is not None:
            done[(a.recorded.patient_id, a.recorded.week)].append(
                (_utc(a.recorded.assessed_at), a.fact.position))
    # A planned visit with nothing done: the first VisitMissed or VisitHeld of its week, and the
    # safety rule whose hold stopped its dose, if one did.
    not_done: dict[tuple[str, int], tuple[Fact, VisitMissed | VisitHeld]] = {}
    held: dict[tuple[str, int], str] = {}
    for fact, closed in trial.history.of(VisitMissed, VisitHeld):
        if not isinstance(closed, VisitMissed | VisitHeld) or (closed.patient_id, closed.week) in done:
            continue
        not_done.setdefault((closed.patient_id, closed.week), (fact, closed))
        if isinstance(closed, VisitHeld):
            held.setdefault((closed.patient_id, closed.week), closed.rule_id)
    rows: list[_Keyed] = []
    for (patient, week), times in done.items():
        times.sort()
        visit, reference = _planned_visit(week), trial.reference(patient)
        rows.append((patient, (times[0][0], times[0][1], 0), {
            "USUBJID": trial.usubjid(patient), "VISITNUM": visit.number, "VISIT": visit.name,
            "SVPRESP": "Y", "SVOCCUR": "Y", "VISITDY": visit.planned_day,
            "SVSTDTC": _dtc(times[0][0]), "SVENDTC": _dtc(times[-1][0]),
            "SVSTDY": _study_day(reference, times[0][0]),
            "SVENDY": _study_day(reference, times[-1][0])}))
    for (patient, week), (fact, closed) in not_done.items():
        visit = _planned_visit(week)
        rule = held.get((patient, week))
        due = datetime.combine(closed.due_date, datetime.min.time(), UTC)
        rows.append((patient, (due, fact.position, 0), {
            "USUBJID": trial.usubjid(patient), "VISITNUM": visit.number, "VISIT": visit.name,
            "SVPRESP": "Y", "SVOCCUR": "N",
            "SVREASOC": None if rule is None else f"DOSE HELD BY SAFETY RULE {rule}",
            "VISITDY": visit.planned_day}))
    for a in unscheduled:
        visit, at = trial.visit_of(a), a.recorded.assessed_at
        day = _study_day(trial.reference(a.recorded.patient_id), at)
        rows.append((a.recorded.patient_id, (_utc(at), a.fact.position, 0), {
            "USUBJID": trial.usubjid(a.recorded.patient_id), "VISITNUM": visit.number,
            "VISIT": visit.name, "SVSTDTC": _dtc(at), "SVENDTC": _dtc(at), "SVSTDY": day,
            "SVENDY": day, "SVUPDES": "UNSCHEDULED ASSESSMENT"}))
    return rows


_BUILDERS: Mapping[str, Callable[[_Trial], list[_Keyed]]] = {
    "DM": _dm, "EX": _ex, "AE": _ae, "DS": _ds, "QS": _qs, "SV": _sv}


def _cut(text: str, length: int) -> str:
    """At most `length` bytes of UTF-8, never half a character."""
    return text.encode()[:length].decode(errors="ignore")


def dataset(history: History, domain: str, study_id: str) -> Dataset:
    """One domain's SDTM records of the history."""
    domain = domain.upper()
    spec = _SPECS.get(domain)
    if spec is None:
        raise ValueError(f"unknown SDTM domain {domain!r}: one of {', '.join(DOMAINS)}")
    keyed = sorted(_BUILDERS[domain](_Trial(history, study_id)), key=lambda k: (k[0], k[1]))
    seq = spec.variables[3].name if spec.variables[3].name.endswith("SEQ") else None
    numbers: dict[str, int] = defaultdict(int)
    rows: list[Row] = []
    for patient, _, found in keyed:
        row: Row = {}
        for v in spec.variables:
            value = {"STUDYID": study_id, "DOMAIN": domain}.get(v.name, found.get(v.name))
            if v.name == seq:
                numbers[patient] += 1
                value = float(numbers[patient])
            if v.type == "Num":
                row[v.name] = None if value is None else float(value)
            else:
                text = None if value is None else str(value).strip()
                # trailing blanks cut too: SAS transport keeps none
                row[v.name] = _cut(text, v.length).rstrip() if text else None
        rows.append(row)
    variables = tuple(
        v if v.type == "Num" else replace(v, length=max(
            [1, *(len(str(r[v.name]).encode()) for r in rows if r[v.name] is not None)]))
        for v in spec.variables)
    return Dataset(domain, spec.label, variables, rows)


# ------------------------------------------------------------------------------ CSV and XPT

def to_csv(data: Dataset) -> str:
    """RFC 4180: a header row of the variable names, CRLF line ends, fields quoted when needed;
    a null is an empty field, a number its shortest exact decimal."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(data.names)
    for row in data.rows:
        writer.writerow([_csv_field(row[name]) for name in data.names])
    return out.getvalue()


def _csv_field(value: Value) -> str:
    if value is None:
        return ""
    return _number_text(value) if isinstance(value, float) else value


def to_xpt(data: Dataset, path: str | Path) -> None:
    """SAS transport version 5 (SAS TS-140, as the FDA takes it), written by pyreadstat (over a
    polars frame, its lightest input): the table named after the domain and labelled, every
    variable labelled."""
    import polars as pl
    import pyreadstat

    if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,7}", data.domain):
        raise ValueError(f"{data.domain!r} is not a SAS transport version 5 table name")
    for v in data.variables:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,7}", v.name) or len(v.label.encode()) > 40:
            raise ValueError(f"{v.name!r} ({v.label!r}): names 8 characters at most, labels 40")
    frame = pl.DataFrame(
        {v.name: [row[v.name] for row in data.rows] for v in data.variables},
        schema={v.name: pl.Float64 if v.type == "Num" else pl.String for v in data.variables})
    pyreadstat.write_xport(frame, str(path), file_label=data.label[:40],
                           column_labels=[v.label for v in data.variables],
                           table_name=data.domain, file_format_version=5)


def read_xpt(path: str | Path) -> Dataset:
    """A SAS transport file read back with pyreadstat (the reverse of `to_xpt`): blanks and SAS
    missing values are None, lengths the stored ones."""
    import pyreadstat

    columns, meta = pyreadstat.read_xport(str(path), output_format="dict", encoding="utf-8")
    labels = dict(zip(meta.column_names, meta.column_labels, strict=True))
    variables = tuple(
        Variable(name, labels[name] or "", "Num" if kind == "double" else "Char",
                 int(meta.variable_storage_width[name]))
        for name, kind in meta.readstat_variable_types.items())
    rows: list[Row] = []
    for index in range(meta.number_rows or 0):
        row: Row = {}
        for v in variables:
            raw = columns[v.name][index]
            if v.type == "Num":
                row[v.name] = None if raw is None or math.isnan(float(raw)) else float(raw)
            else:
                row[v.name] = str(raw) if raw not in (None, "") else None
        rows.append(row)
    return Dataset(meta.table_name or "", meta.file_label or "", variables, rows)


def datasets(history: History, study_id: str) -> Iterable[Dataset]:
    """Every domain's dataset, in `DOMAINS` order."""
    return [dataset(history, domain, study_id) for domain in DOMAINS]
