"""The DSMB report: one self-contained HTML page (inline styles and SVG charts, nothing fetched)
of what the ledger holds at one position: enrolment and dosing, adverse events, the stopping
rules (R6's posterior over time, firings, holds, DSMB decisions) and PASI 75.

Every figure comes from the services' own pure code, fed with the ledger's facts: the safety
state and status (`services.safety.state`, `.rules`, `.domain.status`, as GET /v1/safety/status),
the dosing record (`services.dosing.domain.fold`), and the follow-up and its analysis
(`services.efficacy.domain.fold`, `analysis.summary_of`, as GET
/v1/efficacy/summary). `numbers` gives every figure the page shows; `render` draws the page.
"""

from __future__ import annotations

import html
import importlib
import io
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from services.audit.history import History
from services.dosing import domain as dosing
from services.efficacy import analysis
from services.efficacy import domain as efficacy
from services.safety import domain as safety
from services.safety import rules
from services.safety.state import SafetyState, evolve
from shared.decider import Identified
from shared.events import (
    ARMS,
    DOSING,
    EFFICACY,
    SAFETY,
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmAssigned,
    ArmCrossedOver,
    ArmSuspended,
    DeathRecorded,
    EnrollmentPaused,
    EventData,
    LostToFollowUp,
    PatientDosingHeld,
    PatientEnrolled,
    PatientSafetyFactRecorded,
    PatientScreened,
    PatientWithdrawn,
    SafetyHoldLifted,
    StoppingRuleTriggered,
    StudyCompleted,
    TreatmentDiscontinued,
    TrialHalted,
)
from shared.protocol import ProtocolConfig
from shared.protocol.safety import BayesToxicity, SafetyConfig

NOT_RANDOMIZED = "not_randomized"  # enrolled (or screened) and never assigned an arm
UNCODED = "UNCODED"  # a term the CTCAE coder does not know (or no coder installed)
CTCAE_MODULE = "services.audit.ctcae"
GRADES = (1, 2, 3, 4, 5)
PASI_LEVEL = 75
# Okabe-Ito colours (told apart by colour-blind readers) and line styles (and in greyscale print).
ARM_COLOURS = {"msc_low": "#0072B2", "msc_high": "#D55E00", "mtx": "#009E73"}
ARM_LINES = {"msc_low": "-", "msc_high": "--", "mtx": ":"}
ARM_MARKERS = {"msc_low": "o", "msc_high": "s", "mtx": "^"}
DOSE_STATUSES = ("given", "missed", "held", "cancelled", "planned")
ENROLMENT_FIELDS = ("screened", "eligible", "enrolled", "randomized", "doses_given",
                    "doses_planned", "doses_missed", "doses_held", "doses_cancelled", "withdrawn",
                    "treatment_discontinued", "lost_to_follow_up", "died", "completed")
HOLD_TYPES = (PatientDosingHeld, ArmSuspended, EnrollmentPaused, TrialHalted)
Json = dict[str, Any]
Coder = Callable[[str], "tuple[str, str] | None"]


# --- small helpers --------------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    """A time in UTC; one without a zone is read as UTC (as the ledger stores times)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else _utc(at).isoformat()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _patient_of(data: EventData) -> str | None:
    pid = getattr(data, "patient_id", None)
    return pid if isinstance(pid, str) else None


def _coder() -> Coder:
    """The CTCAE v5 coder (`services.audit.ctcae.code(term) -> (decod, soc) | None`), imported
    when a report is made; without the module every term is uncoded."""
    try:
        module = importlib.import_module(CTCAE_MODULE)
    except ModuleNotFoundError as missing:
        if missing.name != CTCAE_MODULE:
            raise  # the coder is there but needs something that is not: not "no coder"
        return lambda term: None
    code: Coder = module.code
    return code


# --- the figures ----------------------------------------------------------------------------


def numbers(history: History, protocol: ProtocolConfig, now: datetime | None = None) -> Json:
    """Every figure the page shows, as JSON-ready data (times as ISO 8601 UTC text).

    `now`: when the report is made; reporting clocks past due then are flagged overdue (None
    without it, as the safety status does)."""
    run = _fold_safety(history, protocol)
    view: Json = safety.status(protocol.safety, run.state, protocol.enrollment_cap, now=now)
    return {
        "trial_id": protocol.trial_id,
        "protocol_version": protocol.version,
        "rule_set_version": protocol.safety.rule_set_version,
        "position": history.position,
        "arms": list(ARMS),
        "enrolment": _enrolment(history, protocol),
        "adverse_events": _adverse_events(protocol.safety, run.state, _coder()),
        "trial_status": {k: view["trial"][k] for k in ("status", "enrollment")},
        "reporting_clocks": _jsonable(view["reporting_clocks"]),
        "posterior": _posterior(protocol.safety, view, run.series),
        "holds_in_force": _holds_in_force(view),
        "timeline": _timeline(history, protocol.safety, run.state),
        "efficacy": _efficacy(history, protocol),
    }


# Enrolment and dosing -------------------------------------------------------------------------


