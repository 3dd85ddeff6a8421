"""The dosing service process: `uvicorn services.dosing.app:app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.dosing.api import router
from services.dosing.config import protocol
from services.dosing.handlers import HANDLERS
from services.dosing.sweep import Sweeper
from shared.clock import SystemClock
from shared.events import ENROLLMENT, SAFETY
from shared.service import Loop, ServiceSpec, create_app, run_beside
from shared.settings import Settings

spec = ServiceSpec(name="dosing", router=router, consumes=[ENROLLMENT, SAFETY], handlers=HANDLERS)


def create_dosing_app(settings: Settings | None = None) -> FastAPI:
    """The service app plus its missed-visit sweep, which runs beside the relay and consumer."""
    settings = settings or Settings(service_name="dosing")
    protocol()  # a protocol configuration that does not validate stops start-up, not a visit
    app = create_app(spec, settings)
    app.state.clock = SystemClock()

    def start_sweeper(app: FastAPI) -> Loop:
        app.state.sweeper = Sweeper(app.state.runtime.store, app.state.clock,
                                    settings.dosing_sweep_interval_s)
        return app.state.sweeper.run

    run_beside(app, start_sweeper)
    return app


app = create_dosing_app()
