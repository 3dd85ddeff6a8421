"""Eligibility: every criterion of the protocol at its boundaries, from the configured criteria list."""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.randomization.eligibility import (
    ScreeningFacts,
    age_on,
    eligibility,
    months_before,
    months_between,
)
from shared.protocol import default_protocol
from shared.protocol.eligibility import EligibilityConfig

TODAY = date(2026, 11, 26)
CONFIG = default_protocol().eligibility

# The contract's example screening (api-contract.md), with consent given.
EXAMPLE = ScreeningFacts(
    site_id="S1", screening_number="S1-0001", birth_date=date(1980, 5, 1), sex="female",
    weight_kg=70.0, diagnosis_date=date(2020, 1, 15), psoriasis_type="plaque", pasi=14.2,
    bsa_percent=12.0, dlqi=11, conventional_therapy_failed=True, drug_induced=False,
    ongoing_psoriasis_treatment=False, prior_biologic_targets=(), active_infection=False,
    recurrent_infections=False, malignancy_history=False, hiv=False, hbv=False, hcv=False,
    pregnant_or_lactating=False, planning_pregnancy=False, can_attend_follow_up=True,
    consent_signed=True,
)
DAY = timedelta(days=1)


def years_before(day: date, years: int) -> date:
    return months_before(day, 12 * years)


