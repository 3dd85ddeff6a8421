"""The efficacy summary against one worked out by hand: a scripted cohort of 15 patients with
missed visits, a discontinuation, a withdrawal and a death, under NRI and as observed, the exact
intervals, and the Kaplan-Meier figures of relapse; then the edge cases."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from scipy.stats import beta

from services.efficacy.analysis import (
    Observation,
    PatientCourse,
    baseline_pasi,
    proportion,
    summarize,
    trajectory,
)

WEEKS = (0, 4, 8, 12, 16, 24, 36, 52)
ARMS = ("msc_low", "msc_high", "mtx")


Scores = dict[int, tuple[int | None, int | None]]


def course(patient: str, arm: str, pasi: dict[int, str], scores: Scores | None = None,
           screening: str | None = None, discontinued_after: int | None = None) -> PatientCourse:
    """A course from {week: PASI}; scores {week: (DLQI, sPGA)}; observations given newest first."""
    scores = scores or {}
    observations = tuple(
        Observation(week=week, pasi=Decimal(value), dlqi=scores.get(week, (None, None))[0],
                    spga=scores.get(week, (None, None))[1],
                    after_discontinuation=discontinued_after is not None and week > discontinued_after)
        for week, value in sorted(pasi.items(), reverse=True))
    return PatientCourse(patient, arm, None if screening is None else Decimal(screening), observations)


# Improvement = 100 x (baseline - PASI) / baseline; with a baseline of 20, PASI 10 is 50 %, 5 is 75 %,
# 2 is 90 %, 0 is 100 %. Weeks left out are visits with no observation.
COHORT = (
    # msc_low: 6 randomized
    course("L1", "msc_low", {0: "20", 4: "14", 8: "10", 12: "6", 16: "2", 24: "4", 36: "6", 52: "8"},
           {16: (1, 1), 52: (2, 1)}),                     # 16: 90 %; 24: 80, 36: 70, 52: 60
    course("L2", "msc_low", {0: "20", 4: "10", 8: "5", 12: "2", 16: "0", 24: "2", 36: "12", 52: "14"},
           {16: (0, 0), 52: (8, 3)}),                     # 16: 100 %; 24: 90, 36: 40, 52: 30
    course("L3", "msc_low", {0: "20", 8: "12", 16: "5", 24: "4", 52: "3"},  # missed 4, 12 and 36
           {16: (3, 2), 52: (0, 0)}),                     # 8: 40; 16: 75 (exactly); 24: 80, 52: 85
    course("L4", "msc_low", {0: "16", 4: "12", 8: "8"}),  # withdrew after week 8
    course("L5", "msc_low", {4: "8", 8: "6", 12: "4", 16: "2", 24: "3", 36: "5", 52: "6"},
           {16: (None, 1), 52: (1, 2)}, screening="10"),  # no week 0: baseline 10; 16: 80; 24: 70,
                                                          # 36: 50, 52: 40
    course("L6", "msc_low", {8: "4", 16: "3", 52: "2"},
           {16: (2, None), 52: (None, 1)}),               # no baseline at all
    # msc_high: 5 randomized
    course("H1", "msc_high", {0: "30", 4: "24", 8: "15", 12: "9", 16: "6", 24: "6", 36: "9", 52: "12"},
           {16: (4, 2), 52: (6, 2)}, discontinued_after=12),  # 16: 80, 24: 80, 52: 60, each of them
                                                              # after the discontinuation
    course("H2", "msc_high", {0: "25", 4: "20", 8: "12.5", 12: "5", 16: "2.5", 24: "2.5"},
           {16: (1, 1)}),                                 # 16: 90, 24: 90; died after week 24
    course("H3", "msc_high", {0: "12", 4: "9", 8: "6", 12: "3", 16: "0", 24: "0", 36: "0", 52: "1.2"},
           {16: (0, 0), 52: (0, 0)}),                     # 16, 24, 36: 100; 52: 90 (exactly)
    course("H4", "msc_high", {0: "20", 16: "14", 52: "16"},
           {16: (10, 3), 52: (12, 3)}),                   # 16: 30; 52: 20
    course("H5", "msc_high", {0: "20", 4: "18", 8: "14", 12: "8", 16: "5", 24: "12", 36: "13", 52: "10"},
           {16: (None, 1), 52: (2, 2)}),                  # 16: 75; 24: 40, 36: 35, 52: 50
    # mtx: 4 randomized
    course("M1", "mtx", {0: "18", 16: "4.5", 24: "12", 52: "4.5"},
           {16: (5, None), 52: (1, 1)}),                  # 16: 75; 24: 33.3; 52: 75
    course("M2", "mtx", {0: "22", 4: "17.6", 8: "13.2", 12: "8.8", 16: "4.4", 24: "2.2", 36: "11", 52: "11"},
           {16: (1, None), 52: (3, 1)}),                  # 16: 80; 24: 90, 36: 50, 52: 50
    course("M3", "mtx", {0: "20", 24: "4", 52: "4"}, {52: (0, 0)}),  # missed 4-16; 24: 80, 52: 80
    course("M4", "mtx", {0: "20", 4: "16", 8: "12", 12: "8", 16: "6", 24: "6", 36: "8"}),  # 16: 70; missed 52
)


def cp(k: int, n: int) -> list[float]:
    """The Clopper-Pearson 95 % interval from the Beta quantiles, computed apart from the code."""
    low = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    return [round(float(low), 4), round(float(high), 4)]


def r(k: int, n: int, rate: float) -> dict[str, Any]:
    return {"count": k, "n": n, "rate": rate, "ci95": cp(k, n)}


NONE = {"count": 0, "n": 0, "rate": None, "ci95": None}


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return summarize(COHORT, ARMS, WEEKS)


def test_every_arm_and_week_is_there_with_the_randomized_and_assessed_counts(summary: dict[str, Any]) -> None:
    assert list(summary["arms"]) == list(ARMS) and list(summary["sustainability"]) == list(ARMS)
    assessed = {arm: [summary["arms"][arm]["weeks"][str(w)]["assessed"] for w in WEEKS] for arm in ARMS}
    randomized = {arm: summary["arms"][arm]["randomized"] for arm in ARMS}
    assert randomized == {"msc_low": 6, "msc_high": 5, "mtx": 4}
    assert assessed == {
        # weeks 0, 4, 8, 12, 16, 24, 36, 52; L4 stops after 8, L5 and L6 have no week 0, L3 misses 4/12/36
        "msc_low": [4, 4, 6, 3, 5, 4, 3, 5],
        # H4 misses 4-12 and 24-36, H2 dies after 24; H1's post-discontinuation visits are assessed
        "msc_high": [5, 4, 4, 4, 5, 4, 3, 4],
        "mtx": [4, 2, 2, 2, 3, 4, 2, 3],
    }


def test_week_0_is_no_improvement_and_no_response(summary: dict[str, Any]) -> None:
    for arm in ARMS:
        week0 = summary["arms"][arm]["weeks"]["0"]
        assert week0["pasi_mean_percent_improvement"] == 0.0
        assert all(week0[rule][flag]["count"] == 0 for rule in ("nri", "observed") for flag in week0["nri"])
    assert summary["arms"]["msc_low"]["weeks"]["0"]["nri"]["pasi50"] == {
        "count": 0, "n": 6, "rate": 0.0, "ci95": [0.0, 0.4593]}  # 1 - 0.025 ** (1/6) = 0.4593


def test_week_16_by_hand(summary: dict[str, Any]) -> None:
    weeks = {arm: summary["arms"][arm]["weeks"]["16"] for arm in ARMS}
    assert weeks["msc_low"] == {
        "assessed": 5,                                   # L1, L2, L3, L5, L6 (L4 withdrew)
        "pasi_mean_percent_improvement": 86.3,           # (90 + 100 + 75 + 80) / 4 = 86.25 (not L6)
        "nri": {"pasi50": r(4, 6, 0.6667), "pasi75": r(4, 6, 0.6667),   # L1, L2, L3, L5 of 6
                "pasi90": r(2, 6, 0.3333), "pasi100": r(1, 6, 0.1667)},  # L1, L2; L2
        "observed": {"pasi50": r(4, 5, 0.8), "pasi75": r(4, 5, 0.8),
                     "pasi90": r(2, 5, 0.4), "pasi100": r(1, 5, 0.2)},
        "dlqi_0_1": r(2, 4, 0.5),                        # DLQI 1, 0, 3, 2 (L5 not scored)
        "spga_0_1": r(3, 4, 0.75),                       # sPGA 1, 0, 2, 1 (L6 none)
    }
    assert weeks["msc_high"] == {
        "assessed": 5,
        "pasi_mean_percent_improvement": 75.0,           # (80 + 90 + 100 + 30 + 75) / 5
        # NRI: H1's 80 % came after discontinuation, so it is no response: H2, H3, H5 of 5
        "nri": {"pasi50": r(3, 5, 0.6), "pasi75": r(3, 5, 0.6),
                "pasi90": r(2, 5, 0.4), "pasi100": r(1, 5, 0.2)},
        # observed: H1 counts as it is: H1, H2, H3, H5 of 5
        "observed": {"pasi50": r(4, 5, 0.8), "pasi75": r(4, 5, 0.8),
                     "pasi90": r(2, 5, 0.4), "pasi100": r(1, 5, 0.2)},
        "dlqi_0_1": r(2, 4, 0.5),                        # DLQI 4, 1, 0, 10 (H5 not scored)
        "spga_0_1": r(3, 5, 0.6),                        # sPGA 2, 1, 0, 3, 1
    }
    assert weeks["mtx"] == {
        "assessed": 3,                                   # M1, M2, M4 (M3 missed it)
        "pasi_mean_percent_improvement": 75.0,           # (75 + 80 + 70) / 3
        "nri": {"pasi50": r(3, 4, 0.75), "pasi75": r(2, 4, 0.5),
                "pasi90": r(0, 4, 0.0), "pasi100": r(0, 4, 0.0)},
        "observed": {"pasi50": r(3, 3, 1.0), "pasi75": r(2, 3, 0.6667),
                     "pasi90": r(0, 3, 0.0), "pasi100": r(0, 3, 0.0)},
        "dlqi_0_1": r(1, 2, 0.5),                        # DLQI 5, 1
        "spga_0_1": NONE,                                # nobody has an sPGA that week
    }
    # A few intervals as literals: 4/6, 1/6, 0/3 (high 1 - 0.025 ** (1/3)), 3/3 (low 0.025 ** (1/3))
    assert weeks["msc_low"]["nri"]["pasi50"]["ci95"] == [0.2228, 0.9567]
    assert weeks["msc_low"]["nri"]["pasi100"]["ci95"] == [0.0042, 0.6412]
    assert weeks["mtx"]["observed"]["pasi90"]["ci95"] == [0.0, 0.7076]
    assert weeks["mtx"]["observed"]["pasi50"]["ci95"] == [0.2924, 1.0]


def test_week_52_by_hand(summary: dict[str, Any]) -> None:
    weeks = {arm: summary["arms"][arm]["weeks"]["52"] for arm in ARMS}
    assert weeks["msc_low"] == {
        "assessed": 5,                                   # L1, L2, L3, L5, L6
        "pasi_mean_percent_improvement": 53.8,           # (60 + 30 + 85 + 40) / 4 = 53.75
        "nri": {"pasi50": r(2, 6, 0.3333), "pasi75": r(1, 6, 0.1667),   # L1, L3; L3
                "pasi90": r(0, 6, 0.0), "pasi100": r(0, 6, 0.0)},
        "observed": {"pasi50": r(2, 5, 0.4), "pasi75": r(1, 5, 0.2),
                     "pasi90": r(0, 5, 0.0), "pasi100": r(0, 5, 0.0)},
        "dlqi_0_1": r(2, 4, 0.5),                        # DLQI 2, 8, 0, 1
        "spga_0_1": r(3, 5, 0.6),                        # sPGA 1, 3, 0, 2, 1
    }
    assert weeks["msc_high"] == {
        "assessed": 4,                                   # H1, H3, H4, H5 (H2 died)
        "pasi_mean_percent_improvement": 55.0,           # (60 + 90 + 20 + 50) / 4
        "nri": {"pasi50": r(2, 5, 0.4), "pasi75": r(1, 5, 0.2),         # H3, H5; H3 (H1 discontinued)
                "pasi90": r(1, 5, 0.2), "pasi100": r(0, 5, 0.0)},
        "observed": {"pasi50": r(3, 4, 0.75), "pasi75": r(1, 4, 0.25),  # H1, H3, H5; H3
                     "pasi90": r(1, 4, 0.25), "pasi100": r(0, 4, 0.0)},
        "dlqi_0_1": r(1, 4, 0.25),                       # DLQI 6, 0, 12, 2
        "spga_0_1": r(1, 4, 0.25),                       # sPGA 2, 0, 3, 2
    }
    assert weeks["mtx"] == {
        "assessed": 3,                                   # M1, M2, M3 (M4 missed it)
        "pasi_mean_percent_improvement": 68.3,           # (75 + 50 + 80) / 3 = 68.33
        "nri": {"pasi50": r(3, 4, 0.75), "pasi75": r(2, 4, 0.5),
                "pasi90": r(0, 4, 0.0), "pasi100": r(0, 4, 0.0)},
        "observed": {"pasi50": r(3, 3, 1.0), "pasi75": r(2, 3, 0.6667),
                     "pasi90": r(0, 3, 0.0), "pasi100": r(0, 3, 0.0)},
        "dlqi_0_1": r(2, 3, 0.6667),                     # DLQI 1, 3, 0
        "spga_0_1": r(3, 3, 1.0),                        # sPGA 1, 1, 0
    }
    assert weeks["msc_high"]["observed"]["pasi50"]["ci95"] == [0.1941, 0.9937]


def test_week_24_discontinued_patient_counts_only_as_observed(summary: dict[str, Any]) -> None:
    week24 = summary["arms"]["msc_high"]["weeks"]["24"]
    # H1 80 % (after discontinuation), H2 90, H3 100, H5 40
    assert week24["nri"]["pasi75"] == r(2, 5, 0.4)
    assert week24["observed"]["pasi75"] == r(3, 4, 0.75)


def test_sustainability_and_relapse_free_survival_by_hand(summary: dict[str, Any]) -> None:
    # Relapse: improvement <= half the best before it. Times (week, event?) among week-16 responders:
    # msc_low: L1 censored 52; L2 relapses at 36 (40 <= 100 / 2); L3 censored 52; L5 relapses at 52
    #   (40 <= 80 / 2). Kept PASI 50 at 24, 36, 52: L1 only (L2 40 at 36, L3 missed 36, L5 40 at 52).
    #   S(24) = 1; S(36) = 1 - 1/4 = 0.75 (4 at risk); S(52) = 0.75 x (1 - 1/3) = 0.5 (L1, L3, L5 at risk).
    # msc_high (H1 discontinued before 16, so no responder): H2 censored 24 (died), H3 censored 52,
    #   H5 relapses at 36 (35 <= 75 / 2; 40 at 24 is not). Kept: H3 only.
    #   S(24) = 1 (a censoring, 3 at risk); S(36) = 1 - 1/2 = 0.5 (H3, H5); S(52) = 0.5 (H3 alone, no event).
    # mtx: M1 relapses at 24 (33.3 <= 75 / 2), M2 censored 52 (50 > 90 / 2). Kept: M2 (90, 50, 50).
    #   S(24) = 1 - 1/2 = 0.5; then M2 alone, censored: 0.5, 0.5.
    assert summary["sustainability"] == {
        "msc_low": {"responders_at_week": 16, "responders": 4, "kept_pasi50_to_week_52": 1,
                    "relapse_free": [{"week": 24, "survival": 1.0, "at_risk": 4},
                                     {"week": 36, "survival": 0.75, "at_risk": 4},
                                     {"week": 52, "survival": 0.5, "at_risk": 3}]},
        "msc_high": {"responders_at_week": 16, "responders": 3, "kept_pasi50_to_week_52": 1,
                     "relapse_free": [{"week": 24, "survival": 1.0, "at_risk": 3},
                                      {"week": 36, "survival": 0.5, "at_risk": 2},
                                      {"week": 52, "survival": 0.5, "at_risk": 1}]},
        "mtx": {"responders_at_week": 16, "responders": 2, "kept_pasi50_to_week_52": 1,
                "relapse_free": [{"week": 24, "survival": 0.5, "at_risk": 2},
                                 {"week": 36, "survival": 0.5, "at_risk": 1},
                                 {"week": 52, "survival": 0.5, "at_risk": 1}]},
    }


def test_an_earlier_last_week_cuts_the_follow_up() -> None:
    low = summarize(COHORT, ARMS, WEEKS, last_week=36)["sustainability"]["msc_low"]
    # Kept at 24 and 36: L1 (80, 70) and L5 (70, 50). Times: L1 censored 36, L2 relapse 36, L3 censored
    # 24 (its last visit up to 36), L5 censored 36 (its week-52 relapse is beyond the cut).
    # S(24) = 1 (4 at risk); S(36) = 1 - 1/3 (L1, L2, L5 at risk) = 0.6667.
    assert low["kept_pasi50_to_week_52"] == 2
    assert low["relapse_free"] == [{"week": 24, "survival": 1.0, "at_risk": 4},
                                   {"week": 36, "survival": 0.6667, "at_risk": 3}]


def responder(patient: str, time: int, relapse: bool, arm: str = "msc_low") -> PatientCourse:
    """A week-16 responder (100 %) who stays clear to `time`, then relapses (PASI 12 of 20: 40 %) or stops."""
    pasi = {w: "0" for w in WEEKS if 16 <= w <= time} | {0: "20"}
    if relapse:
        pasi[time] = "12"
    return course(patient, arm, pasi)


def test_scipy_kaplan_meier_matches_a_hand_product_limit_with_ties() -> None:
    times = [(24, True), (24, True), (24, False), (36, True), (36, False),
             (52, True), (52, False), (52, False)]
    cohort = [responder(f"P{i}", t, e) for i, (t, e) in enumerate(times)]

    def product_limit(week: int) -> float:  # censorings at a week are still at risk at that week
        s = 1.0
        for t in sorted({t for t, e in times if e and t <= week}):
            at_risk = sum(u >= t for u, _ in times)
            s *= 1 - sum(u == t and e for u, e in times) / at_risk
        return s

    # By hand: S(24) = 1 - 2/8 = 0.75; S(36) = 0.75 x (1 - 1/5) = 0.6; S(52) = 0.6 x (1 - 1/3) = 0.4
    assert [round(product_limit(w), 4) for w in (24, 36, 52)] == [0.75, 0.6, 0.4]
    result = summarize(cohort, ["msc_low"], WEEKS)["sustainability"]["msc_low"]
    # kept: only the two censored at 52 are clear at 24, 36 and 52
    assert result["responders"] == 8 and result["kept_pasi50_to_week_52"] == 2
    assert result["relapse_free"] == [{"week": 24, "survival": 0.75, "at_risk": 8},
                                      {"week": 36, "survival": 0.6, "at_risk": 5},
                                      {"week": 52, "survival": 0.4, "at_risk": 3}]


def test_responders_who_never_relapse_stay_at_survival_1() -> None:
    result = summarize([responder("P1", 24, False, "mtx"), responder("P2", 52, False, "mtx")], ["mtx"], WEEKS)
    assert result["sustainability"]["mtx"]["relapse_free"] == [
        {"week": 24, "survival": 1.0, "at_risk": 2}, {"week": 36, "survival": 1.0, "at_risk": 1},
        {"week": 52, "survival": 1.0, "at_risk": 1}]


def test_an_empty_arm_is_all_zeros_and_no_rates() -> None:
    result = summarize([], ARMS, WEEKS)
    for arm in ARMS:
        assert result["arms"][arm]["randomized"] == 0
        assert list(result["arms"][arm]["weeks"]) == [str(w) for w in WEEKS]
        for week in result["arms"][arm]["weeks"].values():
            assert week == {"assessed": 0, "pasi_mean_percent_improvement": None,
                            "nri": dict.fromkeys(("pasi50", "pasi75", "pasi90", "pasi100"), NONE),
                            "observed": dict.fromkeys(("pasi50", "pasi75", "pasi90", "pasi100"), NONE),
                            "dlqi_0_1": NONE, "spga_0_1": NONE}
        assert result["sustainability"][arm] == {"responders_at_week": 16, "responders": 0,
                                                 "kept_pasi50_to_week_52": 0, "relapse_free": []}


def test_rates_at_the_edges() -> None:
    assert proportion(0, 0) == NONE
    # k = 0: low 0, high 1 - 0.025 ** (1/5) = 0.5218; k = n: low 0.025 ** (1/5) = 0.4782, high 1
    assert proportion(0, 5) == {"count": 0, "n": 5, "rate": 0.0, "ci95": [0.0, 0.5218]}
    assert proportion(5, 5) == {"count": 5, "n": 5, "rate": 1.0, "ci95": [0.4782, 1.0]}
    assert proportion(1, 32)["rate"] == 0.0313  # 0.03125 rounds half up, not to even


def test_no_baseline_or_a_baseline_of_0_gives_no_response() -> None:
    orphan = course("X1", "mtx", {4: "10", 16: "1"})         # no week 0, no screening PASI
    clear = course("X2", "mtx", {0: "0", 16: "0"})            # a baseline of 0
    assert baseline_pasi(orphan) is None and baseline_pasi(clear) == Decimal(0)
    week16 = summarize([orphan, clear], ["mtx"], WEEKS)["arms"]["mtx"]["weeks"]["16"]
    assert week16["assessed"] == 2 and week16["pasi_mean_percent_improvement"] is None
    assert week16["nri"]["pasi100"] == r(0, 2, 0.0) and week16["observed"]["pasi50"] == r(0, 2, 0.0)
    assert trajectory(orphan)[1] == {"week": 16, "pasi_total": 1.0, "pasi_percent_improvement": None,
                                     "pasi50": False, "pasi75": False, "pasi90": False, "pasi100": False}


def test_baseline_is_week_0_else_screening() -> None:
    assert baseline_pasi(COHORT[0]) == Decimal(20)                      # L1's week 0
    assert baseline_pasi(course("X", "mtx", {0: "18.2"}, screening="19")) == Decimal("18.2")
    assert baseline_pasi(COHORT[4]) == Decimal(10)                      # L5: screening, no week 0


def test_trajectory_in_week_order_with_the_reported_figures() -> None:
    rows = trajectory(course("X", "msc_high", {16: "2.75", 0: "20", 52: "4.45", 8: "0"}))
    assert rows == [
        {"week": 0, "pasi_total": 20.0, "pasi_percent_improvement": 0.0,
         "pasi50": False, "pasi75": False, "pasi90": False, "pasi100": False},
        {"week": 8, "pasi_total": 0.0, "pasi_percent_improvement": 100.0,
         "pasi50": True, "pasi75": True, "pasi90": True, "pasi100": True},
        # 100 x 17.25 / 20 = 86.25, half away from zero 86.3; the PASI 2.75 is shown half up as 2.8
        {"week": 16, "pasi_total": 2.8, "pasi_percent_improvement": 86.3,
         "pasi50": True, "pasi75": True, "pasi90": False, "pasi100": False},
        # 100 x 15.55 / 20 = 77.75 -> 77.8; PASI 4.45 -> 4.5
        {"week": 52, "pasi_total": 4.5, "pasi_percent_improvement": 77.8,
         "pasi50": True, "pasi75": True, "pasi90": False, "pasi100": False},
    ]
    # L5 from its screening baseline of 10: week 4 PASI 8 is 20 %
    assert trajectory(COHORT[4])[0]["pasi_percent_improvement"] == 20.0


def test_the_summary_is_plain_json(summary: dict[str, Any]) -> None:
    def kinds(value: Any) -> set[type]:
        if isinstance(value, dict):
            return {dict}.union(*(kinds(v) for v in value.values()), *(kinds(k) for k in value))
        if isinstance(value, list):
            return {list}.union(*(kinds(v) for v in value))
        return {type(value)}

    assert kinds(summary) <= {dict, list, str, int, float, type(None)}
    assert json.loads(json.dumps(summary)) == summary


@pytest.mark.parametrize(("cohort", "message"), [
    ([course("X", "placebo", {0: "10"})], "arm 'placebo'"),
    ([course("X", "mtx", {0: "10"}), course("X", "mtx", {0: "12"})], "two courses"),
    ([PatientCourse("X", "mtx", None, (Observation(0, Decimal(10), None, None, False),
                                        Observation(0, Decimal(9), None, None, False)))], "two observations"),
])
def test_inconsistent_input_is_refused(cohort: list[PatientCourse], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summarize(cohort, ARMS, WEEKS)
