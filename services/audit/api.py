"""HTTP API of the audit ledger: the monitors' and the DSMB's query, history, verification, export."""

from __future__ import annotations

import json
import logging
from json.encoder import encode_basestring_ascii
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse

from services.audit import query
from services.audit.anchors import check_anchors, ledger_id, ledger_name, read_anchors
from services.audit.export import export_stream
from services.audit.query import Filters
from shared.catchup import unless_lagging
from shared.deps import CurrentPrincipal, CurrentRuntime
from shared.errors import Refused
from shared.events import ENROLLMENT
from shared.permissions import Action, authorize
from shared.web import IsoDateTime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/audit", tags=["audit"])
HISTORY_ORDER = json.dumps("source time; a cause always before its effects")


async def filters(patient_id: str | None = None, type: str | None = None,
                  source: str | None = None, actor: str | None = None,
                  since: IsoDateTime | None = None, until: IsoDateTime | None = None,
                  correlation_id: str | None = None) -> Filters:
    """`since` inclusive, `until` exclusive, both on the event's own time (UTC)."""
    return Filters(patient_id, type, source, actor, since, until, correlation_id)


LedgerFilters = Annotated[Filters, Depends(filters)]


@router.get("/events")
async def list_events(
    who: CurrentPrincipal, rt: CurrentRuntime, chosen: LedgerFilters,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$")] = None,
) -> dict[str, object]:
    """Ledger order (arrival order); `next_cursor` continues after the last entry returned."""
    authorize(who, Action.AUDIT)
    found = await query.page(rt.store, chosen, int(cursor or 0), limit + 1)
    more = len(found) > limit
    items = found[:limit]
    return {"items": items, "next_cursor": str(items[-1]["position"]) if more else None}


@router.get("/patients/{patient_id}/history", response_model=dict[str, object])
async def patient_history(patient_id: str, who: CurrentPrincipal, rt: CurrentRuntime) -> Response:
    """Everything about one patient across services, from screening on, causes before effects.

    `{"patient_id", "order", "items": [entry...]}`; the body is encoded once, each entry's JSON
    text built from the stored row (`query.patient_history_json`)."""
    authorize(who, Action.AUDIT)
    async def history() -> list[str]:
        found = await query.patient_history_json(rt.store, patient_id)
        if not found:
            raise Refused("patient_not_found", "The ledger holds nothing about this patient")
        return found

    # The ledger learns of a patient from Kafka: it waits for its consumer before "unknown".
    items = await unless_lagging(rt, ENROLLMENT, patient_id, history)
    body = (f'{{"patient_id":{encode_basestring_ascii(patient_id)},"order":{HISTORY_ORDER},'
            f'"items":[{",".join(items)}]}}')
    return Response(body.encode(), media_type="application/json")


@router.get("/verify")
async def verify(who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, object]:
    """The chain from position 1, then every anchor published for this ledger (D27).

    `anchors_checked` is null when the broker could not be read: then `ok` speaks for the chain
    alone. A monitor who keeps `head_position` and `head_hash` holds an anchor of their own.
    """
    authorize(who, Action.AUDIT)
    result = await rt.store.verify()
    checked: int | None = None
    mismatch: int | None = None
    through: int | None = None
    own = await ledger_id(rt.store)
    ledger, renamed = ledger_name(own, rt.settings.audit_ledger_id)
    if ledger is not None:
        try:
            found = await check_anchors(rt.store, await read_anchors(rt.settings, ledger))
            checked, mismatch, through = found.checked, found.first_mismatch, found.through
        except Exception as exc:  # the broker is away: the chain is still checked
            log.warning("could not read the audit anchors: %r", exc)
    else:
        checked = 0
    return {"ok": result.ok and mismatch is None and not renamed,
            "events_checked": result.events_checked,
            "first_broken_position": result.first_broken_position,
            "head_position": result.events_checked if result.ok else None,
            "head_hash": result.last_hash if result.ok else None,
            "anchors_checked": checked, "first_anchor_mismatch": mismatch,
            "anchored_through": through, "ledger": own,
            "pinned_ledger": rt.settings.audit_ledger_id, "pinned_ledger_mismatch": renamed}


@router.get("/export")
async def export(who: CurrentPrincipal, rt: CurrentRuntime, chosen: LedgerFilters,
                 format: Literal["ndjson", "csv"] = "ndjson") -> StreamingResponse:
    """The filtered ledger as NDJSON or CSV, streamed in ledger order."""
    authorize(who, Action.AUDIT)
    media = "application/x-ndjson" if format == "ndjson" else "text/csv; charset=utf-8"
    return StreamingResponse(
        export_stream(rt.store, chosen, format), media_type=media,
        headers={"content-disposition": f'attachment; filename="audit-ledger.{format}"'})
