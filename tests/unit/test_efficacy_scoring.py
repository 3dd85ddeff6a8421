"""The efficacy scores: PASI on worked examples and properties, DLQI's published scoring rules, the
sPGA and BSA ranges, and PASI response at its exact thresholds."""

from __future__ import annotations

import ast
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.efficacy import scoring
from services.efficacy.scoring import (
    DLQI_INPUT,
    PASI_INPUT,
    DlqiBand,
    DlqiItem,
    DlqiItems,
    DlqiResponse,
    DlqiTotalOnly,
    PasiFromRegions,
    PasiRegions,
    PasiTotalOnly,
    Question7,
    Region,
    RegionScores,
    dlqi_0_1,
    dlqi_band,
    dlqi_total,
    pasi_response,
    pasi_total,
    percent_improvement,
    percent_reported,
    reported,
    spga_0_1,
    valid_bsa_percent,
    valid_spga,
)
from shared.errors import Refused

FIELDS = ("erythema", "induration", "desquamation", "area")
MAXIMA = {"erythema": 4, "induration": 4, "desquamation": 4, "area": 6}
# The oracle: the standard weights as exact fractions, written out again here.
WEIGHTS = {"head": Fraction(1, 10), "upper_limbs": Fraction(2, 10), "trunk": Fraction(3, 10),
           "lower_limbs": Fraction(4, 10)}

# The Efficacy section of the API contract: its PASI example, whose total is 23.8.
CONTRACT_EXAMPLE = {
    "head": {"erythema": 2, "induration": 1, "desquamation": 1, "area": 2},
    "upper_limbs": {"erythema": 3, "induration": 2, "desquamation": 2, "area": 3},
    "trunk": {"erythema": 2, "induration": 2, "desquamation": 1, "area": 4},
    "lower_limbs": {"erythema": 3, "induration": 3, "desquamation": 2, "area": 4},
}
CONTRACT_DLQI_ITEMS = [2, 1, 1, 0, 2, 1, 0, 1, 1, 0]

Components = dict[str, dict[str, int]]


def uniform(**scores: int) -> Components:
    return {region: dict(scores) for region in WEIGHTS}


def regions(components: Components) -> PasiRegions:
    return PasiRegions.model_validate(components)


def oracle(components: Components) -> Fraction:
    return sum((w * (c["erythema"] + c["induration"] + c["desquamation"]) * c["area"]
                for w, c in ((WEIGHTS[r], components[r]) for r in WEIGHTS)), Fraction(0))


def dlqi(*items: DlqiItem) -> DlqiItems:
    return DlqiItems(items=items)


# ------------------------------------------------------------------------------------ PASI examples

def test_pasi_of_all_zeros_is_zero() -> None:
    assert regions(uniform(erythema=0, induration=0, desquamation=0, area=0)).total == 0


def test_pasi_of_all_maxima_is_72() -> None:
    assert regions(uniform(**MAXIMA)).total == 72
    assert reported(regions(uniform(**MAXIMA)).total) == Decimal("72.0")


def test_the_contracts_example_is_exactly_23_8() -> None:
    pasi = PASI_INPUT.validate_python({"regions": CONTRACT_EXAMPLE})
    assert isinstance(pasi, PasiFromRegions)
    assert pasi_total(pasi) == Decimal("23.8")  # exact: not 23.799999999999997
    assert str(reported(pasi_total(pasi))) == "23.8"
    assert pasi.regions.region_scores() == {
        Region.HEAD: Decimal("0.8"), Region.UPPER_LIMBS: Decimal("4.2"),
        Region.TRUNK: Decimal("6.0"), Region.LOWER_LIMBS: Decimal("12.8")}
    # every component is kept
    assert pasi.regions.model_dump() == CONTRACT_EXAMPLE


def test_a_hand_computed_pasi() -> None:
    # head 0.1 x (1+1+0) x 1 = 0.2; upper limbs 0.2 x (4+3+3) x 5 = 10.0;
    # trunk 0.3 x (0+0+0) x 6 = 0; lower limbs 0.4 x (2+2+2) x 3 = 7.2; total 17.4
    components = {
        "head": {"erythema": 1, "induration": 1, "desquamation": 0, "area": 1},
        "upper_limbs": {"erythema": 4, "induration": 3, "desquamation": 3, "area": 5},
        "trunk": {"erythema": 0, "induration": 0, "desquamation": 0, "area": 6},
        "lower_limbs": {"erythema": 2, "induration": 2, "desquamation": 2, "area": 3},
    }
    assert regions(components).total == Decimal("17.4")
    assert regions(components).of(Region.UPPER_LIMBS).score(Region.UPPER_LIMBS) == Decimal("10.0")


