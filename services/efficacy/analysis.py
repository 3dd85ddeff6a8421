"""Summarizes efficacy per arm and assessment week (PASI response, DLQI 0/1, sPGA 0/1) and how long
PASI responses last, from each randomized patient's course of assessments.

Pure: the standard library, scipy (exact binomial intervals, Kaplan-Meier) and `scoring`; no I/O.

Rules (the contract of `summarize`):
- Intention to treat: every course counts in its randomized arm. Every arm in `arms` and every week
  in `weeks` appears (week keys are `str(week)`), with zeros when nobody is there. A course of an
  arm not in `arms`, two courses of one patient, or two observations of one week is a ValueError.
- Baseline PASI: the week-0 observation's PASI, else the screening PASI, else none. Without a
  baseline, or with a baseline of 0, an observation has no percent improvement and no response.
- `assessed`: patients with an observation that week, after discontinuation included.
- `pasi_mean_percent_improvement`: the exact mean of the exact improvements of those assessed with
  a usable baseline, one decimal half away from zero; None when nobody qualifies.
- `nri` (non-responder imputation): n = randomized; a responder has an observation that week, not
  after discontinuation, reaching the threshold; missing or post-discontinuation = no response.
- `observed`: n = assessed that week; post-discontinuation observations count as they are.
- `dlqi_0_1` / `spga_0_1`: among those assessed that week with the score (not None), score 0 or 1.
- A rate: `{"count", "n", "rate", "ci95"}`; rate k/n and the exact Clopper-Pearson 95 % interval,
  both rounded to 4 decimals half up on the exact value; n = 0 gives rate and ci95 None.
- Sustainability per arm: responders = an observation at `responders_at_week`, not after
  discontinuation, reaching `responder_threshold`. Kept = responders with an observation reaching
  `kept_threshold` at every week of `weeks` after `responders_at_week` up to `last_week` (a
  missing one = not kept; post-discontinuation observations count as they are).
- Relapse (loss of at least half of the best PASI improvement): the first observation after
  `responders_at_week` whose improvement is at most half the best improvement of the observations
  before it (from week 0 on); event at its week, else censored at the last observation week.
  Observations after `last_week` are ignored. Relapse-free survival is scipy's Kaplan-Meier estimate
  per arm, listed at each week of `weeks` after `responders_at_week` up to `last_week`, with the
  responders whose event or censoring week is at or after that week (`at_risk`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from services.efficacy import scoring
from services.efficacy.domain import FollowUp
from shared.events import ARMS
from shared.protocol import ProtocolConfig

Json = dict[str, Any]
_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Observation:
    """One scheduled assessment as it stands (its latest correction applied)."""
    week: int                      # an assessment week: 0, 4, 8, 12, 16, 24, 36, 52
    pasi: Decimal                  # 0..72
    dlqi: int | None               # 0..30, None when not scored
    spga: int | None               # 0..5
    after_discontinuation: bool    # assessed after the patient's treatment was discontinued


@dataclass(frozen=True)
class PatientCourse:
    patient_id: str
    arm: str                        # "msc_low" | "msc_high" | "mtx": the randomized arm (ITT)
    screening_pasi: Decimal | None  # the baseline when week 0 was not assessed
    observations: tuple[Observation, ...]  # scheduled assessments only, any order


@dataclass(frozen=True)
class _Course:
    """A course read once: its baseline and its observations by week, in week order."""
    baseline: Decimal | None
    by_week: dict[int, Observation]

    def improvement(self, week: int) -> Fraction | None:
        obs = self.by_week.get(week)
        return None if obs is None else _improvement(self.baseline, obs)


def baseline_pasi(course: PatientCourse) -> Decimal | None:
    """The week-0 PASI, else the screening PASI, else None."""
    week0 = next((obs for obs in course.observations if obs.week == 0), None)
    return week0.pasi if week0 is not None else course.screening_pasi


def _improvement(baseline: Decimal | None, obs: Observation) -> Fraction | None:
    return None if baseline is None else scoring.percent_improvement(baseline, obs.pasi)


def _read(course: PatientCourse) -> _Course:
    by_week: dict[int, Observation] = {}
    for obs in course.observations:
        if obs.week in by_week:
            raise ValueError(f"patient {course.patient_id} has two observations at week {obs.week}")
        by_week[obs.week] = obs
    return _Course(baseline_pasi(course), dict(sorted(by_week.items())))


def trajectory(course: PatientCourse) -> list[Json]:
    """The patient's own view: per observation in week order, the PASI and the response to it."""
    read = _read(course)
    rows: list[Json] = []
    for week, obs in read.by_week.items():
        improvement = _improvement(read.baseline, obs)
        rows.append({
            "week": week,
            "pasi_total": float(scoring.reported(obs.pasi)),
            "pasi_percent_improvement":
                None if improvement is None else float(scoring.percent_reported(improvement)),
            **{f"pasi{t}": scoring.reaches(improvement, t) for t in scoring.RESPONSE_THRESHOLDS},
        })
    return rows


def _round4(value: Fraction | float) -> float:
    # Half up on the exact value (as scoring rounds), not Python's round() on a binary float.
    return math.floor(Fraction(value) * 10_000 + Fraction(1, 2)) / 10_000


def proportion(count: int, n: int) -> Json:
    """A rate with its exact Clopper-Pearson 95 % interval; rate and interval None when n is 0."""
    if n == 0:
        return {"count": count, "n": 0, "rate": None, "ci95": None}
    from scipy import stats  # on first use: an idle service does not carry scipy (~70 MB)

    ci = stats.binomtest(count, n).proportion_ci(confidence_level=_CONFIDENCE, method="exact")
    return {"count": count, "n": n, "rate": _round4(Fraction(count, n)),
            "ci95": [_round4(float(ci.low)), _round4(float(ci.high))]}