def boundary_cases(today: date) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, changes to EXAMPLE, failing criteria) for every criterion at its boundary.

    Relative to `today`, so the end-to-end test runs the same table against the live service.
    """
    no_combo = {"bsa_percent": 5.0, "dlqi": 5}
    return [
        ("age-17", {"birth_date": years_before(today, 18) + DAY}, ["INC-AGE"]),
        ("age-18", {"birth_date": years_before(today, 18)}, []),
        ("age-60", {"birth_date": years_before(today, 61) + DAY}, []),
        ("age-61", {"birth_date": years_before(today, 61)}, ["INC-AGE"]),
        ("pasi-9.9", {"pasi": 9.9, **no_combo}, ["INC-SEVERITY"]),
        ("pasi-10", {"pasi": 10.0, **no_combo}, []),
        ("bsa-10-dlqi-10", {"pasi": 5.0, "bsa_percent": 10.0, "dlqi": 10}, []),
        ("bsa-9.9-dlqi-10", {"pasi": 5.0, "bsa_percent": 9.9, "dlqi": 10}, ["INC-SEVERITY"]),
        ("bsa-10-dlqi-9", {"pasi": 5.0, "bsa_percent": 10.0, "dlqi": 9}, ["INC-SEVERITY"]),
        ("pasi-9.9-bsa-80-dlqi-9", {"pasi": 9.9, "bsa_percent": 80.0, "dlqi": 9}, ["INC-SEVERITY"]),
        ("pasi-9.9-bsa-10-dlqi-10", {"pasi": 9.9, "bsa_percent": 10.0, "dlqi": 10}, []),
        ("diagnosis-just-under-6m", {"diagnosis_date": months_before(today, 6) + DAY},
         ["INC-DIAGNOSIS-6M"]),
        ("diagnosis-at-6m", {"diagnosis_date": months_before(today, 6)}, []),
        ("diagnosis-today", {"diagnosis_date": today}, ["INC-DIAGNOSIS-6M"]),
        ("conventional-not-failed", {"conventional_therapy_failed": False},
         ["INC-CONVENTIONAL-FAILED"]),
        ("no-consent", {"consent_signed": False}, ["INC-CONSENT"]),
        ("no-follow-up", {"can_attend_follow_up": False}, ["INC-FOLLOW-UP"]),
        ("pustular", {"psoriasis_type": "pustular"}, ["EXC-PSORIASIS-TYPE"]),
        ("erythrodermic", {"psoriasis_type": "erythrodermic"}, ["EXC-PSORIASIS-TYPE"]),
        ("guttate", {"psoriasis_type": "guttate"}, ["EXC-PSORIASIS-TYPE"]),
        ("drug-induced", {"drug_induced": True}, ["EXC-DRUG-INDUCED"]),
        ("other-treatment", {"ongoing_psoriasis_treatment": True}, ["EXC-OTHER-TREATMENT"]),
        ("prior-il17", {"prior_biologic_targets": ("IL-17",)}, ["EXC-PRIOR-BIOLOGIC"]),
        ("prior-tnf-il23", {"prior_biologic_targets": ("TNF", "IL-23")}, ["EXC-PRIOR-BIOLOGIC"]),
        ("active-infection", {"active_infection": True}, ["EXC-INFECTION"]),
        ("recurrent-infections", {"recurrent_infections": True}, ["EXC-INFECTION"]),
        ("malignancy", {"malignancy_history": True}, ["EXC-MALIGNANCY"]),
        ("hiv", {"hiv": True}, ["EXC-HIV-HBV-HCV"]),
        ("hbv", {"hbv": True}, ["EXC-HIV-HBV-HCV"]),
        ("hcv", {"hcv": True}, ["EXC-HIV-HBV-HCV"]),
        ("pregnant", {"pregnant_or_lactating": True}, ["EXC-PREGNANCY"]),
        ("planning-pregnancy", {"planning_pregnancy": True}, ["EXC-PREGNANCY"]),
    ]


def criteria(today: date = TODAY, config: EligibilityConfig = CONFIG, **changes: Any) -> list[str]:
    return [r.criterion for r in eligibility(replace(EXAMPLE, **changes), today, config)]


def test_contract_example_is_eligible() -> None:
    assert eligibility(EXAMPLE, TODAY, CONFIG) == []


@pytest.mark.parametrize(("name", "changes", "expected"), boundary_cases(TODAY),
                         ids=[c[0] for c in boundary_cases(TODAY)])
def test_each_criterion_at_its_boundary(name: str, changes: dict[str, Any],
                                        expected: list[str]) -> None:
    assert criteria(**changes) == expected


@pytest.mark.parametrize("today", [date(2026, 11, 26), date(2028, 2, 29), date(2027, 3, 1),
                                   date(2026, 8, 31), date(2027, 1, 1)])
def test_the_boundaries_hold_on_awkward_days(today: date) -> None:
    for name, changes, expected in boundary_cases(today):
        assert criteria(today, **changes) == expected, name


def test_every_criterion_of_the_configuration_is_exercised() -> None:
    failing = {c for _, _, expected in boundary_cases(TODAY) for c in expected}
    assert failing == {c.id for c in CONFIG.criteria}
    assert len(CONFIG.criteria) == 14


def test_every_failing_criterion_is_reported_with_a_message() -> None:
    reasons = eligibility(replace(EXAMPLE, birth_date=date(2010, 1, 1), psoriasis_type="guttate",
                                  hiv=True, prior_biologic_targets=("IL-17",), pasi=9.9,
                                  bsa_percent=9.9, dlqi=3), TODAY, CONFIG)
    assert [r.criterion for r in reasons] == ["INC-AGE", "INC-SEVERITY", "EXC-PSORIASIS-TYPE",
                                              "EXC-PRIOR-BIOLOGIC", "EXC-HIV-HBV-HCV"]
    messages = {r.criterion: r.message for r in reasons}
    assert messages["INC-AGE"] == "age 16 is outside 18 to 60"
    assert messages["INC-SEVERITY"] == "needs PASI >= 10, or BSA >= 10 % and DLQI >= 10"
    assert messages["EXC-PSORIASIS-TYPE"] == "psoriasis type guttate is excluded"
    assert messages["EXC-PRIOR-BIOLOGIC"] == "prior biologic targeting IL-17"


def test_eligibility_depends_on_the_screening_day() -> None:
    young = replace(EXAMPLE, birth_date=date(2008, 11, 27))
    assert [r.criterion for r in eligibility(young, date(2026, 11, 26), CONFIG)] == ["INC-AGE"]
    assert eligibility(young, date(2026, 11, 27), CONFIG) == []


# --- the criteria list is configuration --------------------------------------------------------


def test_thresholds_come_from_the_configuration() -> None:
    amended = CONFIG.model_copy(update={"max_age_years": 65, "min_pasi": 12})
    assert criteria(config=amended, birth_date=years_before(TODAY, 63)) == []
    assert criteria(config=amended, pasi=11.0, bsa_percent=5.0, dlqi=5) == ["INC-SEVERITY"]
    reasons = eligibility(replace(EXAMPLE, birth_date=years_before(TODAY, 70)), TODAY, amended)
    assert reasons[0].message == "age 70 is outside 18 to 65"


def test_a_criterion_left_out_of_the_configuration_is_not_checked() -> None:
    without_hiv = CONFIG.model_copy(update={
        "criteria": tuple(c for c in CONFIG.criteria if c.id != "EXC-HIV-HBV-HCV")})
    assert criteria(config=without_hiv, hiv=True) == []


@pytest.mark.parametrize("bad", [
    {"criteria": [{"id": "INC-AGE", "kind": "inclusion", "check": "age_in_range",
                   "message": "age {agee}"}]},
    {"criteria": [{"id": "INC-X", "kind": "inclusion", "check": "no_such_check", "message": "x"}]},
    {"criteria": [{"id": "INC-A", "kind": "inclusion", "check": "age_in_range", "message": "a"},
                  {"id": "INC-A", "kind": "inclusion", "check": "consent_signed", "message": "b"}]},
    {"criteria": [{"id": "lower-case", "kind": "inclusion", "check": "consent_signed",
                   "message": "x"}]},
    {"min_age_years": 70, "max_age_years": 60},
    {"surprise": 1},
])
def test_a_bad_eligibility_section_fails_at_load(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EligibilityConfig.model_validate(bad)


# --- dates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("birth", "day", "age"), [
    (date(2008, 11, 26), date(2026, 11, 25), 17),
    (date(2008, 11, 26), date(2026, 11, 26), 18),
    (date(2008, 12, 1), date(2026, 11, 30), 17),   # month decides before day
    (date(1965, 11, 27), date(2026, 11, 26), 60),  # 61 tomorrow
    (date(1965, 11, 26), date(2026, 11, 26), 61),
    (date(2008, 2, 29), date(2026, 2, 28), 17),    # a leap-day birthday counts from 1 March
    (date(2008, 2, 29), date(2026, 3, 1), 18),
])
def test_age_on(birth: date, day: date, age: int) -> None:
    assert age_on(birth, day) == age


@pytest.mark.parametrize(("day", "months", "expected"), [
    (date(2026, 11, 26), 6, date(2026, 5, 26)),
    (date(2026, 8, 31), 6, date(2026, 2, 28)),   # clamped to the end of February
    (date(2028, 8, 31), 6, date(2028, 2, 29)),   # a leap year
    (date(2026, 12, 31), 6, date(2026, 6, 30)),  # a 30-day month
    (date(2026, 3, 15), 6, date(2025, 9, 15)),   # across the year end
    (date(2026, 5, 17), 0, date(2026, 5, 17)),
])
def test_months_before(day: date, months: int, expected: date) -> None:
    assert months_before(day, months) == expected


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)), st.integers(0, 240))
def test_months_before_property(day: date, months: int) -> None:
    result = months_before(day, months)
    assert (day.year * 12 + day.month) - (result.year * 12 + result.month) == months
    assert result.day == min(day.day, calendar.monthrange(result.year, result.month)[1])


@given(st.dates(min_value=date(1950, 1, 1), max_value=date(2100, 12, 31)), st.integers(0, 240))
def test_months_between_inverts_months_before(day: date, months: int) -> None:
    assert months_between(months_before(day, months), day) >= months
    assert months_between(day, day) == 0
