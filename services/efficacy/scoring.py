"""Pure efficacy scoring: PASI, DLQI, sPGA and BSA from what a site records, and PASI response.

No I/O and no framework: the standard library, pydantic, and `shared.errors` for a refusal. The
input models are frozen and keep every component; the functions compute exact values.

Numbers (the rounding choice). PASI is a `Decimal`, exact, never a binary float: the region weights
are tenths and every score is an integer, so a PASI computed from regions is always an exact
multiple of 0.1 (the contract's example is exactly 23.8, not 23.799999999999997), and no rounding
is ever needed for it. A total a site sends is kept exactly as sent (a JSON number is read through
its decimal text). `reported()` rounds a PASI to one decimal place, half up, for display only.
Percent improvement is an exact `Fraction`, and the PASI 50/75/90/100 flags compare that exact
value with the threshold: a float would make a baseline of 2.4 falling to 0.6 a 74.99999999999999 %
improvement, not PASI 75; rounding first would make 74.96 % a PASI 75. `percent_reported()` rounds
it to one decimal place, half away from zero, for display only.

DLQI (Finlay & Khan 1994, Clin Exp Dermatol 19:210; the DLQI instructions for use and scoring,
Cardiff University): ten questions scored 0-3 ("very much" 3, "a lot" 2, "a little" 1, "not at
all" 0, "not relevant" 0; questions 1 and 2 have no "not relevant" option); question 7 is "has your
skin prevented you from working or studying?" yes (3) / no / not relevant, then, if not, "how much
has your skin been a problem at work or studying?" a lot (2) / a little (1) / not at all (0). One
question unanswered scores 0 and the total stands; two or more unanswered and the questionnaire is
not scored (`None`, not a refusal: the rest of an assessment still counts). Bands: Hongbo et al.
2005, J Invest Dermatol 125:659.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.errors import Refused

PASI_MAX = Decimal(72)
DLQI_MAX = 30
SPGA_MAX = 5
BSA_MAX = Decimal(100)
DLQI_QUESTIONS = 10
RESPONSE_THRESHOLDS = (50, 75, 90, 100)  # percent PASI improvement from baseline
_TENTH = Decimal("0.1")

# Integers are strict (a bool, a float or a string is refused, not coerced); totals and BSA are
# decimals read from int, float (through its shortest decimal text), str or Decimal, never NaN.
Sign = Annotated[int, Field(ge=0, le=4, strict=True)]  # erythema, induration, desquamation
AreaScore = Annotated[int, Field(ge=0, le=6, strict=True)]  # 0 none, 1 <10 %, ... 6 90-100 %
PasiValue = Annotated[Decimal, Field(ge=0, le=PASI_MAX, allow_inf_nan=False)]
DlqiScore = Annotated[int, Field(ge=0, le=3, strict=True)]
DlqiTotal = Annotated[int, Field(ge=0, le=DLQI_MAX, strict=True)]
Spga = Annotated[int, Field(ge=0, le=SPGA_MAX, strict=True)]
BsaPercent = Annotated[Decimal, Field(ge=0, le=BSA_MAX, allow_inf_nan=False)]


# ---------------------------------------------------------------------------------------------- PASI

class Region(StrEnum):
    HEAD = "head"
    UPPER_LIMBS = "upper_limbs"
    TRUNK = "trunk"
    LOWER_LIMBS = "lower_limbs"


# The standard weights: the share of the body surface each region stands for.
REGION_WEIGHTS: Mapping[Region, Decimal] = MappingProxyType({
    Region.HEAD: Decimal("0.1"), Region.UPPER_LIMBS: Decimal("0.2"),
    Region.TRUNK: Decimal("0.3"), Region.LOWER_LIMBS: Decimal("0.4"),
})


class RegionScores(BaseModel):
    """One region's severity signs (0 none .. 4 very marked) and its area score (0 .. 6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    erythema: Sign
    induration: Sign
    desquamation: Sign
    area: AreaScore

    @property
    def signs(self) -> int:
        return self.erythema + self.induration + self.desquamation

    def score(self, region: Region) -> Decimal:
        """This region's part of the PASI: weight x (E + I + D) x area, exact."""
        return REGION_WEIGHTS[region] * self.signs * self.area


class PasiRegions(BaseModel):
    """The four regions' scores, every component kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: RegionScores
    upper_limbs: RegionScores
    trunk: RegionScores
    lower_limbs: RegionScores

    def of(self, region: Region) -> RegionScores:
        scores: RegionScores = getattr(self, region.value)
        return scores

    def region_scores(self) -> dict[Region, Decimal]:
        return {region: self.of(region).score(region) for region in Region}

    @property
    def total(self) -> Decimal:
        """The exact PASI, 0 .. 72, a multiple of 0.1."""
        return sum(self.region_scores().values(), Decimal(0))


class PasiFromRegions(BaseModel):
    """`{"regions": {...}}` in the contract: the PASI computed from its components."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    regions: PasiRegions

    @property
    def total(self) -> Decimal:
        return self.regions.total