def _enrolment(history: History, protocol: ProtocolConfig) -> Json:
    """Per site and arm: patients by randomized arm (intention to treat), doses by the arm of
    the calendar they belong to (after a crossover, the arm crossed into), from each patient's
    dosing record as dosing folds it."""
    arm_of: dict[str, str] = {}  # patient -> randomized arm
    site_of: dict[str, str] = {}
    patient_of_screening: dict[str, str] = {}
    randomizations: list[Json] = []
    for _, e in history.of(PatientEnrolled):
        site_of[e.patient_id] = e.site_id
        patient_of_screening[e.screening_id] = e.patient_id
    for fact, a in history.of(ArmAssigned):
        if a.patient_id not in arm_of:
            arm_of[a.patient_id] = a.arm
            site_of.setdefault(a.patient_id, a.site_id)
            randomizations.append({"patient_id": a.patient_id, "site_id": a.site_id,
                                   "arm": a.arm, "randomization_number": a.randomization_number,
                                   "at": _iso(a.assigned_at), "position": fact.position})
    randomizations.sort(key=lambda r: (r["at"], r["position"]))
    records = _dosing_records(history)

    sites = sorted({*protocol.sites, *site_of.values(),
                    *(s.site_id for s in history.data(PatientScreened)),
                    *(r.site_id for r in records.values() if r.site_id is not None)})
    groups = [*ARMS, NOT_RANDOMIZED]
    cells = {(s, g): dict.fromkeys(ENROLMENT_FIELDS, 0) for s in sites for g in groups}

    def group(patient_id: str | None) -> str:
        return arm_of.get(patient_id or "", NOT_RANDOMIZED)

    for s in history.data(PatientScreened):
        g = group(patient_of_screening.get(s.screening_id))
        cells[(s.site_id, g)]["screened"] += 1
        cells[(s.site_id, g)]["eligible"] += int(s.eligible)
    for pid, site in site_of.items():
        cells[(site, group(pid))]["enrolled"] += 1
        if pid in arm_of:
            cells[(site, group(pid))]["randomized"] += 1
    dispositions: list[tuple[str, tuple[type[EventData], ...]]] = [
        ("withdrawn", (PatientWithdrawn,)), ("treatment_discontinued", (TreatmentDiscontinued,)),
        ("lost_to_follow_up", (LostToFollowUp,)), ("died", (DeathRecorded,)),
        ("completed", (StudyCompleted,))]
    for name, types in dispositions:
        for pid in {p for d in history.data(*types) if (p := _patient_of(d)) is not None}:
            if (home := site_of.get(pid)) is not None:
                cells[(home, group(pid))][name] += 1
    for pid, record in records.items():
        where = record.site_id or site_of.get(pid)
        if where is None:
            continue
        for calendar in record.calendars:
            for slot in calendar.slots:
                if slot.is_dose:
                    row = cells[(where, slot.arm)]
                    row["doses_planned"] += 1
                    if slot.status != "planned":
                        row[f"doses_{slot.status}"] += 1

    def total(rows: Iterable[dict[str, int]]) -> dict[str, int]:
        found = dict.fromkeys(ENROLMENT_FIELDS, 0)
        for row in rows:
            for k, v in row.items():
                found[k] += v
        return found

    return {
        "sites": {s: {"by_arm": {g: cells[(s, g)] for g in groups},
                      "total": total(cells[(s, g)] for g in groups)} for s in sites},
        "by_arm": {g: total(cells[(s, g)] for s in sites) for g in groups},
        "total": total(cells.values()),
        "crossovers": [{"patient_id": c.patient_id, "from_arm": c.from_arm, "to_arm": c.to_arm,
                        "at": _iso(c.crossed_over_at)} for c in history.data(ArmCrossedOver)],
        "randomizations": randomizations,
        "enrollment_cap": protocol.enrollment_cap,
    }


def _dosing_records(history: History) -> dict[str, dosing.DosingRecord]:
    """Each patient's dosing record, folded from the dosing facts about them in ledger order
    (the partition keeps one patient's events in the order dosing wrote them)."""
    streams: dict[str, list[EventData]] = {}
    for fact in history.facts:
        pid = _patient_of(fact.data)
        if pid is not None and fact.data.topic_of() == DOSING:
            streams.setdefault(pid, []).append(fact.data)
    return {pid: dosing.fold(events) for pid, events in streams.items()}


# Safety: the state, R6 over time ---------------------------------------------------------------


@dataclass(frozen=True)
class _SafetyRun:
    state: SafetyState
    series: dict[str, list[Json]]  # per arm, R6's figures each time they changed


def _bayes(config: SafetyConfig) -> tuple[str, BayesToxicity] | None:
    """The rule with a posterior (R6), as `domain.status` finds it."""
    return next(((r.id, r.bayes) for r in config.rules if r.bayes is not None), None)


def _fold_safety(history: History, protocol: ProtocolConfig) -> _SafetyRun:
    """The safety facts folded in ledger order through the safety service's own `evolve`, with
    each arm's posterior (`rules.arm_toxicity`, what the status shows) after every fact that can
    move it: an adverse event or follow-up, a first dose in an arm, or any fact about a patient
    with an adverse event (an assignment, crossover or infusion changes how it reads)."""
    config = protocol.safety
    bayes = _bayes(config)
    state = SafetyState(protocol.trial_id)
    series: dict[str, list[Json]] = {arm: [] for arm in ARMS}
    last: dict[str, tuple[int, int, Fraction]] = {}
    with_events: set[str] = set()  # patients with an adverse event
    for fact in history.facts:
        data = fact.data
        if data.topic_of() != SAFETY:
            continue
        before = state
        state = evolve(state, Identified(fact.event_id, data))
        if bayes is None:
            continue
        pid = _patient_of(data)
        if isinstance(data, AdverseEventReported | AdverseEventFollowedUp):
            with_events.add(data.patient_id)
        elif not isinstance(data, PatientSafetyFactRecorded) or pid is None:
            continue
        elif pid not in with_events:
            old, new = before.patients.get(pid), state.patients.get(pid)
            if old is not None and new is not None and old.dosed_arms == new.dosed_arms:
                continue
        _, b = bayes
        threshold = Fraction(str(b.probability))
        for arm in ARMS:
            tox = rules.arm_toxicity(config, b, state, arm)
            point = (tox.patients_dosed, tox.toxicities, tox.probability)
            if last.get(arm) == point:
                continue
            last[arm] = point
            series[arm].append({
                "position": fact.position, "at": _iso(fact.time), "posterior_n": tox.patients_dosed,
                "toxicities": tox.toxicities,
                "posterior_probability": round(float(tox.probability), 6),
                "posterior_exceeded": tox.probability > threshold})
    return _SafetyRun(state, series)


def _posterior(config: SafetyConfig, view: Json, series: dict[str, list[Json]]) -> Json:
    """R6 now, per arm, exactly as GET /v1/safety/status shows it, and over time."""
    bayes = _bayes(config)
    arms = view["arms"]
    keys = ("patients_dosed", "toxicities", "posterior_n", "posterior_probability",
            "posterior_exceeded", "status")
    return {
        "rule_id": bayes[0] if bayes else None,
        "rate": bayes[1].rate if bayes else None,
        "threshold": bayes[1].probability if bayes else None,
        "final": {arm: {k: arms[arm].get(k) for k in keys} for arm in ARMS},
        "series": series,
    }


def _holds_in_force(view: Json) -> list[Json]:
    holds = [*view["trial"]["holds"], *(h for arm in ARMS for h in view["arms"][arm]["holds"]),
             *view["patient_holds"]]
    return [{k: h.get(k) for k in ("hold_id", "kind", "scope", "target", "rule_id", "product",
                                   "decision_id")} for h in holds]


