"""The ledger as a file: NDJSON (one entry a line) or CSV (one flat row an entry), streamed."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from services.audit.query import Filters, page
from shared.store import EventStore

BATCH = 500
CSV_COLUMNS = ("position", "event_id", "time", "recorded_at", "type", "source", "topic",
               "subject", "actor_sub", "actor_role", "actor_site", "correlation_id",
               "causation_id", "reason", "data", "prev_hash", "hash")


def csv_row(item: dict[str, Any]) -> list[Any]:
    actor = item["actor"]
    flat = {**item, "actor_sub": actor["sub"], "actor_role": actor["role"],
            "actor_site": actor["site"],
            "data": json.dumps(item["data"], sort_keys=True, separators=(",", ":"))}
    return [_cell(flat.get(c)) for c in CSV_COLUMNS]


def _cell(value: Any) -> Any:
    # A text cell starting like a formula would run in a spreadsheet; quote it as text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return "" if value is None else value


def csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


async def export_stream(store: EventStore, filters: Filters, fmt: str) -> AsyncIterator[bytes]:
    if fmt == "csv":
        yield csv_line(list(CSV_COLUMNS)).encode()
    after = 0
    while items := await page(store, filters, after, BATCH):
        yield "".join(csv_line(csv_row(item)) if fmt == "csv"
                      else json.dumps(item, separators=(",", ":"), default=str) + "\n"
                      for item in items).encode()
        after = items[-1]["position"]
