"""The efficacy service process: `uvicorn services.efficacy.app:app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.efficacy.api import router
from services.efficacy.commands import sweep_missed_assessments
from services.efficacy.handlers import handlers
from shared.app import create_app, run_beside
from shared.clock import clock_for
from shared.events import DOSING, ENROLLMENT, SAFETY
from shared.runtime import Loop, ServiceSpec
from shared.settings import Settings
from shared.sweep import Sweeper

spec = ServiceSpec(name="efficacy", router=router, consumes=[ENROLLMENT, DOSING, SAFETY],
                   handlers=handlers,
                   # Every assessment first waits for the consumer, cutting it short (D84).
                   consumer_linger_ms=100)


def create_efficacy_app(settings: Settings | None = None) -> FastAPI:
    """The service app plus its missed-assessment sweep, beside the relay and consumer."""
    settings = settings or Settings(service_name="efficacy")
    app = create_app(spec, settings)
    app.state.clock = clock_for(settings.clock_file)

    def start_sweeper(app: FastAPI) -> Loop:
        rt = app.state.runtime
        app.state.sweeper = Sweeper(
            lambda clock: sweep_missed_assessments(rt.store, clock, rt.protocol),
            app.state.clock, settings.efficacy_sweep_interval_s, "missed-assessment")
        return app.state.sweeper.run

    run_beside(app, start_sweeper)
    return app


app = create_efficacy_app()