def _timeline(history: History, config: SafetyConfig, state: SafetyState) -> list[Json]:
    """Rule firings, holds and DSMB decisions (lifts, and holds the DSMB imposed) in ledger
    order."""
    rows: list[Json] = []
    holds: dict[str, Json] = {}
    for fact, e in history.of(StoppingRuleTriggered, *HOLD_TYPES, SafetyHoldLifted):
        row: Json = {"position": fact.position, "at": _iso(fact.time), "event": e.event_type(),
                     "scope": None, "target": None, "rule_id": None, "hold_id": None,
                     "dsmb": False, "decided_by": None, "rationale": None, "detail": None,
                     "in_force": None}
        if isinstance(e, StoppingRuleTriggered):
            row.update(scope=e.scope, target=e.target, rule_id=e.rule_id,
                       detail=f"{len(e.evidence)} evidence event(s), newest "
                              f"{_shown(_iso(e.triggered_at))}; rule set "
                              f"{e.rule_set_version}"
                              + (f", protocol {e.protocol_version}" if e.protocol_version else ""))
        elif isinstance(e, SafetyHoldLifted):
            lifted = holds.get(e.hold_id, {})
            row.update(scope=e.scope, target=e.target, hold_id=e.hold_id, dsmb=True,
                       rule_id=lifted.get("rule_id"), decided_by=e.decided_by,
                       rationale=e.rationale,
                       detail=f"lifts {lifted.get('event', 'a hold')}")
        else:
            assert isinstance(e, HOLD_TYPES)
            dsmb = e.decision_id is not None or e.rule_id == config.dsmb_rule_id
            row.update(scope=e.scope, target=e.target, rule_id=e.rule_id, hold_id=e.hold_id,
                       dsmb=dsmb, decided_by=e.decided_by, rationale=e.rationale,
                       in_force=e.hold_id in state.active_holds,
                       detail=(f"product: {e.product}" if isinstance(e, PatientDosingHeld)
                               else None))
            holds[e.hold_id] = row
        rows.append(row)
    return rows


# Adverse events ------------------------------------------------------------------------------


def _adverse_events(config: SafetyConfig, state: SafetyState, coder: Coder) -> Json:
    """Per arm (the treatment at onset, as the safety rules read it): each adverse event once,
    at the worst grade any of its reports gave it, serious or related if any report said so."""
    groups = [*ARMS, NOT_RANDOMIZED]

    def empty() -> Json:
        return {"total": 0, "patients": 0, "serious": 0, "non_serious": 0, "related": 0,
                "susar": 0, "grades": {str(g): 0 for g in GRADES}, "soc": {}}

    by_arm = {g: empty() for g in groups}
    patients: dict[str, set[str]] = {g: set() for g in groups}
    susars = {s.adverse_event_id for s in state.susars}
    sae_due = {c.adverse_event_id: c for c in state.sae_reports}
    events: list[Json] = []
    for ae in state.adverse_events.values():
        arm, _ = rules.arm_reading(state, ae.patient_id, ae.onset_at, ae.arm)
        g = arm or NOT_RANDOMIZED
        grade = max(v.grade for v in ae.views)
        serious = any(v.serious for v in ae.views)
        related = any(rules.related(config, v.relatedness) for v in ae.views)
        coded = coder(ae.term)
        decod, soc = coded if coded is not None else (None, UNCODED)
        row = by_arm[g]
        row["total"] += 1
        row["serious" if serious else "non_serious"] += 1
        row["related"] += int(related)
        row["susar"] += int(ae.adverse_event_id in susars)
        row["grades"][str(grade)] = row["grades"].get(str(grade), 0) + 1
        row["soc"][soc] = row["soc"].get(soc, 0) + 1
        patients[g].add(ae.patient_id)
        current = ae.current
        due = sae_due.get(ae.adverse_event_id)
        events.append({
            "adverse_event_id": ae.adverse_event_id, "patient_id": ae.patient_id,
            "site_id": ae.site_id, "arm": g, "term": ae.term, "decod": decod, "soc": soc,
            "grade": grade, "grade_now": current.grade, "serious": serious, "related": related,
            "relatedness": current.relatedness, "expected": current.expected,
            "outcome": current.outcome, "onset_at": _iso(ae.onset_at),
            "reported_at": _iso(ae.views[0].reported_at), "reports": len(ae.views),
            "susar": ae.adverse_event_id in susars,
            "sae_report_due_at": _iso(due.due_at) if due is not None else None})
    for g in groups:
        by_arm[g]["patients"] = len(patients[g])
        by_arm[g]["soc"] = dict(sorted(by_arm[g]["soc"].items()))
    total = empty()
    for g in groups:
        for k in ("total", "serious", "non_serious", "related", "susar"):
            total[k] += by_arm[g][k]
        for grade, n in by_arm[g]["grades"].items():
            total["grades"][grade] = total["grades"].get(grade, 0) + n
        total["soc"] = dict(sorted((Counter(total["soc"]) + Counter(by_arm[g]["soc"])).items()))
    total["patients"] = len(set().union(*patients.values()))
    return {"by_arm": by_arm, "total": total, "events": events}


# Efficacy ------------------------------------------------------------------------------------


def _efficacy(history: History, protocol: ProtocolConfig) -> Json:
    """PASI 75 under non-responder imputation, per arm and week: the efficacy service's summary
    (GET /v1/efficacy/summary) over the follow-ups folded from the efficacy facts."""
    streams: dict[str, list[EventData]] = {}
    for fact in history.facts:
        pid = _patient_of(fact.data)
        if pid is not None and fact.data.topic_of() == EFFICACY:
            streams.setdefault(pid, []).append(fact.data)
    followups = [f for f in (efficacy.fold(events) for events in streams.values())
                 if f.randomized_arm is not None]
    weeks = protocol.assessment_weeks
    summary = analysis.summary_of(followups, protocol)
    level = f"pasi{PASI_LEVEL}"
    return {
        "level": PASI_LEVEL, "weeks": list(weeks),
        "randomized": {arm: summary["arms"][arm]["randomized"] for arm in ARMS},
        "pasi75_nri": {arm: {str(w): {**summary["arms"][arm]["weeks"][str(w)]["nri"][level],
                                      "assessed": summary["arms"][arm]["weeks"][str(w)]["assessed"]}
                             for w in weeks} for arm in ARMS},
    }


