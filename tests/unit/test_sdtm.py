"""Given a scripted trial history (five patients across the three arms: a completion, a crossover
and a withdrawal, a treatment discontinuation then a loss to follow-up, a death, a patient never
randomized; corrections, follow-ups, missed and held visits, unscheduled assessments), the SDTM
datasets (services/audit/sdtm.py) have SDTMIG 3.4's required variables, reconcile with the facts,
and come out the same as CSV and as SAS transport v5 read back by pyreadstat."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyreadstat
import pytest

from services.audit import ctcae, sdtm
from services.audit.history import Fact, History
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmAssigned,
    ArmCrossedOver,
    AssessmentCorrected,
    AssessmentRecorded,
    DeathRecorded,
    EventData,
    InfusionGiven,
    LostToFollowUp,
    MethotrexateDoseGiven,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    StudyCompleted,
    TreatmentDiscontinued,
    VisitHeld,
    VisitMissed,
)

STUDY = "NCT03424629"
DAY_0 = date(2026, 11, 26)  # every patient's first dose (week 0) is on this day
LONG_REASON = "Relocated to another province for work; " * 8  # 320 characters
# A withdrawal reason a CSV must quote: a comma, quotes and a line break.
AWKWARD_REASON = 'Moved away, "no time left"\nnew job'

# SDTMIG 3.4: the variables whose Core is Req, per domain.
REQUIRED = {
    "DM": ("STUDYID", "DOMAIN", "USUBJID", "SUBJID", "SITEID", "SEX", "COUNTRY"),
    "EX": ("STUDYID", "DOMAIN", "USUBJID", "EXSEQ", "EXTRT"),
    "AE": ("STUDYID", "DOMAIN", "USUBJID", "AESEQ", "AETERM", "AEDECOD"),
    "DS": ("STUDYID", "DOMAIN", "USUBJID", "DSSEQ", "DSTERM", "DSDECOD"),
    "QS": ("STUDYID", "DOMAIN", "USUBJID", "QSSEQ", "QSTESTCD", "QSTEST", "QSCAT"),
    "SV": ("STUDYID", "DOMAIN", "USUBJID", "VISITNUM"),
}
# SDTMIG 3.4: some variables whose Core is Exp, which must be there even when null.
EXPECTED = {
    "DM": ("RFSTDTC", "RFENDTC", "RFXSTDTC", "RFXENDTC", "RFICDTC", "RFPENDTC", "DTHDTC", "DTHFL",
           "AGE", "AGEU", "RACE", "ARMCD", "ARM", "ACTARMCD", "ACTARM", "ARMNRS", "ACTARMUD"),
    "EX": ("EXDOSE", "EXDOSU", "EXDOSFRM", "EXSTDTC", "EXENDTC"),
    "AE": ("AEBODSYS", "AESER", "AEACN", "AEREL", "AESTDTC", "AEENDTC"),
    "DS": ("DSCAT", "DSSTDTC", "DSSTDY"),
    "QS": ("QSORRES", "QSSTRESC", "QSLOBXFL", "VISITNUM", "QSDTC"),
    "SV": ("SVPRESP", "SVOCCUR", "SVSTDTC", "SVENDTC"),
}
# SDTMIG 3.4 labels of every variable the datasets have (VISITNUM and VISIT: the SDTM model's).
LABELS = {
    "STUDYID": "Study Identifier", "DOMAIN": "Domain Abbreviation",
    "USUBJID": "Unique Subject Identifier", "SUBJID": "Subject Identifier for the Study",
    "RFSTDTC": "Subject Reference Start Date/Time", "RFENDTC": "Subject Reference End Date/Time",
    "RFXSTDTC": "Date/Time of First Study Treatment", "RFXENDTC": "Date/Time of Last Study Treatment",
    "RFICDTC": "Date/Time of Informed Consent", "RFPENDTC": "Date/Time of End of Participation",
    "DTHDTC": "Date/Time of Death", "DTHFL": "Subject Death Flag", "SITEID": "Study Site Identifier",
    "AGE": "Age", "AGEU": "Age Units", "SEX": "Sex", "RACE": "Race", "ARMCD": "Planned Arm Code",
    "ARM": "Description of Planned Arm", "ACTARMCD": "Actual Arm Code",
    "ACTARM": "Description of Actual Arm", "ARMNRS": "Reason Arm and/or Actual Arm is Null",
    "ACTARMUD": "Description of Unplanned Actual Arm", "COUNTRY": "Country",
    "EXSEQ": "Sequence Number", "EXSPID": "Sponsor-Defined Identifier", "EXTRT": "Name of Treatment",
    "EXDOSE": "Dose", "EXDOSU": "Dose Units", "EXDOSFRM": "Dose Form",
    "EXROUTE": "Route of Administration", "EXLOT": "Lot Number", "EXADJ": "Reason for Dose Adjustment",
    "VISITNUM": "Visit Number", "VISIT": "Visit Name", "EXSTDTC": "Start Date/Time of Treatment",
    "EXENDTC": "End Date/Time of Treatment", "EXSTDY": "Study Day of Start of Treatment",
    "EXENDY": "Study Day of End of Treatment", "AESEQ": "Sequence Number",
    "AESPID": "Sponsor-Defined Identifier", "AETERM": "Reported Term for the Adverse Event",
    "AELLT": "Lowest Level Term", "AELLTCD": "Lowest Level Term Code",
    "AEDECOD": "Dictionary-Derived Term", "AEPTCD": "Preferred Term Code", "AEHLT": "High Level Term",
    "AEHLTCD": "High Level Term Code", "AEHLGT": "High Level Group Term",
    "AEHLGTCD": "High Level Group Term Code", "AEBODSYS": "Body System or Organ Class",
    "AEBDSYCD": "Body System or Organ Class Code", "AESOC": "Primary System Organ Class",
    "AESOCCD": "Primary System Organ Class Code", "AESER": "Serious Event",
    "AEACN": "Action Taken with Study Treatment", "AEREL": "Causality",
    "AEOUT": "Outcome of Adverse Event", "AESDTH": "Results in Death",
    "AETOXGR": "Standard Toxicity Grade", "AESTDTC": "Start Date/Time of Adverse Event",
    "AEENDTC": "End Date/Time of Adverse Event", "AESTDY": "Study Day of Start of Adverse Event",
    "AEENDY": "Study Day of End of Adverse Event", "DSSEQ": "Sequence Number",
    "DSSPID": "Sponsor-Defined Identifier", "DSTERM": "Reported Term for the Disposition Event",
    "DSDECOD": "Standardized Disposition Term", "DSCAT": "Category for Disposition Event",
    "DSSCAT": "Subcategory for Disposition Event", "DSDTC": "Date/Time of Collection",
    "DSSTDTC": "Start Date/Time of Disposition Event",
    "DSSTDY": "Study Day of Start of Disposition Event", "QSSEQ": "Sequence Number",
    "QSGRPID": "Group ID", "QSTESTCD": "Question Short Name", "QSTEST": "Question Name",
    "QSCAT": "Category of Question", "QSORRES": "Finding in Original Units",
    "QSORRESU": "Original Units", "QSSTRESC": "Character Result/Finding in Std Format",
    "QSSTRESN": "Numeric Finding in Standard Units", "QSSTRESU": "Standard Units",
    "QSSTAT": "Completion Status", "QSREASND": "Reason Not Performed",
    "QSLOBXFL": "Last Observation Before Exposure Flag", "QSBLFL": "Baseline Flag",
    "QSDRVFL": "Derived Flag", "QSDTC": "Date/Time of Finding", "QSDY": "Study Day of Finding",
    "SVPRESP": "Pre-specified", "SVOCCUR": "Occurrence", "SVREASOC": "Reason for Occur Value",
    "VISITDY": "Planned Study Day of Visit", "SVSTDTC": "Start Date/Time of Observation",
    "SVENDTC": "End Date/Time of Observation", "SVSTDY": "Study Day of Start of Observation",
    "SVENDY": "Study Day of End of Observation", "SVUPDES": "Description of Unplanned Visit",
}
MEDDRA_SOCS = {
    "Blood and lymphatic system disorders", "Cardiac disorders",
    "Congenital, familial and genetic disorders", "Ear and labyrinth disorders",
    "Endocrine disorders", "Eye disorders", "Gastrointestinal disorders",
    "General disorders and administration site conditions", "Hepatobiliary disorders",
    "Immune system disorders", "Infections and infestations",
    "Injury, poisoning and procedural complications", "Investigations",
    "Metabolism and nutrition disorders", "Musculoskeletal and connective tissue disorders",
    "Neoplasms benign, malignant and unspecified (incl cysts and polyps)",
    "Nervous system disorders", "Pregnancy, puerperium and perinatal conditions",
    "Product issues", "Psychiatric disorders", "Renal and urinary disorders",
    "Reproductive system and breast disorders", "Respiratory, thoracic and mediastinal disorders",
    "Skin and subcutaneous tissue disorders", "Social circumstances",
    "Surgical and medical procedures", "Vascular disorders",
}


def at(day: int, hour: int = 2) -> datetime:
    """`day` days after day 0, at `hour` UTC (10:00 at the sites when `hour` is 2)."""
    return datetime(DAY_0.year, DAY_0.month, DAY_0.day, hour, tzinfo=UTC) + timedelta(days=day)


class Ledger:
    """Facts in ledger order, as the audit ledger would hand them to a report."""

    def __init__(self) -> None:
        self.facts: list[Fact] = []

    def add(self, *events: EventData) -> None:
        for data in events:
            position = len(self.facts) + 1
            self.facts.append(Fact(position=position, event_id=f"evt-{position}",
                                   time=at(-30) + timedelta(hours=position), source=data.topic,
                                   data=data))

    def history(self) -> History:
        return History.of_facts(self.facts)


SEXES = {"P1": "female", "P2": "male", "P3": "other"}  # P4, P5: recorded before the field


def enrol(ledger: Ledger, patient: str, site: str, age: int, arm: str | None) -> None:
    screening = f"scr-{patient}"
    ledger.add(
        PatientScreened(screening_id=screening, site_id=site, screening_number=f"{site}-{patient}",
                        eligible=True, age_years=age, weight_kg=70.0, pasi=20.0,
                        protocol_version="1.2.0", screened_at=at(-10),
                        consent_signed_at=at(-12, hour=3), sex=SEXES.get(patient)),
        PatientEnrolled(patient_id=patient, site_id=site, screening_id=screening,
                        baseline_weight_kg=70.0, baseline_pasi=20.0, enrolled_at=at(-9)))
    if arm is not None:
        ledger.add(ArmAssigned(patient_id=patient, site_id=site, arm=arm, randomization_number=1,
                               stratum=f"{site}:pasi_ge20", baseline_weight_kg=70.0,
                               assigned_at=at(-8)))


def infusion(patient: str, site: str, arm: str, week: int, when: datetime, cells: int = 210_000_000,
             weight: float = 70.0, deviation: str | None = None) -> InfusionGiven:
    return InfusionGiven(infusion_id=f"inf-{patient}-{week}", patient_id=patient, site_id=site,
                         arm=arm, week=week, cells_administered=cells,
                         cells_per_kg=3_000_000 if arm == "msc_high" else 1_000_000,
                         weight_kg=weight, lot_number=f"LOT-{patient}-{week}", given_at=when,
                         deviation_reason=deviation)


def mtx(patient: str, week: int, mg: float) -> MethotrexateDoseGiven:
    return MethotrexateDoseGiven(dose_id=f"mtx-{patient}-{week}", patient_id=patient, site_id="S2",
                                 week=week, dose_mg=mg, given_at=at(7 * week))


def assessed(assessment_id: str, patient: str, site: str, arm: str, week: int | None,
             when: datetime, **measured: Any) -> AssessmentRecorded:
    return AssessmentRecorded(assessment_id=assessment_id, patient_id=patient, site_id=site,
                              arm=arm, week=week, unscheduled=week is None, assessed_at=when,
                              assessed_on=when.date(), **measured)


def adverse_event(ae_id: str, patient: str, site: str, term: str, onset: datetime, grade: int,
                  serious: bool = False, relatedness: str = "possible") -> AdverseEventReported:
    return AdverseEventReported(adverse_event_id=ae_id, patient_id=patient, site_id=site, term=term,
                                onset_at=onset, ctcae_grade=grade, serious=serious,
                                relatedness=relatedness, expected=False, reported_at=onset)


# Patient P1's week-0 PASI from its regions: head 0.1 x 6 x 3 = 1.8, upper limbs 0.2 x 3 x 2 = 1.2,
# trunk 0.3 x 9 x 4 = 10.8, lower limbs 0.4 x 5 x 3 = 6.0: 19.8.
REGIONS = {
    "head": {"erythema": 2, "induration": 2, "desquamation": 2, "area": 3},
    "upper_limbs": {"erythema": 1, "induration": 1, "desquamation": 1, "area": 2},
    "trunk": {"erythema": 3, "induration": 3, "desquamation": 3, "area": 4},
    "lower_limbs": {"erythema": 2, "induration": 2, "desquamation": 1, "area": 3},
}
# Ten answers as efficacy records them: scores, answer names, question 7's two parts, one
# unanswered (question 8). Scores 3 2 1 0 0 2 1 - 1 2: the total is 12.
DLQI_ITEMS = (3, "a_lot", 1, 0, "not_relevant", 2,
              {"prevented_work_or_study": "no", "problem_at_work_or_study": "a_little"}, None, 1, 2)


def scripted() -> History:
    ledger = Ledger()
    # P1, high dose, site S1: three infusions, week 3 missed, two unscheduled assessments after
    # week 1, a week-4 PASI corrected twice, a fever whose grade a follow-up raises, completion.
    enrol(ledger, "P1", "S1", 45, "msc_high")
    ledger.add(
        adverse_event("ae-1", "P1", "S1", "  fever ", at(-1), 1),
        assessed("a-1-0", "P1", "S1", "msc_high", 0, at(0, hour=1), pasi_regions=REGIONS,
                 pasi_total=19.8, bsa_percent=22.5, dlqi_items=DLQI_ITEMS, dlqi_total=12, spga=3),
        infusion("P1", "S1", "msc_high", 0, at(0)),
        AdverseEventFollowedUp(follow_up_id="fu-1", adverse_event_id="ae-1", patient_id="P1",
                               site_id="S1", ctcae_grade=3, serious=True, reported_at=at(1)),
        infusion("P1", "S1", "msc_high", 1, at(7)),
        assessed("a-1-u1", "P1", "S1", "msc_high", None, at(9), pasi_total=15.0),
        AdverseEventFollowedUp(follow_up_id="fu-2", adverse_event_id="ae-1", patient_id="P1",
                               site_id="S1", outcome="recovered", resolved_at=at(10),
                               reported_at=at(10)),
        assessed("a-1-u2", "P1", "S1", "msc_high", None, at(11), pasi_total=14.0),
        infusion("P1", "S1", "msc_high", 2, at(14)),
        VisitMissed(patient_id="P1", site_id="S1", arm="msc_high", week=3, kind="infusion",
                    due_date=DAY_0 + timedelta(days=21), window_end=DAY_0 + timedelta(days=23),
                    detected_at=at(24)),
        assessed("a-1-4", "P1", "S1", "msc_high", 4, at(28), pasi_total=10.0, bsa_percent=8.0,
                 dlqi_total=5, spga=2),
        AssessmentCorrected(correction_id="c-1", assessment_id="a-1-4", patient_id="P1",
                            site_id="S1", week=4, changed=("pasi_total",), reason="transcription",
                            corrected_at=at(29), pasi_total=9.0, bsa_percent=8.0, dlqi_total=5,
                            spga=2),
        AssessmentCorrected(correction_id="c-2", assessment_id="a-1-4", patient_id="P1",
                            site_id="S1", week=4, changed=("pasi_total",), reason="source check",
                            corrected_at=at(30), pasi_total=8.5, bsa_percent=8.0, dlqi_total=5,
                            spga=2),
        assessed("a-1-52", "P1", "S1", "msc_high", 52, at(364), pasi_total=2.0),
        StudyCompleted(patient_id="P1", site_id="S1", assessment_id="a-1-52",
                       completed_at=at(364)))
    # P2, low dose then crossed over to high dose, site S1: an infusion reaction and a term
    # CTCAE does not know, a dose with a deviation, withdrawn.
    enrol(ledger, "P2", "S1", 33, "msc_low")
    ledger.add(
        assessed("a-2-0", "P2", "S1", "msc_low", 0, at(0, hour=1), pasi_total=15.0),
        infusion("P2", "S1", "msc_low", 0, at(0), cells=70_000_000),
        adverse_event("ae-2", "P2", "S1", "Infusion related reaction", at(0, hour=3), 2),
        ArmCrossedOver(patient_id="P2", site_id="S1", from_arm="msc_low", to_arm="msc_high",
                       reason="investigator decision", crossed_over_at=at(3)),
        infusion("P2", "S1", "msc_high", 1, at(8), cells=213_900_001, weight=71.3,
                 deviation="out of window: patient travelling"),
        adverse_event("ae-3", "P2", "S1", "Tingling in the toes", at(9), 1, relatedness="unlikely"),
        PatientWithdrawn(patient_id="P2", site_id="S1", reason=AWKWARD_REASON,
                         withdrawn_at=at(12)))
    # P3, methotrexate, site S2: ALT up, week 3 held by a safety rule, treatment discontinued,
    # assessed on (week 8 late), then lost to follow-up after two missed assessments.
    enrol(ledger, "P3", "S2", 52, "mtx")
    ledger.add(
        assessed("a-3-0", "P3", "S2", "mtx", 0, at(0, hour=1), pasi_total=30.0, bsa_percent=40.0),
        mtx("P3", 0, 7.5), mtx("P3", 1, 10.0), mtx("P3", 2, 12.5),
        adverse_event("ae-4", "P3", "S2", "ALT increased", at(18), 3, relatedness="probable"),
        VisitHeld(patient_id="P3", site_id="S2", arm="mtx", week=3, kind="methotrexate",
                  due_date=DAY_0 + timedelta(days=21), window_end=DAY_0 + timedelta(days=23),
                  detected_at=at(24), hold_id="hold-1", rule_id="R7"),
        TreatmentDiscontinued(patient_id="P3", site_id="S2",
                              reason="Grade 3 ALT elevation (adverse event)",
                              discontinued_at=at(25), decided_by="investigator-1"),
        assessed("a-3-4", "P3", "S2", "mtx", 4, at(28), pasi_total=25.0,
                 after_treatment_discontinued=True),
        # Week 8: marked missed when its window closed, then entered late: the visit occurred.
        VisitMissed(patient_id="P3", site_id="S2", arm="mtx", week=8, kind="assessment",
                    due_date=DAY_0 + timedelta(days=56), window_end=DAY_0 + timedelta(days=58),
                    detected_at=at(59)),
        assessed("a-3-8", "P3", "S2", "mtx", 8, at(60), pasi_total=24.0,
                 after_treatment_discontinued=True, late_entry=True),
        *(VisitMissed(patient_id="P3", site_id="S2", arm="mtx", week=week, kind="assessment",
                      due_date=DAY_0 + timedelta(days=7 * week),
                      window_end=DAY_0 + timedelta(days=7 * week + 2), detected_at=at(7 * week + 3))
          for week in (12, 16)),
        LostToFollowUp(patient_id="P3", site_id="S2", declared_by="efficacy-sweep",
                       reason=LONG_REASON, missed_weeks=(12, 16), at=at(115)))
    # P4, high dose, site S2: sepsis, grade 5 on follow-up, death.
    enrol(ledger, "P4", "S2", 58, "msc_high")
    ledger.add(
        assessed("a-4-0", "P4", "S2", "msc_high", 0, at(0, hour=1), pasi_total=18.0),
        infusion("P4", "S2", "msc_high", 0, at(0)),
        adverse_event("ae-5", "P4", "S2", "Sepsis", at(5), 4, serious=True),
        AdverseEventFollowedUp(follow_up_id="fu-3", adverse_event_id="ae-5", patient_id="P4",
                               site_id="S2", ctcae_grade=5, outcome="fatal", resolved_at=at(9),
                               reported_at=at(9, hour=5)),
        DeathRecorded(patient_id="P4", site_id="S2", adverse_event_id="ae-5",
                      reported_at=at(9, hour=5), source_event_id="evt-fu-3"))
    # P5: enrolled, never randomized.
    enrol(ledger, "P5", "S2", 40, None)
    return ledger.history()


HISTORY = scripted()


def build(domain: str) -> sdtm.Dataset:
    return sdtm.dataset(HISTORY, domain, STUDY)


def rows_of(domain: str, patient: str) -> list[sdtm.Row]:
    return [r for r in build(domain).rows if r["USUBJID"] == f"{STUDY}-{patient}"]


def count(*types: type[EventData]) -> int:
    return sum(1 for _ in HISTORY.of(*types))


def parsed_csv(data: sdtm.Dataset) -> tuple[list[str], list[sdtm.Row]]:
    """The CSV read back as a consumer would: numbers where the variable is numeric."""
    reader = csv.reader(io.StringIO(sdtm.to_csv(data), newline=""))
    header = next(reader)
    kinds = {v.name: v.type for v in data.variables}
    rows = [{name: None if text == "" else float(text) if kinds[name] == "Num" else text
             for name, text in zip(header, line, strict=True)} for line in reader]
    return header, rows


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_each_domain_has_sdtmig_required_and_expected_variables(domain: str) -> None:
    data = build(domain)
    names = data.names
    assert set(REQUIRED[domain]) <= set(names), set(REQUIRED[domain]) - set(names)
    assert set(EXPECTED[domain]) <= set(names), set(EXPECTED[domain]) - set(names)
    assert names[:3] == ("STUDYID", "DOMAIN", "USUBJID")
    cores = {v["name"]: v["core"] for v in sdtm.metadata()["domains"][domain]["variables"]}
    assert {n for n, core in cores.items() if core == "Req"} == set(REQUIRED[domain])
    assert data.rows, f"the scripted history has {domain} records"
    assert all(set(row) == set(names) for row in data.rows)


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_required_values_are_never_null_but_where_no_event_has_them(domain: str) -> None:
    # AEDECOD is null for a term CTCAE does not know (AEBODSYS "UNCODED").
    known_gaps = {("AE", "AEDECOD")}
    for row in build(domain).rows:
        for name in REQUIRED[domain]:
            if (domain, name) in known_gaps:
                continue
            assert row[name] is not None, (domain, name, row)
    if domain == "AE":
        assert [r["AEBODSYS"] for r in build("AE").rows if r["AEDECOD"] is None] == ["UNCODED"]


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_names_labels_and_lengths_fit_sas_transport_5(domain: str) -> None:
    declared = {v["name"]: v for v in sdtm.metadata()["domains"][domain]["variables"]}
    for v in build(domain).variables:
        assert re.fullmatch(r"[A-Z][A-Z0-9]{0,7}", v.name), v.name
        assert len(v.label) <= 40, v.label
        assert v.type in ("Char", "Num")
        assert 1 <= v.length <= (200 if v.type == "Char" else 8)
        assert v.length <= declared[v.name]["length"]
        assert v.label == declared[v.name]["label"] and v.type == declared[v.name]["type"]


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_labels_are_sdtmig_labels(domain: str) -> None:
    assert {v.name: v.label for v in build(domain).variables} == {
        name: LABELS[name] for name in build(domain).names}


def test_metadata_is_one_json_document_of_every_domain() -> None:
    import json

    document = json.loads(json.dumps(sdtm.metadata()))
    assert document["standard"] == "SDTMIG 3.4"
    assert tuple(document["domains"]) == sdtm.DOMAINS
    for domain, spec in document["domains"].items():
        assert spec["label"] and spec["keys"][:2] == ["STUDYID", "USUBJID"]
        assert [v["name"] for v in spec["variables"]] == list(build(domain).names)
        assert all(v["type"] in ("Char", "Num") and v["length"] >= 1 for v in spec["variables"])


def test_an_unknown_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown SDTM domain"):
        sdtm.dataset(HISTORY, "LB", STUDY)


# ---------------------------------------------------------------------------- reconciliation


def test_row_counts_reconcile_with_the_facts() -> None:
    assert len(build("AE").rows) == count(AdverseEventReported) == 5
    assert len(build("EX").rows) == count(InfusionGiven, MethotrexateDoseGiven) == 9
    ds = build("DS").rows
    assert (sum(r["DSCAT"] == "DISPOSITION EVENT" for r in ds)
            == count(*sdtm.DISPOSITION_EVENTS) == 5)
    assert sum(r["DSDECOD"] == "RANDOMIZED" for r in ds) == count(ArmAssigned) == 4
    assert sum(r["DSDECOD"] == "INFORMED CONSENT OBTAINED" for r in ds) == count(PatientEnrolled)
    qs = build("QS").rows
    assert sum(r["QSTESTCD"] == "PASITOT" for r in qs) == count(AssessmentRecorded) == 10
    assert len(build("DM").rows) == count(PatientEnrolled) == 5


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_the_natural_keys_name_one_record_each(domain: str) -> None:
    keys = sdtm.metadata()["domains"][domain]["keys"]
    found = Counter(tuple(row[k] for k in keys) for row in build(domain).rows)
    assert max(found.values()) == 1, [k for k, n in found.items() if n > 1]


def test_seq_numbers_each_subjects_records_from_one() -> None:
    for domain in ("EX", "AE", "DS", "QS"):
        rows = build(domain).rows
        by_subject: dict[Any, list[Any]] = {}
        for row in rows:
            by_subject.setdefault(row["USUBJID"], []).append(row[f"{domain}SEQ"])
        for numbers in by_subject.values():
            assert numbers == [float(n) for n in range(1, len(numbers) + 1)], (domain, numbers)


# ---------------------------------------------------------------------------- values, by hand


def test_demographics() -> None:
    p1, p2, p3, p4, p5 = (rows_of("DM", p)[0] for p in ("P1", "P2", "P3", "P4", "P5"))
    assert p1["USUBJID"] == "NCT03424629-P1" and p1["SUBJID"] == "P1" and p1["SITEID"] == "S1"
    assert (p1["RFSTDTC"], p1["RFENDTC"]) == ("2026-11-26T02:00:00", "2026-12-10T02:00:00")
    assert p1["RFXSTDTC"] == p1["RFSTDTC"] and p1["RFICDTC"] == "2026-11-14T03:00:00"
    assert (p1["AGE"], p1["AGEU"], p1["COUNTRY"], p1["SEX"]) == (45.0, "YEARS", "CHN", "F")
    # CDISC SEX: M, F, or U for "other" and for a screening recorded before sex was kept.
    assert [rows_of("DM", p)[0]["SEX"] for p in ("P2", "P3", "P4")] == ["M", "U", "U"]
    assert (p1["ARMCD"], p1["ARM"], p1["ACTARMCD"]) == ("MSCHIGH", "High-Dose UC-MSCs", "MSCHIGH")
    assert p1["RFPENDTC"] == "2027-11-25T02:00:00" and p1["DTHFL"] is None
    assert (p2["ARMCD"], p2["ARM"]) == ("MSCLOW", "Low-Dose UC-MSCs")
    assert (p2["ACTARMCD"], p2["ACTARM"]) == ("MSCHIGH", "High-Dose UC-MSCs")  # crossed over
    assert (p3["ARMCD"], p3["ARM"], p3["ACTARMCD"]) == ("MTX", "Methotrexate", "MTX")
    assert p3["RFPENDTC"] == "2027-01-25T02:00:00"  # lost to follow-up: the last contact
    assert (p4["DTHFL"], p4["DTHDTC"], p4["RFPENDTC"]) == ("Y", "2026-12-05T02:00:00",
                                                           "2026-12-05T02:00:00")
    assert (p5["ARMCD"], p5["ACTARMCD"], p5["ARMNRS"]) == (None, None, "NOT ASSIGNED")
    assert p5["RFSTDTC"] is None and p5["AGE"] == 40.0


def test_exposure() -> None:
    p1 = rows_of("EX", "P1")
    assert [r["VISIT"] for r in p1] == ["WEEK 0", "WEEK 1", "WEEK 2"]
    assert [r["VISITNUM"] for r in p1] == [0.0, 1.0, 2.0]
    first = p1[0]
    assert (first["EXTRT"], first["EXDOSE"], first["EXDOSU"]) == ("UC-MSC", 3_000_000.0, "cells/kg")
    assert (first["EXROUTE"], first["EXLOT"], first["EXSPID"]) == ("INTRAVENOUS", "LOT-P1-0", "inf-P1-0")
    assert (first["EXSTDTC"], first["EXSTDY"], first["EXENDTC"]) == ("2026-11-26T02:00:00", 1.0, None)
    assert p1[1]["EXSTDY"] == 8.0
    p2 = rows_of("EX", "P2")
    assert p2[0]["EXDOSE"] == 1_000_000.0
    assert p2[1]["EXDOSE"] == 213_900_001 / 71.3 and p2[1]["EXDOSE"] != int(p2[1]["EXDOSE"] or 0)
    assert p2[1]["EXADJ"] == "out of window: patient travelling"
    p3 = rows_of("EX", "P3")
    assert [(r["EXTRT"], r["EXDOSE"], r["EXDOSU"], r["EXROUTE"]) for r in p3] == [
        ("METHOTREXATE", mg, "mg", "ORAL") for mg in (7.5, 10.0, 12.5)]
    assert p3[0]["EXDOSFRM"] == "TABLET" and p3[0]["EXENDTC"] == p3[0]["EXSTDTC"]


def test_adverse_events_take_their_latest_follow_up() -> None:
    fever = rows_of("AE", "P1")[0]
    assert fever["AETERM"] == "fever"
    assert (fever["AEDECOD"], fever["AELLT"]) == ("Fever", "Fever")
    assert fever["AEBODSYS"] == "General disorders and administration site conditions"
    assert fever["AETOXGR"] == "3"  # reported 1, raised to 3; the next follow-up left it
    assert (fever["AESER"], fever["AEOUT"]) == ("Y", "RECOVERED/RESOLVED")
    assert (fever["AESTDTC"], fever["AEENDTC"]) == ("2026-11-25T02:00:00", "2026-12-06T02:00:00")
    assert (fever["AESTDY"], fever["AEENDY"]) == (-1.0, 11.0)  # the day before day 1 is -1
    assert fever["AEREL"] == "POSSIBLY RELATED"
    irr, tingling = rows_of("AE", "P2")
    assert irr["AEBODSYS"] == "Injury, poisoning and procedural complications"
    assert (tingling["AEDECOD"], tingling["AEBODSYS"], tingling["AEREL"]) == (
        None, "UNCODED", "UNLIKELY RELATED")
    alt = rows_of("AE", "P3")[0]
    assert (alt["AEDECOD"], alt["AEBODSYS"], alt["AEREL"]) == (
        "Alanine aminotransferase increased", "Investigations", "PROBABLY RELATED")
    sepsis = rows_of("AE", "P4")[0]
    assert (sepsis["AETOXGR"], sepsis["AEOUT"], sepsis["AESDTH"]) == ("5", "FATAL", "Y")


def test_disposition() -> None:
    def events(patient: str) -> list[tuple[Any, ...]]:
        return [(r["DSCAT"], r["DSSCAT"], r["DSDECOD"], r["DSTERM"]) for r in rows_of("DS", patient)]

    milestones = [("PROTOCOL MILESTONE", None, "INFORMED CONSENT OBTAINED", "INFORMED CONSENT OBTAINED"),
                  ("PROTOCOL MILESTONE", None, "RANDOMIZED", "RANDOMIZED")]
    assert events("P1") == [*milestones,
                            ("DISPOSITION EVENT", "STUDY PARTICIPATION", "COMPLETED", "COMPLETED")]
    assert events("P2") == [*milestones, ("DISPOSITION EVENT", "STUDY PARTICIPATION",
                                          "WITHDRAWAL BY SUBJECT", AWKWARD_REASON)]
    p3 = events("P3")
    assert p3[2] == ("DISPOSITION EVENT", "STUDY TREATMENT", "ADVERSE EVENT",
                     "Grade 3 ALT elevation (adverse event)")
    assert p3[3][:3] == ("DISPOSITION EVENT", "STUDY PARTICIPATION", "LOST TO FOLLOW-UP")
    assert 190 < len(p3[3][3].encode()) <= 200 and LONG_REASON.startswith(p3[3][3])  # cut at 200
    assert events("P4")[2] == ("DISPOSITION EVENT", "STUDY PARTICIPATION", "DEATH", "Sepsis")
    death = rows_of("DS", "P4")[2]
    assert (death["DSSTDTC"], death["DSDTC"], death["DSSTDY"]) == (
        "2026-12-05T02:00:00", "2026-12-05T05:00:00", 10.0)
    assert events("P5") == milestones[:1]
    consent = rows_of("DS", "P1")[0]
    assert (consent["DSSTDTC"], consent["DSSTDY"]) == ("2026-11-14T03:00:00", -12.0)


def test_discontinuation_reasons_are_decoded_conservatively() -> None:
    assert sdtm.decoded_discontinuation("lack of efficacy at week 12") == "LACK OF EFFICACY"
    assert sdtm.decoded_discontinuation("Patient's request") == "WITHDRAWAL BY SUBJECT"
    assert sdtm.decoded_discontinuation("pregnancy confirmed") == "PREGNANCY"
    assert sdtm.decoded_discontinuation("investigator judgement") == "PHYSICIAN DECISION"


def test_questionnaires() -> None:
    week0 = {str(r["QSTESTCD"]): r for r in rows_of("QS", "P1") if r["VISIT"] == "WEEK 0"}
    assert len([c for c in week0 if c.startswith("PASI") and c != "PASITOT"]) == 16
    assert week0["PASIHEER"]["QSSTRESN"] == 2.0 and week0["PASITRAR"]["QSORRES"] == "4"
    assert week0["PASILLDE"]["QSTEST"] == "PASI-Lower Limbs Desquamation"
    total = week0["PASITOT"]
    assert (total["QSORRES"], total["QSSTRESN"], total["QSDRVFL"]) == ("19.8", 19.8, "Y")
    assert (total["QSBLFL"], total["QSLOBXFL"], total["VISITNUM"], total["QSDY"]) == ("Y", "Y", 0.0, 1.0)
    assert (week0["BSA"]["QSSTRESN"], week0["BSA"]["QSORRESU"]) == (22.5, "%")
    assert week0["SPGA"]["QSSTRESN"] == 3.0
    assert [week0[f"DLQI{q:02d}"]["QSSTRESN"] for q in range(1, 11)] == [
        3.0, 2.0, 1.0, 0.0, 0.0, 2.0, 1.0, None, 1.0, 2.0]
    assert (week0["DLQI02"]["QSORRES"], week0["DLQI02"]["QSSTRESC"]) == ("A LOT", "2")
    assert week0["DLQI07"]["QSORRES"] == "NO, A LITTLE"
    assert (week0["DLQI08"]["QSSTAT"], week0["DLQI08"]["QSBLFL"]) == ("NOT DONE", None)
    assert (week0["DLQITOT"]["QSSTRESN"], week0["DLQITOT"]["QSDRVFL"]) == (12.0, "Y")
    week4 = {r["QSTESTCD"]: r for r in rows_of("QS", "P1") if r["VISIT"] == "WEEK 4"}
    assert week4["PASITOT"]["QSSTRESN"] == 8.5  # the second correction's
    assert (week4["PASITOT"]["QSDRVFL"], week4["PASITOT"]["QSBLFL"]) == (None, None)
    assert week4["DLQITOT"]["QSSTRESN"] == 5.0 and "DLQI01" not in week4
    unscheduled = [r for r in rows_of("QS", "P1") if r["VISIT"] == "UNSCHEDULED"]
    assert sorted({float(r["VISITNUM"] or 0) for r in unscheduled}) == [1.01, 1.02]


def test_subject_visits_one_record_per_visit() -> None:
    def visits(patient: str) -> list[tuple[Any, ...]]:
        return sorted((r["VISITNUM"], r["VISIT"], r["SVPRESP"], r["SVOCCUR"])
                      for r in rows_of("SV", patient))

    planned = [(float(w), f"WEEK {w}", "Y", "Y") for w in (0, 1, 2, 4, 52)]
    assert visits("P1") == sorted([*planned, (3.0, "WEEK 3", "Y", "N"),
                                   (1.01, "UNSCHEDULED", None, None),
                                   (1.02, "UNSCHEDULED", None, None)])
    assert visits("P3") == sorted([(float(w), f"WEEK {w}", "Y", "Y") for w in (0, 1, 2, 4, 8)]
                                  + [(float(w), f"WEEK {w}", "Y", "N") for w in (3, 12, 16)])
    for row in build("SV").rows:
        assert (row["SVSTDTC"] is None) == (row["SVOCCUR"] == "N")
    held = next(r for r in rows_of("SV", "P3") if r["VISITNUM"] == 3.0)
    assert held["SVREASOC"] == "DOSE HELD BY SAFETY RULE R7" and held["VISITDY"] == 22.0
    week0 = next(r for r in rows_of("SV", "P1") if r["VISITNUM"] == 0.0)
    # The week-0 assessment at 01:00 and the infusion at 02:00: one visit.
    assert (week0["SVSTDTC"], week0["SVENDTC"], week0["SVSTDY"]) == (
        "2026-11-26T01:00:00", "2026-11-26T02:00:00", 1.0)
    keys = Counter((r["USUBJID"], r["VISITNUM"]) for r in build("SV").rows)
    assert max(keys.values()) == 1
    qs_visits = {(r["USUBJID"], r["VISITNUM"]) for r in build("QS").rows}
    assert qs_visits <= set(keys)


# ---------------------------------------------------------------------------- CSV and XPT


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_csv_header_is_the_variable_names_and_rows_come_back(domain: str) -> None:
    data = build(domain)
    text = sdtm.to_csv(data)
    assert text.splitlines()[0] == ",".join(data.names)
    assert text.endswith("\r\n")
    header, rows = parsed_csv(data)
    assert header == list(data.names)
    assert rows == data.rows


def test_csv_quotes_what_rfc_4180_says_to() -> None:
    text = sdtm.to_csv(build("DS"))
    assert '"Moved away, ""no time left""\nnew job"' in text


@pytest.mark.parametrize("domain", sdtm.DOMAINS)
def test_xpt_reads_back_with_pyreadstat_as_the_csv(domain: str, tmp_path: Path) -> None:
    data = build(domain)
    path = tmp_path / f"{domain.lower()}.xpt"
    sdtm.to_xpt(data, path)
    columns, meta = pyreadstat.read_xport(str(path), output_format="dict", encoding="utf-8")
    assert meta.table_name == domain and meta.file_label == data.label
    assert meta.column_names == list(data.names)
    assert meta.column_labels == [v.label for v in data.variables]
    assert meta.number_rows == len(data.rows)
    for v in data.variables:
        assert meta.readstat_variable_types[v.name] == ("double" if v.type == "Num" else "string")
        assert meta.variable_storage_width[v.name] == v.length <= 200
    _, from_csv = parsed_csv(data)
    # pyreadstat's own columns: blanks and "." are what the CSV leaves empty.
    for name in data.names:
        read = [None if value in ("", None) or (isinstance(value, float) and value != value) else value
                for value in columns[name]]
        assert read == [row[name] for row in from_csv], name
    back = sdtm.read_xpt(path)
    assert back.rows == from_csv
    assert back.names == data.names and back.domain == domain


def test_xpt_refuses_what_version_5_cannot_hold(tmp_path: Path) -> None:
    data = build("DM")
    too_long = sdtm.Dataset(data.domain, data.label, (sdtm.Variable("LONGNAME9", "x", "Char", 1),), [])
    with pytest.raises(ValueError, match="8 characters"):
        sdtm.to_xpt(too_long, tmp_path / "x.xpt")


# ---------------------------------------------------------------------------- CTCAE


def test_ctcae_table() -> None:
    assert len(ctcae.TERMS) >= 60
    assert set(ctcae.TERMS.values()) <= MEDDRA_SOCS
    assert all(term in ctcae.TERMS for term in ctcae.SYNONYMS.values())
    for term in ("Infusion related reaction", "Fever", "Chills", "Headache", "Fatigue", "Nausea",
                 "Vomiting", "Diarrhea", "Alanine aminotransferase increased",
                 "Aspartate aminotransferase increased", "Blood bilirubin increased",
                 "Neutrophil count decreased", "White blood cell decreased",
                 "Platelet count decreased", "Anemia", "Upper respiratory infection", "Sepsis",
                 "Rash maculo-papular", "Pruritus", "Alopecia", "Mucositis oral", "Hypertension",
                 "Hypotension", "Anaphylaxis", "Allergic reaction", "Death NOS",
                 "Sudden death NOS", "Hepatic failure"):
        assert term in ctcae.TERMS, term
    assert ctcae.code("  alt   INCREASED ") == ("Alanine aminotransferase increased", "Investigations")
    assert ctcae.code("FEVER") == ("Fever", "General disorders and administration site conditions")
    assert ctcae.code("pneumonia") == ("Lung infection", "Infections and infestations")
    assert ctcae.code("Rash  Maculo-Papular") == ("Rash maculo-papular",
                                                  "Skin and subcutaneous tissue disorders")
    assert ctcae.code("tingling in the toes") is None
