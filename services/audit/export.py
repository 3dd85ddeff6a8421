"""The ledger as a file: NDJSON (one entry a line) or CSV (one flat row an entry), streamed."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from services.audit.query import Filters, entry_json, raw_entry, scanning
from shared.store import EventStore

# Rows a page: each page is one query by position and one chunk sent, so memory stays flat.
BATCH = 1000
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
    return csv_lines([values])


def csv_lines(rows: Iterable[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


async def export_stream(store: EventStore, filters: Filters, fmt: str) -> AsyncIterator[bytes]:
    """The filtered ledger in ledger order, a chunk a page of rows read undecoded (`scan`).

    An NDJSON line is `query.entry_json`: the entry's fields encoded once, the data's stored
    JSON text embedded. A CSV row needs the data decoded, for its canonical (sorted) cell."""
    if fmt == "csv":
        yield csv_line(list(CSV_COLUMNS)).encode()
    async with scanning(store, filters.where(), BATCH) as pages:
        async for rows in pages:
            if fmt == "csv":
                yield csv_lines(csv_row(raw_entry(row)) for row in rows).encode()
            else:
                yield "".join(entry_json(row)[1] + "\n" for row in rows).encode()
