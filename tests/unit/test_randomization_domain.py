"""The randomization domain: age and dates, eligibility criteria, the patient's life cycle, strata."""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.randomization.domain import (
    Patient,
    ScreeningFacts,
    age_on,
    decide_enrol,
    eligibility,
    evolve,
    fold,
    months_before,
    stratum_of,
)
from shared.events import ArmAssigned, EventData, PatientEnrolled, PatientScreened, PatientWithdrawn, Reason
from shared.protocol import default_protocol
from shared.web import Problem

TODAY = date(2026, 11, 26)
AT = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)

# The contract's example screening (api-contract.md), with consent given.
EXAMPLE = ScreeningFacts(
    site_id="S1", screening_number="S1-0001", birth_date=date(1980, 5, 1), sex="female", weight_kg=70.0,
    diagnosis_date=date(2020, 1, 15), psoriasis_type="plaque", pasi=14.2, bsa_percent=12.0, dlqi=11,
    conventional_therapy_failed=True, drug_induced=False, ongoing_psoriasis_treatment=False,
    prior_biologic_targets=(), active_infection=False, recurrent_infections=False,
    malignancy_history=False, hiv=False, hbv=False, hcv=False, pregnant_or_lactating=False,
    planning_pregnancy=False, can_attend_follow_up=True, consent_signed=True,
)


def criteria(**changes: Any) -> list[str]:
    return [r.criterion for r in eligibility(replace(EXAMPLE, **changes), TODAY)]


# --- dates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("birth", "day", "age"), [
    (date(2008, 11, 26), date(2026, 11, 25), 17),  # the day before the 18th birthday
    (date(2008, 11, 26), date(2026, 11, 26), 18),  # on it
    (date(2008, 11, 26), date(2026, 11, 27), 18),
    (date(2008, 12, 1), date(2026, 11, 30), 17),   # month decides before day
    (date(1966, 11, 26), date(2026, 11, 26), 60),
    (date(1965, 11, 27), date(2026, 11, 26), 60),  # 61 tomorrow
    (date(1965, 11, 26), date(2026, 11, 26), 61),
    (date(2008, 2, 29), date(2026, 2, 28), 17),    # a leap-day birthday counts from 1 March
    (date(2008, 2, 29), date(2026, 3, 1), 18),
    (date(2008, 2, 29), date(2028, 2, 29), 20),
])
def test_age_on(birth: date, day: date, age: int) -> None:
    assert age_on(birth, day) == age


@pytest.mark.parametrize(("day", "months", "expected"), [
    (date(2026, 11, 26), 6, date(2026, 5, 26)),
    (date(2026, 8, 31), 6, date(2026, 2, 28)),   # clamped to the end of February
    (date(2028, 8, 31), 6, date(2028, 2, 29)),   # a leap year
    (date(2026, 8, 30), 6, date(2026, 2, 28)),
    (date(2026, 12, 31), 6, date(2026, 6, 30)),  # a 30-day month
    (date(2026, 3, 15), 6, date(2025, 9, 15)),   # across the year end
    (date(2026, 6, 30), 6, date(2025, 12, 30)),
    (date(2026, 1, 31), 12, date(2025, 1, 31)),
    (date(2026, 3, 31), 25, date(2024, 2, 29)),
    (date(2026, 5, 17), 0, date(2026, 5, 17)),
])
def test_months_before(day: date, months: int, expected: date) -> None:
    assert months_before(day, months) == expected


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)), st.integers(0, 240))
def test_months_before_property(day: date, months: int) -> None:
    result = months_before(day, months)
    assert (day.year * 12 + day.month) - (result.year * 12 + result.month) == months
    assert result.day == min(day.day, calendar.monthrange(result.year, result.month)[1])


# --- eligibility ------------------------------------------------------------------------------


def test_contract_example_is_eligible() -> None:
    assert eligibility(EXAMPLE, TODAY) == []


