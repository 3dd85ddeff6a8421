"""Pure eligibility: a screening's facts against the protocol's criteria list, every failure reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from shared.events import Reason
from shared.protocol.eligibility import Check, EligibilityConfig


@dataclass(frozen=True)
class ScreeningFacts:
    site_id: str
    screening_number: str
    birth_date: date
    sex: str
    weight_kg: float
    diagnosis_date: date
    psoriasis_type: str
    pasi: float
    bsa_percent: float
    dlqi: int
    conventional_therapy_failed: bool
    drug_induced: bool
    ongoing_psoriasis_treatment: bool
    prior_biologic_targets: tuple[str, ...]
    active_infection: bool
    recurrent_infections: bool
    malignancy_history: bool
    hiv: bool
    hbv: bool
    hcv: bool
    pregnant_or_lactating: bool
    planning_pregnancy: bool
    can_attend_follow_up: bool
    consent_signed: bool
    consent_signed_at: datetime | None = None  # when, in UTC (the record kept with the screening)


def age_on(birth: date, day: date) -> int:
    """Completed years on `day` (a 29 February birthday counts from 1 March)."""
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def months_before(day: date, months: int) -> date:
    year, month = divmod(day.month - 1 - months, 12)
    target_year, target_month = day.year + year, month + 1
    for d in (day.day, 30, 29, 28):  # the same day of the month, or that month's last day
        try:
            return date(target_year, target_month, d)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def months_between(start: date, end: date) -> int:
    """Whole months from `start` to `end` (0 when `end` is earlier)."""
    months = (end.year - start.year) * 12 + end.month - start.month
    while months > 0 and months_before(end, months) < start:
        months -= 1
    return max(months, 0)


@dataclass(frozen=True)
class _Context:
    facts: ScreeningFacts
    config: EligibilityConfig
    today: date

    @property
    def age(self) -> int:
        return age_on(self.facts.birth_date, self.today)


def _severe(c: _Context) -> bool:
    f, cfg = c.facts, c.config
    return f.pasi >= cfg.min_pasi or (f.bsa_percent >= cfg.min_bsa_percent and f.dlqi >= cfg.min_dlqi)


CHECKS: dict[Check, Callable[[_Context], bool]] = {
    "age_in_range": lambda c: c.config.min_age_years <= c.age <= c.config.max_age_years,
    "diagnosed_long_enough": lambda c: c.facts.diagnosis_date <= months_before(
        c.today, c.config.min_months_since_diagnosis),
    "moderate_to_severe": _severe,
    "conventional_therapy_failed": lambda c: c.facts.conventional_therapy_failed,
    "consent_signed": lambda c: c.facts.consent_signed,
    "can_attend_follow_up": lambda c: c.facts.can_attend_follow_up,
    "plaque_type": lambda c: c.facts.psoriasis_type in c.config.included_psoriasis_types,
    "not_drug_induced": lambda c: not c.facts.drug_induced,
    "no_other_psoriasis_treatment": lambda c: not c.facts.ongoing_psoriasis_treatment,
    "no_prior_biologic": lambda c: not c.facts.prior_biologic_targets,
    "no_infection": lambda c: not (c.facts.active_infection or c.facts.recurrent_infections),
    "no_malignancy": lambda c: not c.facts.malignancy_history,
    "no_hiv_hbv_hcv": lambda c: not (c.facts.hiv or c.facts.hbv or c.facts.hcv),
    "not_pregnant": lambda c: not (c.facts.pregnant_or_lactating or c.facts.planning_pregnancy),
}


def _number(value: float) -> str:
    return f"{value:g}"


def _message_fields(c: _Context) -> dict[str, object]:
    f, cfg = c.facts, c.config
    return {
        "age": c.age, "min_age_years": cfg.min_age_years, "max_age_years": cfg.max_age_years,
        "min_months_since_diagnosis": cfg.min_months_since_diagnosis,
        "months_since_diagnosis": months_between(f.diagnosis_date, c.today),
        "pasi": _number(f.pasi), "bsa_percent": _number(f.bsa_percent), "dlqi": f.dlqi,
        "min_pasi": _number(cfg.min_pasi), "min_bsa_percent": _number(cfg.min_bsa_percent),
        "min_dlqi": cfg.min_dlqi, "psoriasis_type": f.psoriasis_type,
        "prior_biologic_targets": ", ".join(f.prior_biologic_targets),
    }


def eligibility(facts: ScreeningFacts, today: date, config: EligibilityConfig) -> list[Reason]:
    """Every failing criterion of the configured list, in its order, with id and message."""
    context = _Context(facts, config, today)
    failing = [c for c in config.criteria if not CHECKS[c.check](context)]
    if not failing:
        return []
    fields = _message_fields(context)
    return [Reason(criterion=c.id, message=c.message.format(**fields)) for c in failing]
