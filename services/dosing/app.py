"""The dosing service process: `uvicorn services.dosing.app:app`."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import Gauge

from services.dosing.api import router
from services.dosing.commands import fail_closed_on_safety_record, unapplied_safety_records
from services.dosing.handlers import handlers
from services.dosing.sweep import Sweeper
from shared.app import create_app, run_beside
from shared.clock import SystemClock
from shared.events import ENROLLMENT, SAFETY
from shared.runtime import Loop, Runtime, ServiceSpec
from shared.settings import Settings


async def safety_records_applied(rt: Runtime) -> dict[str, bool]:
    """Not ready while a trial.safety record it could not apply is unresolved (D32)."""
    return {"safety_records_applied": not await unapplied_safety_records(rt.store)}


spec = ServiceSpec(name="dosing", router=router, consumes=[ENROLLMENT, SAFETY], handlers=handlers,
                   fail_closed={SAFETY: fail_closed_on_safety_record},
                   ready=safety_records_applied)


def create_dosing_app(settings: Settings | None = None) -> FastAPI:
    """The service app plus its missed-visit sweep, which runs beside the relay and consumer."""
    settings = settings or Settings(service_name="dosing")
    app = create_app(spec, settings)  # reads the protocol: a bad version folder stops the start
    app.state.clock = SystemClock()
    unapplied = Gauge("trial_safety_records_unapplied", "trial.safety records dosing could not "
                      "apply and no operator has resolved: the doses they concern are refused",
                      registry=app.state.metrics.registry)
    refresh_service_metrics = app.state.refresh_metrics

    async def refresh() -> None:
        await refresh_service_metrics()
        rt: Runtime | None = getattr(app.state, "runtime", None)
        if rt is not None:
            unapplied.set(len(await unapplied_safety_records(rt.store)))

    app.state.refresh_metrics = refresh

    def start_sweeper(app: FastAPI) -> Loop:
        rt = app.state.runtime
        app.state.sweeper = Sweeper(rt.store, app.state.clock, rt.protocol,
                                    settings.dosing_sweep_interval_s)
        return app.state.sweeper.run

    run_beside(app, start_sweeper)
    return app


app = create_dosing_app()