# --- charts -----------------------------------------------------------------------------------

_RC: dict[str, Any] = {"svg.fonttype": "path", "svg.hashsalt": "dsmb-report", "font.family": "DejaVu Sans",
       "font.size": 8.5, "axes.spines.top": False, "axes.spines.right": False,
       "axes.grid": True, "grid.color": "#dddddd", "grid.linewidth": 0.6,
       "legend.frameon": False}
# rcParams are process-wide: one chart at a time, so a concurrent render never mixes settings.
_CHART_LOCK = threading.Lock()
_ID = re.compile(r'\bid="([^"]+)"')


def _svg(draw: Callable[[Any], None], prefix: str, label: str,
         size: tuple[float, float] = (7.5, 3.2)) -> str:
    """One chart as inline SVG: matplotlib's SVG backend without pyplot, glyphs drawn as paths
    (no font is loaded by the page), ids prefixed so several charts share one document."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with _CHART_LOCK, matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        fig = Figure(figsize=size)  # fixed margins: a layout engine would draw everything twice
        fig.subplots_adjust(left=0.085, right=0.74, top=0.96, bottom=0.13)
        FigureCanvasSVG(fig)
        draw(fig.add_subplot())
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    text = text[text.index("<svg"):]  # no XML declaration or DTD inside HTML
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    ids = set(_ID.findall(text))

    def renamed(m: re.Match[str]) -> str:
        head, name, tail = m.group(1), m.group(2), m.group(3)
        return f"{head}{prefix}-{name}{tail}" if name in ids else m.group(0)

    text = re.sub(r'(\bid=")([^"]+)(")', renamed, text)
    text = re.sub(r'(href="#)([^"]+)(")', renamed, text)
    text = re.sub(r"(url\(#)([^)]+)(\))", renamed, text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{_e(label)}" ', 1)


def _time_axis(ax: Any) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(tz=UTC, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7.5, borderaxespad=0)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777")


def _when(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


def _chart_enrolment(n: Json, protocol: ProtocolConfig, until: datetime) -> str:
    randomizations = n["enrolment"]["randomizations"]

    def draw(ax: Any) -> None:
        if not randomizations:
            _no_data(ax, "No patient randomized yet")
        else:
            start = _when(randomizations[0]["at"])
            end = max(until, _when(randomizations[-1]["at"]))
            for arm in ARMS:
                times = [_when(r["at"]) for r in randomizations if r["arm"] == arm]
                xs = [start, *times, end]
                ys = [0, *range(1, len(times) + 1), len(times)]
                (line,) = ax.step(xs, ys, where="post", color=ARM_COLOURS[arm],
                                  linestyle=ARM_LINES[arm], linewidth=1.6,
                                  label=f"{protocol.arms[arm].name} ({len(times)})")
                line.set_gid(f"series-{arm}")
            times = [_when(r["at"]) for r in randomizations]
            (line,) = ax.step([start, *times, end], [0, *range(1, len(times) + 1), len(times)],
                              where="post", color="#444444", linewidth=1.0, alpha=0.7,
                              label=f"All arms ({len(times)})")
            line.set_gid("series-total")
            ax.axhline(n["enrolment"]["enrollment_cap"], color="#999999", linewidth=0.8,
                       linestyle=(0, (4, 3)), gid="cap",
                       label=f"Cap ({n['enrolment']['enrollment_cap']})")
            _time_axis(ax)
            _legend(ax)
        ax.set_ylabel("Patients randomized (cumulative)")
        ax.set_ylim(bottom=0)

    return _svg(draw, "chart-enrolment", "Cumulative randomizations over time, per arm")


def _chart_posterior(n: Json, protocol: ProtocolConfig, until: datetime) -> str:
    post = n["posterior"]
    fired = [r for r in n["timeline"]
             if r["event"] == "StoppingRuleTriggered" and r["rule_id"] == post["rule_id"]]

    def draw(ax: Any) -> None:
        points = [p for arm in ARMS for p in post["series"][arm]]
        if post["rule_id"] is None or not points:
            _no_data(ax, "No posterior evaluated yet")
        else:
            start = min(_when(p["at"]) for p in points)
            end = max(until, max(_when(p["at"]) for p in points))
            for arm in ARMS:
                series = post["series"][arm]
                if not series:
                    continue
                xs = [_when(p["at"]) for p in series] + [end]
                ys = [p["posterior_probability"] for p in series] + [
                    series[-1]["posterior_probability"]]
                (line,) = ax.step(xs, ys, where="post", color=ARM_COLOURS[arm],
                                  linestyle=ARM_LINES[arm], linewidth=1.6,
                                  label=f"{protocol.arms[arm].name}")
                line.set_gid(f"series-{arm}")
            for r in fired:
                arm = r["target"]
                at = _when(r["at"])
                ax.plot([at], [_posterior_at(post["series"].get(arm, []), r["position"])],
                        marker="v", markersize=7, color=ARM_COLOURS.get(arm, "#000000"),
                        linestyle="none", gid=f"firing-{r['position']}")
            ax.set_xlim(start, end)
            _time_axis(ax)
        if post["threshold"] is not None:
            ax.axhline(post["threshold"], color="#CC0000", linewidth=1.1,
                       linestyle=(0, (5, 3)), gid="threshold",
                       label=f"Stopping threshold {post['threshold']}")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"P(toxicity rate > {post['rate']})")
        if points:
            _legend(ax)

    return _svg(draw, "chart-posterior", "R6 posterior probability over time, per arm, with the "
                "stopping threshold")


def _posterior_at(series: list[Json], position: int) -> float:
    before = [p for p in series if p["position"] <= position]
    return float(before[-1]["posterior_probability"]) if before else 0.0


def _chart_pasi(n: Json, protocol: ProtocolConfig) -> str:
    eff = n["efficacy"]
    weeks = eff["weeks"]

    def draw(ax: Any) -> None:
        offsets = dict(zip(ARMS, (-0.8, 0.0, 0.8), strict=True))
        drawn = False
        for arm in ARMS:
            # A week nobody has reached yet would read as 0 % under NRI: not drawn.
            cells = [(w, eff["pasi75_nri"][arm][str(w)]) for w in weeks]
            cells = [(w, c) for w, c in cells if c["rate"] is not None and c["assessed"]]
            if not cells:
                continue
            drawn = True
            xs = [w + offsets[arm] for w, _ in cells]
            ys = [c["rate"] * 100 for _, c in cells]
            low = [(c["rate"] - c["ci95"][0]) * 100 for _, c in cells]
            high = [(c["ci95"][1] - c["rate"]) * 100 for _, c in cells]
            bars = ax.errorbar(xs, ys, yerr=[low, high], color=ARM_COLOURS[arm],
                               linestyle=ARM_LINES[arm], marker=ARM_MARKERS[arm], markersize=4,
                               capsize=2.5, linewidth=1.3,
                               label=f"{protocol.arms[arm].name} (n={eff['randomized'][arm]})")
            bars.lines[0].set_gid(f"series-{arm}")
        if not drawn:
            _no_data(ax, "No patient assessed yet")
        else:
            _legend(ax)
        ax.set_xticks(weeks)
        ax.set_xlim(min(weeks) - 2, max(weeks) + 2)
        ax.set_ylim(0, 100)
        ax.set_xlabel("Week")
        ax.set_ylabel(f"PASI {eff['level']} (%), NRI, exact 95 % CI")

    return _svg(draw, "chart-pasi75", f"PASI {eff['level']} rate per arm and week with exact 95 % "
                "intervals, non-responder imputation")


# --- the page ---------------------------------------------------------------------------------

_CSS = """
:root { --ink: #1a1a1a; --muted: #5a5a5a; --rule: #c8c8c8; --band: #f3f5f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); margin: 0 auto; padding: 1.5rem 2rem 3rem; max-width: 75rem; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; padding-bottom: .2rem;
     border-bottom: 2px solid var(--ink); }
