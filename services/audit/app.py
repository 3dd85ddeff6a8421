"""The audit ledger process: `uvicorn services.audit.app:app`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from prometheus_client import Gauge

from services.audit import api, reports
from services.audit.anchors import Anchorer
from services.audit.commands import record_view
from services.audit.handlers import handlers
from services.audit.views import ViewPublisher
from shared.app import create_app, run_beside
from shared.events import LEDGER_TOPICS
from shared.runtime import Loop, ServiceSpec
from shared.settings import Settings

# The ledger's queries (/v1/audit/...) and what is made of it (/v1/reports, /v1/exports, /v1/fhir).
router = APIRouter(routes=[*api.router.routes, *reports.router.routes])
spec = ServiceSpec(name="audit", router=router, consumes=list(LEDGER_TOPICS), handlers=handlers,
                   publishes=False, record_view=record_view,
                   # A monitor's read a moment later decides nothing; an unknown patient waits (D84).
                   consumer_linger_ms=100)


def create_audit_app(settings: Settings | None = None) -> FastAPI:
    """The ledger plus its anchorer, which publishes the verified chain head (D27)."""
    settings = settings or Settings(service_name="audit")
    app = create_app(spec, settings)

    def start_anchorer(app: FastAPI) -> Loop:
        anchorer = app.state.anchorer = Anchorer(app.state.runtime.store, settings)
        Gauge("trial_audit_anchored_position", "Ledger position of the last anchor published",
              registry=app.state.metrics.registry).set_function(lambda: anchorer.anchored_position)
        return anchorer.run

    run_beside(app, start_anchorer)
    def start_views(app: FastAPI) -> Loop:
        views = ViewPublisher(app.state.runtime.store, settings)
        Gauge("trial_audit_views_published_through",
              "Ledger position through which the reads made through the audit service are on "
              "trial.access", registry=app.state.metrics.registry).set_function(
            lambda: views.through)
        return views.run

    # The reads made through it, on trial.access too: the one entry no topic carried (D93);
    # published as a relay publishes, so not where relays are off.
    if settings.relay_enabled:
        run_beside(app, start_views)
    return app


app = create_audit_app()
