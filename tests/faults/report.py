"""The fault table: one row per fault injected, printed, and appended as one JSON line each to the
file `TRIAL_FAULTS_REPORT` names (when set), so that docs/faults.md can be filled from a run.

Columns: fault | service | writes acknowledged | lost | duplicated | duplicates on Kafka | time to
recover. "duplicated" counts duplicated effects (a write or a consumed event that changed a store
twice); "duplicates on Kafka" counts event ids published more than once, which consumers drop by
id: the two are kept apart. The JSON line holds every figure of the row and its `detail`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import BACKEND

COLUMNS = ("fault", "service", "writes acknowledged", "lost", "duplicated",
           "duplicates on Kafka", "time to recover")
REPORT_VARIABLE = "TRIAL_FAULTS_REPORT"


@dataclass
class Row:
    """What one fault did: the writes acknowledged while it lasted (from the fault to the next
    one), how many of them are missing from their store or took effect twice, the events of the
    service published twice, and how long the service took to be ready again and to acknowledge
    a write again (seconds from the fault)."""

    fault: str
    service: str
    acknowledged: int
    lost: int
    duplicated: int
    kafka_duplicates: int
    ready_s: float | None = None
    first_write_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> tuple[str, ...]:
        recover = "-"
        if self.ready_s is not None:
            recover = f"ready {self.ready_s:.1f} s"
            recover += (", no write served again" if self.first_write_s is None
                        else f", first write {self.first_write_s:.1f} s")
        return (self.fault, self.service, str(self.acknowledged), str(self.lost),
                str(self.duplicated), str(self.kafka_duplicates), recover)


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def publish(rows: Sequence[Row], test: str, path: str | None = None) -> str:
    """Print the table and append each row as a JSON line to `path` (default: the file
    `TRIAL_FAULTS_REPORT` names; nothing written when unset). Returns the table."""
    text = table(rows)
    print(f"\n{test} ({BACKEND} backend)\n{text}")
    target = path if path is not None else os.environ.get(REPORT_VARIABLE)
    if target:
        at = datetime.now(UTC).isoformat(timespec="seconds")
        with Path(target).open("a") as out:
            for row in rows:
                out.write(json.dumps({"test": test, "backend": BACKEND, "at": at, **asdict(row)},
                                     default=str) + "\n")
    return text


def from_file(path: str) -> str:
    """The Markdown tables of a report file, one per backend (with each row's backend and test
    in the fault cell), as docs/faults.md shows them."""
    by_backend: dict[str, list[Row]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        fields = {k: entry[k] for k in Row.__dataclass_fields__ if k in entry}
        by_backend.setdefault(entry["backend"], []).append(Row(**fields))
    return "\n\n".join(f"**{backend}**\n\n{table(rows)}" for backend, rows in by_backend.items())


if __name__ == "__main__":  # python -m tests.faults.report <report file>
    import sys

    print(from_file(sys.argv[1]))