@pytest.mark.parametrize(("changes", "expected"), [
    # age 18 to 60 inclusive, on the screening day
    ({"birth_date": date(2008, 11, 27)}, ["INC-AGE"]),      # 17, 18 tomorrow
    ({"birth_date": date(2008, 11, 26)}, []),               # 18 today
    ({"birth_date": date(1966, 11, 26)}, []),               # 60 today
    ({"birth_date": date(1965, 11, 27)}, []),               # 60, 61 tomorrow
    ({"birth_date": date(1965, 11, 26)}, ["INC-AGE"]),      # 61 today
    # severity: PASI >= 10, or BSA >= 10 and DLQI >= 10
    ({"pasi": 9.9, "bsa_percent": 5.0, "dlqi": 5}, ["INC-SEVERITY"]),
    ({"pasi": 10.0, "bsa_percent": 5.0, "dlqi": 5}, []),
    ({"pasi": 5.0, "bsa_percent": 10.0, "dlqi": 10}, []),
    ({"pasi": 5.0, "bsa_percent": 9.9, "dlqi": 10}, ["INC-SEVERITY"]),
    ({"pasi": 5.0, "bsa_percent": 10.0, "dlqi": 9}, ["INC-SEVERITY"]),
    ({"pasi": 9.9, "bsa_percent": 80.0, "dlqi": 9}, ["INC-SEVERITY"]),
    # diagnosed at least 6 months before screening (2026-05-26 for 2026-11-26)
    ({"diagnosis_date": date(2026, 5, 27)}, ["INC-DIAGNOSIS-6M"]),
    ({"diagnosis_date": date(2026, 5, 26)}, []),
    ({"diagnosis_date": TODAY}, ["INC-DIAGNOSIS-6M"]),
    # the other inclusions
    ({"conventional_therapy_failed": False}, ["INC-CONVENTIONAL-FAILED"]),
    ({"consent_signed": False}, ["INC-CONSENT"]),
    ({"can_attend_follow_up": False}, ["INC-FOLLOW-UP"]),
    # exclusions
    ({"psoriasis_type": "pustular"}, ["EXC-PSORIASIS-TYPE"]),
    ({"psoriasis_type": "erythrodermic"}, ["EXC-PSORIASIS-TYPE"]),
    ({"psoriasis_type": "guttate"}, ["EXC-PSORIASIS-TYPE"]),
    ({"drug_induced": True}, ["EXC-DRUG-INDUCED"]),
    ({"ongoing_psoriasis_treatment": True}, ["EXC-OTHER-TREATMENT"]),
    ({"prior_biologic_targets": ("IL-17",)}, ["EXC-PRIOR-BIOLOGIC"]),
    ({"prior_biologic_targets": ("TNF", "IL-23")}, ["EXC-PRIOR-BIOLOGIC"]),
    ({"active_infection": True}, ["EXC-INFECTION"]),
    ({"recurrent_infections": True}, ["EXC-INFECTION"]),
    ({"malignancy_history": True}, ["EXC-MALIGNANCY"]),
    ({"hiv": True}, ["EXC-HIV-HBV-HCV"]),
    ({"hbv": True}, ["EXC-HIV-HBV-HCV"]),
    ({"hcv": True}, ["EXC-HIV-HBV-HCV"]),
    ({"pregnant_or_lactating": True}, ["EXC-PREGNANCY"]),
    ({"planning_pregnancy": True}, ["EXC-PREGNANCY"]),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_each_criterion(changes: dict[str, Any], expected: list[str]) -> None:
    assert criteria(**changes) == expected


def test_every_failing_criterion_is_reported_with_a_message() -> None:
    reasons = eligibility(replace(EXAMPLE, birth_date=date(2010, 1, 1), psoriasis_type="guttate", hiv=True,
                                  prior_biologic_targets=("IL-17",)), TODAY)
    assert [r.criterion for r in reasons] == ["INC-AGE", "EXC-PSORIASIS-TYPE", "EXC-PRIOR-BIOLOGIC",
                                              "EXC-HIV-HBV-HCV"]
    messages = {r.criterion: r.message for r in reasons}
    assert "16" in messages["INC-AGE"]
    assert "guttate" in messages["EXC-PSORIASIS-TYPE"]
    assert "IL-17" in messages["EXC-PRIOR-BIOLOGIC"]


def test_eligibility_depends_on_the_screening_day() -> None:
    young = replace(EXAMPLE, birth_date=date(2008, 11, 27))
    assert [r.criterion for r in eligibility(young, date(2026, 11, 26))] == ["INC-AGE"]
    assert eligibility(young, date(2026, 11, 27)) == []


# --- life cycle -------------------------------------------------------------------------------

ENROLLED = PatientEnrolled(patient_id="p-1", site_id="S1", screening_id="scr-1", baseline_weight_kg=70.5,
                           baseline_pasi=14.2, enrolled_at=AT)
ASSIGNED = ArmAssigned(patient_id="p-1", site_id="S1", arm="msc_high", randomization_number=1,
                       stratum="S1:pasi_lt20", baseline_weight_kg=70.5, assigned_at=AT)
WITHDRAWN = PatientWithdrawn(patient_id="p-1", site_id="S1", reason="moved away", withdrawn_at=AT)


def screening(eligible: bool = True) -> PatientScreened:
    reasons = () if eligible else (Reason(criterion="INC-AGE", message="age 17 is outside 18 to 60"),)
    return PatientScreened(screening_id="scr-1", site_id="S1", screening_number="S1-0001", eligible=eligible,
                           reasons=reasons, age_years=46, weight_kg=70.5, pasi=14.2, protocol_version="1.0.0",
                           screened_at=AT)


def test_fold_of_nothing_is_a_new_patient() -> None:
    assert fold([]) == Patient()
    assert fold([]).status == "new"


def test_fold_enrolled_randomized_withdrawn() -> None:
    enrolled = fold([ENROLLED])
    assert enrolled == Patient("p-1", "S1", "enrolled", 70.5, 14.2, None)
    randomized = evolve(enrolled, ASSIGNED)
    assert randomized.status == "randomized"
    assert randomized.assignment == ASSIGNED
    assert (randomized.patient_id, randomized.baseline_pasi) == ("p-1", 14.2)
    withdrawn = fold([ENROLLED, ASSIGNED, WITHDRAWN])
    assert withdrawn.status == "withdrawn"
    assert withdrawn.assignment == ASSIGNED  # the arm stays on record
    assert enrolled.status == "enrolled"  # states are values: evolving made new ones


def test_evolve_ignores_events_it_does_not_know() -> None:
    state = fold([ENROLLED])
    other: EventData = screening()
    assert evolve(state, other) is state


def test_decide_enrol_an_eligible_screening() -> None:
    event = decide_enrol(screening(), Patient(), "p-1", AT)
    assert event == PatientEnrolled(patient_id="p-1", site_id="S1", screening_id="scr-1",
                                    baseline_weight_kg=70.5, baseline_pasi=14.2, enrolled_at=AT)


def test_decide_enrol_refuses_a_failed_screening() -> None:
    with pytest.raises(Problem) as caught:
        decide_enrol(screening(eligible=False), Patient(), "p-1", AT)
    assert (caught.value.status, caught.value.code) == (422, "not_eligible")
    assert caught.value.body()["reasons"] == [
        {"criterion": "INC-AGE", "message": "age 17 is outside 18 to 60"}]


@pytest.mark.parametrize("history", [[ENROLLED], [ENROLLED, ASSIGNED], [ENROLLED, ASSIGNED, WITHDRAWN]])
def test_decide_enrol_refuses_a_second_enrolment(history: list[EventData]) -> None:
    with pytest.raises(Problem) as caught:
        decide_enrol(screening(), fold(history), "p-1", AT)
    assert (caught.value.status, caught.value.code) == (409, "already_enrolled")
    assert caught.value.body()["patient_id"] == "p-1"


def test_decide_enrol_without_a_screening() -> None:
    with pytest.raises(Problem) as caught:
        decide_enrol(None, Patient(), "p-1", AT)
    assert (caught.value.status, caught.value.code) == (404, "screening_not_found")


@pytest.mark.parametrize(("pasi", "stratum"), [
    (0.0, "S1:pasi_lt20"), (19.9, "S1:pasi_lt20"), (20.0, "S1:pasi_ge20"), (72.0, "S1:pasi_ge20"),
])
def test_stratum_of_splits_at_pasi_20(pasi: float, stratum: str) -> None:
    patient = Patient("p-1", "S1", "enrolled", 70.0, pasi)
    assert stratum_of(patient, default_protocol()) == stratum


def test_strata_differ_by_site() -> None:
    protocol = default_protocol()
    assert stratum_of(Patient("p-1", "S1", "enrolled", 70.0, 12.0), protocol) != stratum_of(
        Patient("p-2", "S2", "enrolled", 70.0, 12.0), protocol)