class PasiTotalOnly(BaseModel):
    """`{"total": 0..72}` in the contract: a site's system that sends only the total."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total: PasiValue


PasiInput = PasiFromRegions | PasiTotalOnly
PASI_INPUT: TypeAdapter[PasiInput] = TypeAdapter(PasiInput)


def pasi_total(pasi: PasiInput) -> Decimal:
    """The exact PASI of either form."""
    return pasi.total


def reported(pasi: Decimal) -> Decimal:
    """A PASI for display: one decimal place, half up (exact already for a computed PASI)."""
    return pasi.quantize(_TENTH, rounding=ROUND_HALF_UP)


# ---------------------------------------------------------------------------------------------- DLQI

class DlqiResponse(StrEnum):
    """The answers of questions 1-6 and 8-10 (questions 1 and 2 have no "not relevant")."""

    VERY_MUCH = "very_much"
    A_LOT = "a_lot"
    A_LITTLE = "a_little"
    NOT_AT_ALL = "not_at_all"
    NOT_RELEVANT = "not_relevant"


RESPONSE_SCORES: Mapping[DlqiResponse, int] = MappingProxyType({
    DlqiResponse.VERY_MUCH: 3, DlqiResponse.A_LOT: 2, DlqiResponse.A_LITTLE: 1,
    DlqiResponse.NOT_AT_ALL: 0, DlqiResponse.NOT_RELEVANT: 0,
})


class Question7(BaseModel):
    """Question 7 as its published options: prevented from working or studying, then how much."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prevented_work_or_study: Literal["yes", "no", "not_relevant"]
    problem_at_work_or_study: Literal["a_lot", "a_little", "not_at_all"] | None = None

    @property
    def score(self) -> int:
        # "Yes" scores 3. "No" or "not relevant" followed by "a lot" or "a little" scores 2 or 1 (the
        # DLQI instructions); "not at all", or nothing ticked after it, scores 0.
        if self.prevented_work_or_study == "yes":
            return 3
        return {"a_lot": 2, "a_little": 1}.get(self.problem_at_work_or_study or "", 0)


# One question's answer: its score 0-3 as a site's system scored it, the answer itself, or None
# when the patient left it unanswered.
DlqiItem = DlqiScore | DlqiResponse | Question7 | None


def item_score(item: DlqiItem) -> int | None:
    """One question's score, None when unanswered."""
    if item is None:
        return None
    if isinstance(item, Question7):
        return item.score
    if isinstance(item, DlqiResponse):
        return RESPONSE_SCORES[item]
    return item


class DlqiItems(BaseModel):
    """`{"items": [ten answers]}` in the contract, in question order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: Annotated[tuple[DlqiItem, ...], Field(min_length=DLQI_QUESTIONS, max_length=DLQI_QUESTIONS)]

    @model_validator(mode="after")
    def _each_answer_is_one_its_question_offers(self) -> Self:
        for question, item in enumerate(self.items, start=1):
            if isinstance(item, Question7) and question != 7:
                raise ValueError(f"question {question} is not question 7")
            if isinstance(item, DlqiResponse) and question == 7:
                raise ValueError("question 7 is answered yes / no / not relevant (a Question7) or "
                                 "with its score 0-3")
            if item is DlqiResponse.NOT_RELEVANT and question in (1, 2):
                raise ValueError(f"question {question} has no 'not relevant' option")
        return self

    @property
    def scores(self) -> tuple[int | None, ...]:
        return tuple(item_score(item) for item in self.items)

    @property
    def unanswered(self) -> int:
        return sum(score is None for score in self.scores)

    @property
    def total(self) -> int | None:
        """0 .. 30; one unanswered question scores 0; two or more and the DLQI is not scored."""
        if self.unanswered >= 2:
            return None
        return sum(score or 0 for score in self.scores)


class DlqiTotalOnly(BaseModel):
    """`{"total": 0..30}` in the contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total: DlqiTotal


DlqiInput = DlqiItems | DlqiTotalOnly
DLQI_INPUT: TypeAdapter[DlqiInput] = TypeAdapter(DlqiInput)


def dlqi_total(dlqi: DlqiInput) -> int | None:
    """The DLQI total, None when the questionnaire is not scored (two or more unanswered)."""
    return dlqi.total