def _week(courses: list[_Course], week: int) -> Json:
    seen = [(c.by_week[week], c.improvement(week)) for c in courses if week in c.by_week]
    usable = [imp for _, imp in seen if imp is not None]
    mean = sum(usable, Fraction(0)) / len(usable) if usable else None
    dlqis = [obs.dlqi for obs, _ in seen if obs.dlqi is not None]
    spgas = [obs.spga for obs, _ in seen if obs.spga is not None]
    thresholds = scoring.RESPONSE_THRESHOLDS
    return {
        "assessed": len(seen),
        "pasi_mean_percent_improvement": None if mean is None else float(scoring.percent_reported(mean)),
        "nri": {f"pasi{t}": proportion(
            sum(not obs.after_discontinuation and scoring.reaches(imp, t) for obs, imp in seen),
            len(courses)) for t in thresholds},
        "observed": {f"pasi{t}": proportion(sum(scoring.reaches(imp, t) for _, imp in seen), len(seen))
                     for t in thresholds},
        "dlqi_0_1": proportion(sum(scoring.dlqi_0_1(d) for d in dlqis), len(dlqis)),
        "spga_0_1": proportion(sum(scoring.spga_0_1(s) for s in spgas), len(spgas)),
    }


def _time_to_relapse(course: _Course, after_week: int, last_week: int) -> tuple[int, bool]:
    """(week, True) at relapse, else (last observation week, False): censored."""
    best: Fraction | None = None
    last = after_week
    for week, obs in course.by_week.items():
        if week > last_week:
            break
        improvement = _improvement(course.baseline, obs)
        if improvement is None:  # never for a responder, who has a non-zero baseline
            continue
        if week > after_week and best is not None and improvement <= best / 2:
            return week, True
        best = improvement if best is None else max(best, improvement)
        last = week
    return last, False


def _sustainability(courses: list[_Course], weeks: Sequence[int], at: int, threshold: int,
                    kept_threshold: int, last_week: int) -> Json:
    later = sorted(w for w in set(weeks) if at < w <= last_week)
    responders = [c for c in courses if at in c.by_week and not c.by_week[at].after_discontinuation
                  and scoring.reaches(c.improvement(at), threshold)]
    kept = sum(all(scoring.reaches(c.improvement(w), kept_threshold) for w in later) for c in responders)
    times = [_time_to_relapse(c, at, last_week) for c in responders]
    relapse_free: list[Json] = []
    if times:  # scipy's ecdf needs at least one time
        from scipy import stats

        data = stats.CensoredData(uncensored=[t for t, event in times if event],
                                  right=[t for t, event in times if not event])
        sf = stats.ecdf(data).sf
        relapse_free = [{"week": w, "survival": _round4(float(sf.evaluate(w))),
                         "at_risk": sum(t >= w for t, _ in times)} for w in later]
    return {"responders_at_week": at, "responders": len(responders),
            "kept_pasi50_to_week_52": kept, "relapse_free": relapse_free}


def summarize(courses: Iterable[PatientCourse], arms: Sequence[str], weeks: Sequence[int],
              responders_at_week: int = 16, responder_threshold: int = 75, kept_threshold: int = 50,
              last_week: int = 52) -> Json:
    """Per arm: response by week (NRI and observed), DLQI 0/1, sPGA 0/1, and sustainability."""
    by_arm: dict[str, list[_Course]] = {arm: [] for arm in arms}
    patients: set[str] = set()
    for course in courses:
        if course.arm not in by_arm:
            raise ValueError(f"patient {course.patient_id} is in arm {course.arm!r}, not one of {list(arms)}")
        if course.patient_id in patients:
            raise ValueError(f"patient {course.patient_id} has two courses")
        patients.add(course.patient_id)
        by_arm[course.arm].append(_read(course))
    return {
        "arms": {arm: {"randomized": len(read), "weeks": {str(w): _week(read, w) for w in weeks}}
                 for arm, read in by_arm.items()},
        "sustainability": {
            arm: _sustainability(read, weeks, responders_at_week, responder_threshold, kept_threshold,
                                 last_week)
            for arm, read in by_arm.items()},
    }


# --- from the follow-ups --------------------------------------------------------------------


def course(f: FollowUp) -> PatientCourse:
    """A follow-up as the analysis reads it: by randomized arm, scheduled assessments only."""
    assert f.patient_id is not None and f.randomized_arm is not None
    return PatientCourse(
        patient_id=f.patient_id, arm=f.randomized_arm,
        screening_pasi=None if f.screening_pasi is None else Decimal(repr(f.screening_pasi)),
        observations=tuple(
            Observation(week=a.week, pasi=a.measured.pasi_total, dlqi=a.measured.dlqi_total,
                        spga=a.measured.spga, after_discontinuation=a.after_treatment_discontinued)
            for a in f.assessments if a.week is not None))


def summary_of(followups: Iterable[FollowUp], protocol: ProtocolConfig) -> Json:
    """The trial's efficacy summary under the protocol's efficacy section: what GET
    /v1/efficacy/summary answers and the DSMB report draws, from one place."""
    e, weeks = protocol.efficacy, protocol.assessment_weeks
    return summarize([course(f) for f in followups if f.randomized_arm is not None], ARMS,
                     weeks, responders_at_week=e.responders_at_week,
                     responder_threshold=e.responder_threshold,
                     kept_threshold=e.kept_threshold, last_week=max(weeks))
