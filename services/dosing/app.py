"""The dosing service process: `uvicorn services.dosing.app:app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.dosing.api import router
from services.dosing.commands import (
    fail_closed_on_safety_record,
    sweep_missed_visits,
    unapplied_safety_records,
)
from services.dosing.handlers import handlers
from shared.app import create_app, run_beside
from shared.clock import clock_for
from shared.events import EFFICACY, ENROLLMENT, SAFETY
from shared.runtime import Loop, ServiceSpec
from shared.settings import Settings
from shared.sweep import Sweeper

spec = ServiceSpec(name="dosing", router=router, consumes=[ENROLLMENT, SAFETY, EFFICACY], handlers=handlers,
                   fail_closed={SAFETY: fail_closed_on_safety_record},
                   unapplied=unapplied_safety_records,
                   # Every dose first waits for the consumer (having_read), cutting it short (D84).
                   consumer_linger_ms=100)


def create_dosing_app(settings: Settings | None = None) -> FastAPI:
    """The service app plus its missed-visit sweep, which runs beside the relay and consumer."""
    settings = settings or Settings(service_name="dosing")
    app = create_app(spec, settings)  # reads the protocol: a bad version folder stops the start
    app.state.clock = clock_for(settings.clock_file)

    def start_sweeper(app: FastAPI) -> Loop:
        rt = app.state.runtime
        app.state.sweeper = Sweeper(
            lambda clock: sweep_missed_visits(rt.store, clock, rt.protocol), app.state.clock,
            settings.dosing_sweep_interval_s, "missed-visit")
        return app.state.sweeper.run

    run_beside(app, start_sweeper)
    return app


app = create_dosing_app()
