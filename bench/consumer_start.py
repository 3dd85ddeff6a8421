"""How long after a service starts its consumer reads: app start to the first partition assigned.

Run: `.venv/bin/python -m bench.consumer_start [--session-ms 2000] [--runs 5]` (embedded broker).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from deploy import infra
from services.safety.app import spec
from shared.app import create_app
from shared.settings import Settings


async def measure(session_ms: int, runs: int) -> list[float]:
    folder = Path(tempfile.mkdtemp())
    port = infra.free_port()
    bootstrap = infra.start_tansu(port, state_dir=folder / "broker")
    took: list[float] = []
    try:
        for n in range(runs):
            settings = Settings(service_name=f"safety-{n}", kafka_bootstrap_servers=bootstrap,
                                database_url=f"sqlite+aiosqlite:///{folder / f's{n}.db'}",
                                kafka_session_timeout_ms=session_ms)
            app = create_app(spec, settings)
            started = time.monotonic()
            async with app.router.lifespan_context(app):
                await app.state.runtime.consumer.reading.wait()
                took.append(time.monotonic() - started)
    finally:
        infra.stop_tansu(port, state_dir=folder / "broker")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--session-ms", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    took = asyncio.run(measure(args.session_ms, args.runs))
    print(f"session {args.session_ms} ms: reading after {statistics.median(took):.2f} s "
          f"(median of {len(took)}; max {max(took):.2f} s)")


if __name__ == "__main__":
    main()