def test_a_total_only_pasi_is_kept_as_sent_and_rounded_only_for_display() -> None:
    pasi = PASI_INPUT.validate_json('{"total": 12.35}')
    assert isinstance(pasi, PasiTotalOnly)
    assert pasi_total(pasi) == Decimal("12.35")
    assert reported(pasi_total(pasi)) == Decimal("12.4")  # half up
    assert PasiTotalOnly(total=23.8).total == Decimal("23.8")  # a float through its decimal text
    assert PasiTotalOnly(total=72).total == 72


# ---------------------------------------------------------------------------------- PASI properties

component = st.fixed_dictionaries({f: st.integers(0, MAXIMA[f]) for f in FIELDS})
all_components = st.fixed_dictionaries({r: component for r in WEIGHTS})


@given(all_components, st.sampled_from(list(WEIGHTS)), st.sampled_from(FIELDS))
@settings(max_examples=300, deadline=None)
def test_pasi_is_monotone_in_every_component(components: Components, region: str, field: str) -> None:
    if components[region][field] == MAXIMA[field]:
        components[region][field] -= 1
    raised = {r: dict(c) for r, c in components.items()}
    raised[region][field] += 1
    assert regions(raised).total >= regions(components).total


@given(all_components)
@settings(max_examples=300, deadline=None)
def test_pasi_is_bounded_exact_and_the_sum_of_its_regions(components: Components) -> None:
    pasi = regions(components)
    assert 0 <= pasi.total <= 72
    assert pasi.total == sum(pasi.region_scores().values())
    assert Fraction(pasi.total) == oracle(components)
    assert reported(pasi.total) == pasi.total  # a computed PASI needs no rounding


# ---------------------------------------------------------------------------------------------- DLQI

def test_dlqi_of_all_zeros_is_0_and_of_all_threes_is_30() -> None:
    assert dlqi_total(dlqi(*[0] * 10)) == 0
    assert dlqi_total(dlqi(*[3] * 10)) == 30
    assert dlqi_total(dlqi(*[DlqiResponse.VERY_MUCH] * 6, Question7(prevented_work_or_study="yes"),
                           *[DlqiResponse.VERY_MUCH] * 3)) == 30


def test_the_contracts_dlqi_items() -> None:
    parsed = DLQI_INPUT.validate_json('{"items": [2, 1, 1, 0, 2, 1, 0, 1, 1, 0]}')
    assert isinstance(parsed, DlqiItems)
    assert dlqi_total(parsed) == sum(CONTRACT_DLQI_ITEMS) == 9


def test_one_unanswered_question_scores_0_and_the_total_stands() -> None:
    assert dlqi_total(dlqi(3, 3, 3, 3, None, 3, 3, 3, 3, 3)) == 27


def test_two_unanswered_questions_and_the_dlqi_is_not_scored() -> None:
    assert dlqi_total(dlqi(3, 3, 3, 3, None, 3, None, 3, 3, 3)) is None
    assert dlqi_total(dlqi(*[None] * 10)) is None


def test_question_7_prevented_work_scores_3() -> None:
    prevented = dlqi(0, 0, 0, 0, 0, 0, Question7(prevented_work_or_study="yes"), 0, 0, 0)
    assert dlqi_total(prevented) == 3
    # "yes" is 3 whatever else is ticked
    assert Question7(prevented_work_or_study="yes", problem_at_work_or_study="a_little").score == 3


@pytest.mark.parametrize(("answer", "follow_up", "score"), [
    ("no", "a_lot", 2), ("no", "a_little", 1), ("no", "not_at_all", 0), ("no", None, 0),
    ("not_relevant", None, 0), ("not_relevant", "a_lot", 2), ("not_relevant", "a_little", 1),
])
def test_question_7_no_then_how_much(answer: Any, follow_up: Any, score: int) -> None:
    q7 = Question7(prevented_work_or_study=answer, problem_at_work_or_study=follow_up)
    assert dlqi_total(dlqi(0, 0, 0, 0, 0, 0, q7, 0, 0, 0)) == score


def test_not_relevant_scores_0() -> None:
    nr = DlqiResponse.NOT_RELEVANT
    assert dlqi_total(dlqi(3, 3, nr, nr, nr, nr, Question7(prevented_work_or_study="not_relevant"),
                           nr, nr, nr)) == 6
    parsed = DLQI_INPUT.validate_python({"items": [1, 1, "not_relevant", "a_lot", "very_much",
                                                   "a_little", {"prevented_work_or_study": "no",
                                                                "problem_at_work_or_study": "a_lot"},
                                                   "not_at_all", 0, None]})
    assert dlqi_total(parsed) == 1 + 1 + 0 + 2 + 3 + 1 + 2 + 0 + 0 + 0