class DlqiBand(StrEnum):
    """What a DLQI total means for the patient's life (Hongbo et al. 2005)."""

    NO_EFFECT = "no_effect"  # 0-1
    SMALL = "small"  # 2-5
    MODERATE = "moderate"  # 6-10
    VERY_LARGE = "very_large"  # 11-20
    EXTREMELY_LARGE = "extremely_large"  # 21-30


_BAND_TOPS = ((1, DlqiBand.NO_EFFECT), (5, DlqiBand.SMALL), (10, DlqiBand.MODERATE),
              (20, DlqiBand.VERY_LARGE), (DLQI_MAX, DlqiBand.EXTREMELY_LARGE))


def _dlqi_checked(total: int) -> int:
    if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= DLQI_MAX:
        raise Refused("validation_error", "a DLQI total is a whole number from 0 to 30",
                      field="dlqi", value=repr(total))
    return total


def dlqi_band(total: int) -> DlqiBand:
    total = _dlqi_checked(total)
    return next(band for top, band in _BAND_TOPS if total <= top)


def dlqi_0_1(total: int) -> bool:
    """DLQI 0/1: the skin has no effect on the patient's life."""
    return _dlqi_checked(total) <= 1


# --------------------------------------------------------------------------------------- sPGA, BSA

_SPGA: TypeAdapter[int] = TypeAdapter(Spga)
_BSA: TypeAdapter[Decimal] = TypeAdapter(BsaPercent)


def valid_spga(value: object) -> int:
    """An sPGA (0 clear, 1 almost clear, 2 mild, 3 moderate, 4 severe, 5 very severe), or Refused."""
    try:
        return _SPGA.validate_python(value)
    except ValidationError:
        raise Refused("validation_error", "an sPGA is a whole number from 0 to 5",
                      field="spga", value=repr(value)) from None


def valid_bsa_percent(value: object) -> Decimal:
    """A body surface area affected, in percent (0 .. 100), or Refused."""
    try:
        return _BSA.validate_python(value)
    except ValidationError:
        raise Refused("validation_error", "a BSA is a percentage from 0 to 100",
                      field="bsa_percent", value=repr(value)) from None


def spga_0_1(spga: int) -> bool:
    """sPGA 0/1: clear or almost clear."""
    return valid_spga(spga) <= 1


# ----------------------------------------------------------------------------------------- response

PasiNumber = Decimal | int | float


def _pasi_checked(name: str, value: PasiNumber) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
        raise Refused("validation_error", f"{name} is a PASI from 0 to 72", field=name, value=repr(value))
    # A float through its shortest decimal text, as pydantic reads it: 23.8 is Decimal("23.8").
    exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not exact.is_finite() or not 0 <= exact <= PASI_MAX:
        raise Refused("validation_error", f"{name} is a PASI from 0 to 72", field=name, value=repr(value))
    return exact


def percent_improvement(baseline: PasiNumber, current: PasiNumber) -> Fraction | None:
    """100 x (baseline - current) / baseline, exact; negative when worse; None when baseline is 0."""
    base, now = _pasi_checked("baseline", baseline), _pasi_checked("current", current)
    if base == 0:
        return None
    return 100 * (Fraction(base) - Fraction(now)) / Fraction(base)


def reaches(improvement: Fraction | None, threshold: int) -> bool:
    """PASI `threshold`: an improvement of at least `threshold` percent (never without a baseline)."""
    return improvement is not None and improvement >= threshold


def percent_reported(improvement: Fraction) -> Decimal:
    """An improvement for display: one decimal place, half away from zero."""
    tenths = math.floor(abs(improvement) * 10 + Fraction(1, 2))
    return Decimal(tenths if improvement >= 0 else -tenths).scaleb(-1)


@dataclass(frozen=True)
class PasiResponse:
    baseline: Decimal
    current: Decimal
    percent_improvement: Fraction | None  # exact; None when the baseline PASI is 0
    pasi50: bool
    pasi75: bool
    pasi90: bool
    pasi100: bool

    @property
    def percent_improvement_reported(self) -> Decimal | None:
        return None if self.percent_improvement is None else percent_reported(self.percent_improvement)


def pasi_response(baseline: PasiNumber, current: PasiNumber) -> PasiResponse:
    """The percent improvement from baseline and the PASI 50/75/90/100 flags."""
    improvement = percent_improvement(baseline, current)
    return PasiResponse(
        baseline=_pasi_checked("baseline", baseline), current=_pasi_checked("current", current),
        percent_improvement=improvement,
        pasi50=reaches(improvement, 50), pasi75=reaches(improvement, 75),
        pasi90=reaches(improvement, 90), pasi100=reaches(improvement, 100),
    )
