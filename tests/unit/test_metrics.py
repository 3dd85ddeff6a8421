"""HTTP metrics in process: counted by route template, never by raw path (D28)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import Metrics, MetricsMiddleware, metrics_endpoint
from shared.web import RequestIdMiddleware, install_problem_handlers


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_requests_are_counted_by_template_and_status() -> None:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_api_route("/metrics", metrics_endpoint)
    install_problem_handlers(app)

    @app.get("/patients/{patient_id}")
    async def patient(patient_id: str) -> dict[str, str]:
        if patient_id == "boom":
            raise RuntimeError("a bug")
        return {"patient_id": patient_id}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        for pid in ("PT-1", "PT-2", "boom"):
            await c.get(f"/patients/{pid}")
        await c.get("/nowhere")
        text = (await c.get("/metrics")).text
    found = samples(text)
    key = (("method", "GET"), ("route", "/patients/{patient_id}"))
    assert found[("trial_http_requests_total", (*key, ("status", "200")))] == 2
    assert found[("trial_http_requests_total", (*key, ("status", "500")))] == 1
    assert found[("trial_http_requests_total",
                  (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert found[("trial_http_request_duration_seconds_count", key)] == 3
    assert "PT-1" not in text  # ids never become label values
