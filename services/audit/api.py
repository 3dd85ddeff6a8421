"""HTTP API of the audit ledger: the monitors' and the DSMB's query and verification."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Query

from shared.auth import Principal
from shared.schema import events
from shared.service import CurrentPrincipal, CurrentRuntime
from shared.store import as_utc
from shared.web import Problem

router = APIRouter(prefix="/v1/audit", tags=["audit"])
AUDIT_ROLES = {"monitor", "dsmb", "admin"}
SCAN_BATCH = 500


def _require_auditor(who: Principal) -> None:
    if who.role not in AUDIT_ROLES:
        raise Problem(403, "forbidden", f"Role {who.role} may not read the audit trail")


def _item(row: dict[str, object]) -> dict[str, object]:
    meta = row["metadata"]
    assert isinstance(meta, dict)
    return {
        "position": row["position"], "event_id": row["event_id"], "type": row["type"],
        "source": meta.get("source"), "subject": meta.get("subject"), "time": meta.get("time"),
        "actor": {"sub": meta.get("actor"), "role": meta.get("role"), "site": meta.get("site")},
        "correlation_id": meta.get("correlation_id"), "reason": meta.get("reason"),
        "recorded_at": row["recorded_at"], "data": row["data"], "hash": row["hash"],
    }


@router.get("/events")
async def list_events(
    who: CurrentPrincipal, rt: CurrentRuntime,
    patient_id: str | None = None, type: str | None = None, source: str | None = None,
    actor: str | None = None, since: datetime | None = None, until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$")] = None,
) -> dict[str, object]:
    """Ledger order; `next_cursor` continues after the last entry examined."""
    _require_auditor(who)
    after = int(cursor) if cursor else 0
    items: list[dict[str, object]] = []
    async with rt.store.read_engine.connect() as conn:
        while True:
            q = events.select().where(events.c.position > after).order_by(
                events.c.position).limit(SCAN_BATCH)
            if patient_id is not None:
                q = q.where(events.c.stream_id == patient_id)
            if type is not None:
                q = q.where(events.c.type == type)
            rows = [dict(r._mapping) for r in await conn.execute(q)]
            for row in rows:
                after = int(str(row["position"]))
                if _matches(row, source, actor, since, until):
                    items.append(_item(row))
                    if len(items) == limit:
                        more = await _has_more(rt, after, patient_id, type)
                        return {"items": items, "next_cursor": str(after) if more else None}
            if len(rows) < SCAN_BATCH:
                return {"items": items, "next_cursor": None}


async def _has_more(rt: CurrentRuntime, after: int, patient_id: str | None,
                    type: str | None) -> bool:
    q = sa.select(events.c.position).where(events.c.position > after).limit(1)
    if patient_id is not None:
        q = q.where(events.c.stream_id == patient_id)
    if type is not None:
        q = q.where(events.c.type == type)
    async with rt.store.read_engine.connect() as conn:
        return (await conn.execute(q)).first() is not None


def _matches(row: dict[str, object], source: str | None, actor: str | None,
             since: datetime | None, until: datetime | None) -> bool:
    meta = row["metadata"]
    assert isinstance(meta, dict)
    if source is not None and meta.get("source") != source:
        return False
    if actor is not None and meta.get("actor") != actor:
        return False
    if since is not None or until is not None:
        when = as_utc(datetime.fromisoformat(str(meta.get("time"))))
        if since is not None and when < as_utc(since):
            return False
        if until is not None and when >= as_utc(until):
            return False
    return True


@router.get("/verify")
async def verify(who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    _require_auditor(who)
    result = await rt.store.verify()
    return {"ok": result.ok, "events_checked": result.events_checked,
            "first_broken_position": result.first_broken_position}