h3 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
p.note, figcaption, .muted { color: var(--muted); font-size: .85rem; }
.confidential { display: inline-block; border: 1.5px solid #a00; color: #a00; padding: .1rem .5rem;
                font-weight: 600; font-size: .8rem; letter-spacing: .03em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .8rem 0; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
nav ol { margin: .3rem 0; padding-left: 1.2rem; columns: 2; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .82rem; width: 100%; }
caption { text-align: left; font-weight: 600; padding: .2rem 0; }
th, td { border-bottom: 1px solid var(--rule); padding: .2rem .4rem; vertical-align: top; }
thead th { font-size: .78rem; vertical-align: bottom; }
th { text-align: left; background: var(--band); }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td, tr.total th { font-weight: 600; border-top: 1.5px solid var(--ink); }
tr.subtotal td, tr.subtotal th { font-weight: 600; }
.yes { color: #a00; font-weight: 600; }
.overdue { color: #fff; background: #a00; padding: 0 .3rem; border-radius: 2px; }
.dsmb { font-weight: 600; }
figure { margin: .6rem 0 1.2rem; }
figure svg { display: block; width: 100%; max-width: 64rem; height: auto; }
.scroll { overflow-x: auto; }
code { font-size: .8rem; }
@media print {
  @page { size: A4 landscape; margin: 12mm; }
  body { font-size: 9.5pt; max-width: none; padding: 0; }
  nav { display: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  section { break-before: page; page-break-before: always; }
  section:first-of-type { break-before: auto; page-break-before: auto; }
  figure, tr { break-inside: avoid; page-break-inside: avoid; }
  thead { display: table-header-group; }
  th { background: none; }
  .scroll { overflow: visible; }
  .overdue { color: #a00; background: none; border: 1px solid #a00; }
  a { color: inherit; text-decoration: none; }
}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _shown(text: str | None) -> str:
    """An ISO time as people read it, in UTC."""
    if text is None:
        return "—"
    return _utc(datetime.fromisoformat(text)).strftime("%Y-%m-%d %H:%M UTC")


def _time(text: str | None) -> str:
    return "—" if text is None else f'<time datetime="{_e(text)}">{_e(_shown(text))}</time>'


def _arm_name(protocol: ProtocolConfig, arm: str | None) -> str:
    for key, config in protocol.arms.items():
        if key == arm:
            return config.name
    return "Not randomized" if arm == NOT_RANDOMIZED else (arm or "—")


def _enrolment_table(n: Json, protocol: ProtocolConfig) -> str:
    enr = n["enrolment"]
    head = ("<tr><th>Site</th><th>Arm</th><th class=n>Screened</th><th class=n>Eligible</th>"
            "<th class=n>Enrolled</th><th class=n>Randomized</th>"
            "<th class=n>Doses given / planned</th><th class=n>Missed</th><th class=n>Held</th>"
            "<th class=n>Cancelled</th><th class=n>Withdrawn</th>"
            "<th class=n>Treatment discontinued</th><th class=n>Lost to follow-up</th>"
            "<th class=n>Died</th><th class=n>Completed</th></tr>")

    def row(site: str, arm: str, cells: dict[str, int], cls: str = "") -> str:
        tds = []
        for field in ("screened", "eligible", "enrolled", "randomized"):
            tds.append(f'<td class=n data-field="{field}">{cells[field]}</td>')
        tds.append(f'<td class=n data-field="doses" data-doses-given="{cells["doses_given"]}" '
                   f'data-doses-planned="{cells["doses_planned"]}">'
                   f'{cells["doses_given"]} / {cells["doses_planned"]}</td>')
        for field in ("doses_missed", "doses_held", "doses_cancelled", "withdrawn",
                      "treatment_discontinued", "lost_to_follow_up", "died", "completed"):
            tds.append(f'<td class=n data-field="{field}">{cells[field]}</td>')
        label = "All arms" if arm == "all" else _arm_name(protocol, arm)
        site_label = "All sites" if site == "all" else site
        return (f'<tr class="{cls}" data-site="{_e(site)}" data-arm="{_e(arm)}">'
                f"<th>{_e(site_label)}</th><td>{_e(label)}</td>{''.join(tds)}</tr>")

    body = []
    for site, block in enr["sites"].items():
        for arm, cells in block["by_arm"].items():
            if arm == NOT_RANDOMIZED and not any(cells.values()):
                continue
            body.append(row(site, arm, cells))
        body.append(row(site, "all", block["total"], "subtotal"))
    for arm, cells in enr["by_arm"].items():
        if arm == NOT_RANDOMIZED and not any(cells.values()):
            continue
        body.append(row("all", arm, cells, "subtotal"))
    body.append(row("all", "all", enr["total"], "total"))
    return (f'<table id="table-enrolment"><caption>Enrolment and dosing by site and arm'
            f"</caption><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")


def _ae_columns(n: Json) -> list[str]:
    ae = n["adverse_events"]["by_arm"]
    return [*ARMS, *([NOT_RANDOMIZED] if ae[NOT_RANDOMIZED]["total"] else [])]


def _ae_table(n: Json, protocol: ProtocolConfig) -> str:
    ae = n["adverse_events"]
    columns = _ae_columns(n)
    head = "".join(f'<th class=n data-arm="{a}">{_e(_arm_name(protocol, a))}</th>'
                   for a in columns) + "<th class=n>All</th>"

    def line(label: str, attr: str, value: Callable[[Json], int], extra: str = "") -> str:
        cells = "".join(f'<td class=n data-arm="{a}" {attr}="{value(ae["by_arm"][a])}"{extra}>'
                        f'{value(ae["by_arm"][a])}</td>' for a in columns)
        total = value(ae["total"])
        return (f"<tr><th>{_e(label)}</th>{cells}"
                f'<td class=n data-arm="all" {attr}="{total}"{extra}>{total}</td></tr>')

    rows = [line("Adverse events", "data-ae-total", lambda r: r["total"]),
            line("Patients with an adverse event", "data-ae-patients", lambda r: r["patients"])]
    for g in GRADES:
        rows.append(line(f"Grade {g} (worst)", "data-ae-count", _grade_count(g),
                         f' data-ae-grade="{g}"'))
    rows += [line("Serious", "data-ae-serious", lambda r: r["serious"]),
             line("Not serious", "data-ae-nonserious", lambda r: r["non_serious"]),
             line("Related (possible or more)", "data-ae-related", lambda r: r["related"]),
             line("SUSAR", "data-ae-susar", lambda r: r["susar"])]
    return (f'<table id="table-ae-by-arm"><caption>Adverse events per arm by CTCAE grade and '
            f"seriousness</caption><thead><tr><th></th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _grade_count(grade: int) -> Callable[[Json], int]:
    return lambda row: int(row["grades"].get(str(grade), 0))


def _soc_table(n: Json, protocol: ProtocolConfig) -> str:
    ae = n["adverse_events"]
    columns = _ae_columns(n)
    head = "".join(f'<th class=n data-arm="{a}">{_e(_arm_name(protocol, a))}</th>'
                   for a in columns) + "<th class=n>All</th>"
    rows = []
    for soc, total in ae["total"]["soc"].items():
        cells = "".join(
            f'<td class=n data-arm="{a}" data-soc="{_e(soc)}" '
            f'data-ae-count="{ae["by_arm"][a]["soc"].get(soc, 0)}">'
            f'{ae["by_arm"][a]["soc"].get(soc, 0)}</td>' for a in columns)
        rows.append(f"<tr><th>{_e(soc)}</th>{cells}"
                    f'<td class=n data-arm="all" data-soc="{_e(soc)}" data-ae-count="{total}">'
                    f"{total}</td></tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(columns) + 2}" class=muted>No adverse event.</td></tr>')
    return (f'<table id="table-ae-by-soc"><caption>Adverse events per arm by system organ class '
            f"(CTCAE v5)</caption><thead><tr><th>System organ class</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _clock_cell(clock: Json | None) -> str:
    if clock is None:
        return "—"
    flag = ""
    if clock.get("superseded"):
        flag = ' <span class="muted">(superseded)</span>'
    elif clock.get("overdue"):
        flag = ' <span class="overdue">overdue</span>'
    return f"{_time(clock['due_at'])}{flag}"


def _serious_table(n: Json, protocol: ProtocolConfig) -> str:
    clocks: dict[tuple[str, str], list[Json]] = {}
    for c in n["reporting_clocks"]:
        clocks.setdefault((c["adverse_event_id"], c["kind"]), []).append(c)
    rows = []
    for ev in n["adverse_events"]["events"]:
        if not ev["serious"] and not ev["susar"]:
            continue
        sae = clocks.get((ev["adverse_event_id"], "sae_initial_report"), [None])[0]
        susar = clocks.get((ev["adverse_event_id"], "susar_report"), [])
        susar_cell = "<br>".join(f"{c['days']} days: {_clock_cell(c)}" for c in susar) or "—"
        follow = clocks.get((ev["adverse_event_id"], "susar_follow_up_report"), [None])[0]
        term = _e(ev["term"]) + (f'<br><span class="muted">{_e(ev["decod"])}</span>'
                                 if ev["decod"] and ev["decod"] != ev["term"] else "")
        rows.append(
            f'<tr data-adverse-event="{_e(ev["adverse_event_id"])}" data-arm="{_e(ev["arm"])}" '
            f'data-susar="{str(ev["susar"]).lower()}">'
            f'<td><code>{_e(ev["adverse_event_id"][:8])}</code></td><td>{_e(ev["patient_id"])}</td>'
            f'<td>{_e(ev["site_id"])}</td><td>{_e(_arm_name(protocol, ev["arm"]))}</td>'
            f"<td>{term}</td><td>{_e(ev['soc'])}</td><td class=n>{ev['grade']}</td>"
            f"<td>{_e(ev['relatedness'])}</td><td>{'yes' if ev['expected'] else 'no'}</td>"
            f"<td>{_e(ev['outcome'] or 'not known')}</td><td>{_time(ev['onset_at'])}</td>"
            f"<td>{'<span class=yes>SUSAR</span>' if ev['susar'] else '—'}</td>"
            f"<td>{_clock_cell(sae)}</td><td>{susar_cell}</td><td>{_clock_cell(follow)}</td>"
            "</tr>")
    if not rows:
        rows.append('<tr><td colspan="15" class=muted>No serious adverse event.</td></tr>')
    head = ("<tr><th>Event</th><th>Patient</th><th>Site</th><th>Arm at onset</th><th>Term</th>"
            "<th>SOC</th><th class=n>Worst grade</th><th>Relatedness</th><th>Expected</th>"
            "<th>Outcome</th><th>Onset</th><th>SUSAR</th><th>SAE initial report due</th>"
            "<th>SUSAR report due</th><th>SUSAR follow-up report due</th></tr>")
    return (f'<table id="table-serious-events"><caption>Serious adverse events and SUSARs, with '
            f"their reporting deadlines</caption><thead>{head}</thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _clocks_table(n: Json) -> str:
    kinds = {"sae_initial_report": "SAE initial report", "susar_report": "SUSAR report",
             "susar_follow_up_report": "SUSAR follow-up report"}
    rows = []
    for c in n["reporting_clocks"]:
        span = f"{c['hours']} h" if "hours" in c else f"{c.get('days')} days"
        state = ("superseded" if c.get("superseded") else
                 "overdue" if c.get("overdue") else "open" if c.get("overdue") is False else "—")
        rows.append(
            f'<tr data-adverse-event="{_e(c["adverse_event_id"])}" data-kind="{_e(c["kind"])}" '
            f'data-due-at="{_e(c["due_at"])}" data-state="{state}">'
            f"<td>{_e(kinds.get(c['kind'], c['kind']))}</td>"
            f"<td><code>{_e(c['adverse_event_id'][:8])}</code></td><td>{_e(c['patient_id'])}</td>"
            f"<td>{_e(span)}</td><td>{_time(c['due_at'])}</td>"
            f"<td>{'<span class=overdue>overdue</span>' if state == 'overdue' else _e(state)}"
            "</td></tr>")
    if not rows:
        rows.append('<tr><td colspan="6" class=muted>No reporting deadline.</td></tr>')
    return ('<table id="table-reporting-clocks"><caption>Every reporting deadline, earliest '
            "first</caption><thead><tr><th>Report</th><th>Event</th><th>Patient</th>"
            "<th>Clock</th><th>Due</th><th>State at report time</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _posterior_table(n: Json, protocol: ProtocolConfig) -> str:
    post = n["posterior"]
    if post["rule_id"] is None:
        return ('<table id="table-posterior"><caption>No rule of this protocol version has a '
                "posterior.</caption><tbody></tbody></table>")
    rows = []
    for arm in ARMS:
        f = post["final"][arm]
        exceeded = bool(f["posterior_exceeded"])
        rows.append(
            f'<tr data-arm="{arm}"><th>{_e(_arm_name(protocol, arm))}</th>'
            f'<td class=n data-arm="{arm}" data-posterior-n="{f["posterior_n"]}">'
            f'{f["posterior_n"]}</td>'
            f'<td class=n data-arm="{arm}" data-toxicities="{f["toxicities"]}">'
            f'{f["toxicities"]}</td>'
            f'<td class=n data-arm="{arm}" data-posterior="{f["posterior_probability"]}">'
            f'{f["posterior_probability"]:.4f}</td>'
            f"<td>{'<span class=yes>yes</span>' if exceeded else 'no'}</td>"
            f"<td>{_e(f['status'])}</td></tr>")
    return (f'<table id="table-posterior"><caption>{_e(post["rule_id"])} now: patients dosed '
            f"(n), with a toxicity (k), and P(rate &gt; {_e(post['rate'])})</caption>"
            "<thead><tr><th>Arm</th><th class=n>n</th><th class=n>k</th>"
            "<th class=n>Posterior</th><th>Above threshold</th><th>Arm status</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _holds_table(n: Json) -> str:
    rows = [f'<tr data-hold="{_e(h["hold_id"])}"><td>{_e(h["kind"])}</td><td>{_e(h["scope"])}</td>'
            f'<td>{_e(h["target"])}</td><td>{_e(h["rule_id"])}</td>'
            f'<td>{_e(h["product"])}</td>'
            f'<td>{"DSMB" if h["decision_id"] else "rule"}</td></tr>'
            for h in n["holds_in_force"]]
    if not rows:
        rows.append('<tr><td colspan="6" class=muted>No hold in force.</td></tr>')
    return ('<table id="table-holds-in-force"><caption>Holds in force</caption><thead><tr>'
            "<th>Hold</th><th>Scope</th><th>Target</th><th>Rule</th><th>Product</th>"
            f"<th>Imposed by</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _timeline_table(n: Json) -> str:
    rows = []
    for r in n["timeline"]:
        cls = ' class="dsmb"' if r["dsmb"] else ""
        in_force = "" if r["in_force"] is None else ("in force" if r["in_force"] else "lifted")
        rows.append(
            f'<tr{cls} data-position="{r["position"]}" data-event="{_e(r["event"])}" '
            f'data-dsmb="{str(r["dsmb"]).lower()}">'
            f"<td class=n>{r['position']}</td><td>{_time(r['at'])}</td><td>{_e(r['event'])}</td>"
            f"<td>{_e(r['scope'])}</td><td>{_e(r['target'])}</td><td>{_e(r['rule_id'])}</td>"
            f"<td>{'DSMB' if r['dsmb'] else 'rule'}</td><td>{_e(r['decided_by'])}</td>"
            f"<td>{_e(r['rationale'])}</td><td>{_e(r['detail'])}</td><td>{in_force}</td></tr>")
    if not rows:
        rows.append('<tr><td colspan="11" class=muted>No rule fired, no hold, no DSMB decision.'
                    "</td></tr>")
    return ('<table id="table-safety-timeline"><caption>Rule firings, holds and DSMB decisions, '
            "in ledger order</caption><thead><tr><th class=n>Position</th><th>Recorded</th>"
            "<th>Event</th><th>Scope</th><th>Target</th><th>Rule</th><th>By</th>"
            "<th>Decided by</th><th>Rationale</th><th>Detail</th><th>Now</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _pasi_table(n: Json, protocol: ProtocolConfig) -> str:
    eff = n["efficacy"]
    head = "".join(f'<th class=n data-week="{w}">Week {w}</th>' for w in eff["weeks"])
    rows = []
    for arm in ARMS:
        cells = []
        for w in eff["weeks"]:
            c = eff["pasi75_nri"][arm][str(w)]
            text = ("—" if c["rate"] is None else
                    f"{c['count']}/{c['n']} {c['rate'] * 100:.1f} %<br>"
                    f"<span class=muted>{c['ci95'][0] * 100:.1f} to {c['ci95'][1] * 100:.1f}"
                    f"<br>{c['assessed']} assessed</span>")
            cells.append(f'<td class=n data-arm="{arm}" data-week="{w}" data-count="{c["count"]}" '
                         f'data-n="{c["n"]}" data-rate="{"" if c["rate"] is None else c["rate"]}"'
                         f">{text}</td>")
        rows.append(f'<tr data-arm="{arm}"><th>{_e(_arm_name(protocol, arm))} '
                    f'(n={eff["randomized"][arm]})</th>{"".join(cells)}</tr>')
    return (f'<table id="table-pasi75"><caption>PASI {eff["level"]} responders / randomized '
            "(non-responder imputation), rate and exact 95 % interval</caption>"
            f"<thead><tr><th>Arm</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _scroll(table: str) -> str:
    return f'<div class="scroll">{table}</div>'


def _figure(chart_id: str, svg: str, caption: str) -> str:
    return f'<figure id="{chart_id}">{svg}<figcaption>{caption}</figcaption></figure>'


def render(history: History, protocol: ProtocolConfig, generated_at: datetime,
           interim: bool = True) -> str:
    """The DSMB report as one self-contained HTML page (nothing it shows is fetched).

    `interim` False is the open report, for monitors: comparative interim safety data (adverse
    events and posteriors by arm) are the DSMB's alone (D35), so those parts are left out;
    enrolment, the holds and rule firings, and efficacy (which monitors read anyway) stay."""
    made = _utc(generated_at)
    n = numbers(history, protocol, now=made)
    made_iso = made.isoformat()
    last = history.facts[-1].time if history.facts else made
    until = max(made, _utc(last)) if history.facts else made
    post = n["posterior"]
    title = f"DSMB report — {protocol.trial_id} — ledger position {n['position']}"
    sections = [
        f"""<section id="enrolment"><h2>1. Enrolment and dosing</h2>
<p class="note">Patients by randomized arm (intention to treat); doses by the arm of their
calendar (after a crossover, the arm crossed into), as dosing records them: given, missed (window
closed), held (window closed under a safety hold), cancelled (withdrawal, discontinuation, end of
study, crossover). {len(n['enrolment']['crossovers'])} crossover(s).</p>
{_scroll(_enrolment_table(n, protocol))}
{_figure("chart-enrolment", _chart_enrolment(n, protocol, until),
         "Cumulative randomizations per arm over time (UTC), against the enrolment cap.")}
</section>""",
        """<section id="adverse-events"><h2>2. Adverse events</h2>
<p class="note">Adverse events by arm are comparative interim data: in the DSMB's report only
(the closed report).</p>
</section>""" if not interim else f"""<section id="adverse-events"><h2>2. Adverse events</h2>
<p class="note">Each adverse event counts once, in the arm the patient was on at its onset (as
the stopping rules read it), at the worst CTCAE grade any of its reports gave it; serious or
related if any report said so. System organ class from the CTCAE v5 term
({_e(UNCODED)}: a term the coder does not know).</p>
{_scroll(_ae_table(n, protocol))}
{_scroll(_soc_table(n, protocol))}
{_scroll(_serious_table(n, protocol))}
{_scroll(_clocks_table(n))}
</section>""",
        f"""<section id="stopping-rules"><h2>3. Stopping rules</h2>
{_scroll(_holds_table(n))}
{_scroll(_timeline_table(n))}
</section>""" if not interim else f"""<section id="stopping-rules"><h2>3. Stopping rules</h2>
<p class="note">{_e(post['rule_id'])}: for each arm, the posterior probability that the
toxicity rate exceeds {_e(post['rate'])} (Beta prior, k toxicities among n patients dosed),
recomputed after each safety fact in ledger order by the safety service's own code; the arm is
suspended when it exceeds {_e(post['threshold'])}. Triangles: the rule's firings.</p>
{_figure("chart-posterior", _chart_posterior(n, protocol, until),
         f"{_e(post['rule_id'])} posterior over time (UTC), per arm; dashed red line: the "
         f"stopping threshold {_e(post['threshold'])}.")}
{_scroll(_posterior_table(n, protocol))}
{_scroll(_holds_table(n))}
{_scroll(_timeline_table(n))}
</section>""",
        f"""<section id="efficacy"><h2>4. Efficacy</h2>
<p class="note">PASI {n['efficacy']['level']} per arm and assessment week, by randomized arm:
every randomized patient counts, a missing assessment or one after treatment discontinuation is
no response (NRI); exact Clopper-Pearson 95 % intervals. The same analysis as the efficacy
summary.</p>
{_figure("chart-pasi75", _chart_pasi(n, protocol),
         f"PASI {n['efficacy']['level']} rate (%) per arm and week, NRI, with exact 95 % "
         "intervals; weeks at which nobody has been assessed yet are not drawn.")}
{_scroll(_pasi_table(n, protocol))}
</section>""",
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generated-at" content="{_e(made_iso)}">
<meta name="ledger-position" content="{n['position']}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>DSMB report: {_e(protocol.trial_id)}</h1>
<p>UC-MSC low and high dose against methotrexate in moderate-to-severe plaque psoriasis.
{'<span class="confidential">CONFIDENTIAL: comparative interim data, for the DSMB</span>'
 if interim else '<span class="open">Open report: no comparative interim safety data</span>'}</p>
<dl class="meta" id="report-meta" data-generated-at="{_e(made_iso)}"
    data-ledger-position="{n['position']}" data-protocol-version="{_e(protocol.version)}">
<dt>Generated</dt><dd>{_time(made_iso)}</dd>
<dt>Ledger position</dt><dd>{n['position']} (every fact of the audit ledger up to this
position, and none after it)</dd>
<dt>Trial now</dt><dd id="trial-status" data-status="{_e(n['trial_status']['status'])}"
    data-enrollment="{_e(n['trial_status']['enrollment'])}">{_e(n['trial_status']['status'])},
enrolment {_e(n['trial_status']['enrollment'])}</dd>
<dt>Protocol</dt><dd>version {_e(protocol.version)}, safety rule set
{_e(protocol.safety.rule_set_version)}</dd>
</dl>
<nav><ol><li><a href="#enrolment">Enrolment and dosing</a></li>
<li><a href="#adverse-events">Adverse events</a></li>
<li><a href="#stopping-rules">Stopping rules</a></li>
<li><a href="#efficacy">Efficacy</a></li></ol></nav>
</header>
<main>
{"".join(sections)}
</main>
<footer><p class="note">Made from the audit ledger at position {n['position']} on
{_e(_shown(made_iso))}. Times in UTC.</p></footer>
</body>
</html>
"""