@pytest.mark.parametrize("items", [
    ["not_relevant", 0, 0, 0, 0, 0, 0, 0, 0, 0],  # questions 1 and 2 have no "not relevant"
    [0, "not_relevant", 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, "a_lot", 0, 0, 0],  # question 7 has its own options
    [{"prevented_work_or_study": "yes"}, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # only question 7 has them
    [0] * 9, [0] * 11, [4, 0, 0, 0, 0, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [True, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1.5, 0, 0, 0, 0, 0, 0, 0, 0, 0], ["2", 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, {"prevented_work_or_study": "maybe"}, 0, 0, 0],
])
def test_answers_a_question_does_not_offer_are_rejected(items: list[Any]) -> None:
    with pytest.raises(ValidationError):
        DlqiItems.model_validate({"items": items})


answer = st.one_of(st.none(), st.integers(0, 3), st.sampled_from(list(DlqiResponse)))
q7 = st.one_of(st.none(), st.integers(0, 3), st.builds(
    Question7, prevented_work_or_study=st.sampled_from(["yes", "no", "not_relevant"]),
    problem_at_work_or_study=st.sampled_from([None, "a_lot", "a_little", "not_at_all"])))
questionnaire = st.tuples(st.integers(0, 3) | st.none(), st.integers(0, 3) | st.none(),
                          answer, answer, answer, answer, q7, answer, answer, answer)


@given(questionnaire)
@settings(max_examples=300, deadline=None)
def test_dlqi_total_is_in_0_30_or_not_scored_with_two_unanswered(items: tuple[DlqiItem, ...]) -> None:
    total = dlqi_total(dlqi(*items))
    unanswered = sum(item is None for item in items)
    if unanswered >= 2:
        assert total is None
    else:
        assert total is not None and 0 <= total <= 30
        assert total == sum(scoring.item_score(item) or 0 for item in items)


def test_a_dlqi_total_only() -> None:
    assert dlqi_total(DLQI_INPUT.validate_python({"total": 30})) == 30
    for bad in (-1, 31, 2.5, True):
        with pytest.raises(ValidationError):
            DlqiTotalOnly.model_validate({"total": bad})


@pytest.mark.parametrize(("total", "band"), [
    (0, DlqiBand.NO_EFFECT), (1, DlqiBand.NO_EFFECT), (2, DlqiBand.SMALL), (5, DlqiBand.SMALL),
    (6, DlqiBand.MODERATE), (10, DlqiBand.MODERATE), (11, DlqiBand.VERY_LARGE),
    (20, DlqiBand.VERY_LARGE), (21, DlqiBand.EXTREMELY_LARGE), (30, DlqiBand.EXTREMELY_LARGE),
])
def test_dlqi_bands_at_their_edges(total: int, band: DlqiBand) -> None:
    assert dlqi_band(total) is band


def test_dlqi_0_1() -> None:
    assert dlqi_0_1(0) and dlqi_0_1(1) and not dlqi_0_1(2)
    for bad in (-1, 31):
        with pytest.raises(Refused):
            dlqi_0_1(bad)
        with pytest.raises(Refused):
            dlqi_band(bad)


# ------------------------------------------------------------------------------------- sPGA and BSA

def test_spga_and_bsa_ranges() -> None:
    assert [valid_spga(v) for v in range(6)] == [0, 1, 2, 3, 4, 5]
    assert spga_0_1(0) and spga_0_1(1) and not spga_0_1(2)
    assert valid_bsa_percent(0) == 0 and valid_bsa_percent(100) == 100
    assert valid_bsa_percent(18.0) == Decimal("18.0")
    for bad_spga in (-1, 6, 2.0, True, "3", None):
        with pytest.raises(Refused) as refused:
            valid_spga(bad_spga)
        assert refused.value.code == "validation_error"
    for bad_bsa in (-0.1, 100.1, float("nan"), float("inf"), True, None):
        with pytest.raises(Refused):
            valid_bsa_percent(bad_bsa)


# ----------------------------------------------------------------------------------------- response

@pytest.mark.parametrize(("percent", "flags"), [
    ("49.9", (False, False, False, False)),
    ("50", (True, False, False, False)),
    ("74.9", (True, False, False, False)),
    ("75", (True, True, False, False)),
    ("89.9", (True, True, False, False)),
    ("90", (True, True, True, False)),
    ("99.9", (True, True, True, False)),
    ("100", (True, True, True, True)),
])
def test_response_thresholds_at_their_exact_boundaries(percent: str, flags: tuple[bool, ...]) -> None:
    current = (100 - Decimal(percent)) / 2  # from a baseline of 50: 74.9 % is 12.55, 75 % is 12.5
    response = pasi_response(Decimal(50), current)
    assert response.percent_improvement == Fraction(percent)
    assert (response.pasi50, response.pasi75, response.pasi90, response.pasi100) == flags


def test_thresholds_compare_the_exact_improvement() -> None:
    # In floats 100 * (2.4 - 0.6) / 2.4 is 74.99999999999999: exactly 75 % is PASI 75.
    assert 100 * (2.4 - 0.6) / 2.4 < 75
    assert pasi_response(2.4, 0.6).pasi75
    # 74.96 % displays as 75.0 but is not PASI 75.
    near = pasi_response(Decimal(50), Decimal("12.52"))
    assert near.percent_improvement_reported == Decimal("75.0") and not near.pasi75


def test_improvement_is_none_without_a_baseline_and_negative_when_worse() -> None:
    none = pasi_response(0, 0)
    assert none.percent_improvement is None and none.percent_improvement_reported is None
    assert not (none.pasi50 or none.pasi75 or none.pasi90 or none.pasi100)
    worse = pasi_response(Decimal("10"), Decimal("15"))
    assert worse.percent_improvement == -50 and not worse.pasi50
    assert percent_reported(Fraction(-1001, 20)) == Decimal("-50.1")  # -50.05: half away from zero
    assert percent_reported(Fraction(200, 3)) == Decimal("66.7")


pasi_values = st.decimals(min_value=0, max_value=72, places=2, allow_nan=False, allow_infinity=False)


@given(pasi_values)
def test_improvement_against_itself_is_0_and_against_0_is_100(pasi: Decimal) -> None:
    if pasi == 0:
        assert percent_improvement(pasi, pasi) is None
        return
    assert percent_improvement(pasi, pasi) == 0
    assert percent_improvement(pasi, 0) == 100
    assert pasi_response(pasi, 0).pasi100


@given(pasi_values, pasi_values)
def test_improvement_is_bounded_above_by_100(baseline: Decimal, current: Decimal) -> None:
    improvement = percent_improvement(baseline, current)
    assert improvement is None or improvement <= 100


# ---------------------------------------------------------------------------------- invalid inputs

@pytest.mark.parametrize(("field", "value"), [
    ("erythema", 5), ("induration", 5), ("desquamation", 5), ("area", 7), ("erythema", -1),
    ("area", -1), ("erythema", 2.5), ("erythema", True), ("area", "3"),
])
def test_out_of_range_components_are_rejected(field: str, value: Any) -> None:
    components = {r: dict(c) for r, c in CONTRACT_EXAMPLE.items()}
    components["trunk"][field] = value
    with pytest.raises(ValidationError):
        PASI_INPUT.validate_python({"regions": components})


@pytest.mark.parametrize("total", [-1, -0.1, 72.1, 73, "NaN", float("inf"), True])
def test_out_of_range_pasi_totals_are_rejected(total: Any) -> None:
    with pytest.raises(ValidationError):
        PasiTotalOnly.model_validate({"total": total})


def test_a_region_missing_or_unknown_is_rejected() -> None:
    missing = {r: c for r, c in CONTRACT_EXAMPLE.items() if r != "trunk"}
    with pytest.raises(ValidationError):
        PasiRegions.model_validate(missing)
    with pytest.raises(ValidationError):
        PasiRegions.model_validate({**CONTRACT_EXAMPLE, "neck": CONTRACT_EXAMPLE["head"]})
    with pytest.raises(ValidationError):
        PASI_INPUT.validate_python({"regions": CONTRACT_EXAMPLE, "total": 23.8})


def test_the_models_are_frozen() -> None:
    region = RegionScores(erythema=1, induration=1, desquamation=1, area=1)
    with pytest.raises(ValidationError):
        region.erythema = 4  # type: ignore[misc]


@pytest.mark.parametrize(("baseline", "current"), [(-1, 0), (73, 0), (10, 72.5), (10, -0.1),
                                                   (Decimal("NaN"), 0), (True, 0)])
def test_response_refuses_a_pasi_out_of_range(baseline: Any, current: Any) -> None:
    with pytest.raises(Refused) as refused:
        pasi_response(baseline, current)
    assert refused.value.code == "validation_error"


# ----------------------------------------------------------------------------------------- purity

def test_scoring_imports_only_the_standard_library_pydantic_and_shared_errors() -> None:
    tree = ast.parse(Path(scoring.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    outside = {name for name in imported
               if name.split(".")[0] not in sys.stdlib_module_names
               and name != "shared.errors" and name.split(".")[0] != "pydantic"}
    assert outside == set()
