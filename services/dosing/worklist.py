"""Pure site worklists: a site's patients with their next visit, and the visits due, overdue or
missed in a range of the site's own dates, paged by an opaque cursor. No I/O.

A visit's worklist status, on the site's today:
- `due`: not done yet and its window has not closed (today or ahead);
- `overdue`: its window closed (the day after `window_end`, in the site's zone) and it was not
  done; the sweeps record it as missed soon after;
- `missed`: recorded missed (VisitMissed, from dosing or efficacy).
The `overdue` filter returns both of the last two: everything whose window closed undone, what
the site must chase; `missed` only what was recorded so.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from services.dosing.domain import DosingRecord, Slot
from shared.errors import Refused

VisitFilter = Literal["due", "overdue", "missed"]


def encode_cursor(key: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[Any, ...] | None:
    if cursor is None:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Refused("bad_cursor", "The cursor is not one this API gave") from None
    if not isinstance(key, list):
        raise Refused("bad_cursor", "The cursor is not one this API gave")
    return tuple(key)


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def page(rows: Iterable[tuple[tuple[Any, ...], dict[str, Any]]], limit: int,
         cursor: str | None) -> Page:
    """Rows sorted by key; those after the cursor's key, `limit` of them, and the next cursor."""
    after = decode_cursor(cursor)
    ordered = sorted(rows, key=lambda r: r[0])
    if after is not None:
        if ordered and [type(v) for v in after] != [type(v) for v in ordered[0][0]]:
            raise Refused("bad_cursor", "The cursor is not one this API gave")
        ordered = [r for r in ordered if r[0] > after]
    chosen = ordered[:limit]
    more = len(ordered) > limit
    return Page([item for _, item in chosen], encode_cursor(chosen[-1][0]) if more else None)


def _visit_item(record: DosingRecord, slot: Slot, status: str) -> dict[str, Any]:
    v = slot.visit
    return {"patient_id": record.patient_id, "site_id": record.site_id, "arm": slot.arm,
            "week": v.week, "kind": v.kind, "due_date": str(v.due_date),
            "window_start": str(v.window_start), "window_end": str(v.window_end),
            "status": status}


def visit_status(slot: Slot, today: date) -> str | None:
    """The slot's worklist status, or None when it is off the worklist (done, given, held,
    cancelled)."""
    if slot.status == "missed":
        return "missed"
    if slot.status != "planned":
        return None
    return "overdue" if slot.visit.window_end < today else "due"


def next_visit(record: DosingRecord, today: date) -> dict[str, Any] | None:
    """The earliest visit not done whose window has not closed."""
    open_ = [s for s in record.slots() if visit_status(s, today) == "due"]
    if not open_:
        return None
    s = min(open_, key=lambda s: (s.visit.due_date, s.visit.kind != "assessment"))
    return {k: v for k, v in _visit_item(record, s, "due").items()
            if k not in ("patient_id", "site_id")}


def patients(records: Iterable[DosingRecord], today_at: Callable[[str], date],
             status: str | None, limit: int, cursor: str | None) -> Page:
    rows = []
    for r in records:
        if r.patient_id is None or r.site_id is None or r.current is None:
            continue
        if status is not None and r.status != status:
            continue
        today = today_at(r.site_id)
        overdue = sum(visit_status(s, today) in ("overdue", "missed") for s in r.slots())
        rows.append(((r.patient_id,), {
            "patient_id": r.patient_id, "site_id": r.site_id, "arm": r.current.arm,
            "status": r.status, "next_visit": next_visit(r, today),
            "visits_overdue": overdue}))
    return page(rows, limit, cursor)


def visits(records: Iterable[DosingRecord], today_at: Callable[[str], date],
           start: date | None, end: date | None, status: VisitFilter | None, limit: int,
           cursor: str | None) -> Page:
    rows = []
    for r in records:
        if r.patient_id is None or r.site_id is None:
            continue
        today = today_at(r.site_id)
        for s in r.slots():
            found = visit_status(s, today)
            if found is None:
                continue
            if status is not None and not (found == status or (status, found) == (
                    "overdue", "missed")):
                continue
            if (start is not None and s.visit.due_date < start) or (
                    end is not None and s.visit.due_date > end):
                continue
            key = (str(s.visit.due_date), r.patient_id, s.visit.week, s.visit.kind)
            rows.append((key, _visit_item(r, s, found)))
    return page(rows, limit, cursor)
