"""HTTP API of what the ledger is turned into for its readers: the DSMB report (HTML), CDISC SDTM
exports (CSV, SAS transport) and FHIR R4 views. Each reads the ledger as typed facts
(`query.history`) and hands them to a pure builder."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from services.audit import dsmb_report, fhir, query, sdtm
from shared.deps import CurrentPrincipal, CurrentProtocol, CurrentRuntime
from shared.errors import Refused
from shared.permissions import Action, allowed, authorize
from shared.settings import Settings
from shared.store import utcnow

router = APIRouter(prefix="/v1", tags=["reports"])
FHIR_JSON = "application/fhir+json"
PatientId = Annotated[str | None, Query(max_length=64)]


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


@router.get("/reports/dsmb", response_class=HTMLResponse)
async def dsmb(who: CurrentPrincipal, rt: CurrentRuntime, protocol: CurrentProtocol
               ) -> HTMLResponse:
    """The DSMB report from the whole ledger, one self-contained page. The DSMB and admins get
    the closed report; monitors the open one, without comparative interim safety data (D35)."""
    authorize(who, Action.READ_REPORTS)
    history = await query.history(rt.store)
    page = dsmb_report.render(history, protocol, utcnow(),
                              interim=allowed(who, Action.READ_INTERIM_DATA))
    return HTMLResponse(page, headers={"X-Ledger-Position": str(history.position),
                                       "Cache-Control": "no-store"})


SdtmDomain = Literal["DM", "EX", "AE", "DS", "QS", "SV"]


@router.get("/exports/sdtm")
async def sdtm_metadata(who: CurrentPrincipal) -> dict[str, Any]:
    """Every domain's variables: name, label, type, length, core (SDTMIG 3.4)."""
    authorize(who, Action.READ_REPORTS)
    return sdtm.metadata()


@router.get("/exports/sdtm/{domain}")
async def sdtm_export(domain: SdtmDomain, who: CurrentPrincipal, rt: CurrentRuntime,
                      protocol: CurrentProtocol,
                      format: Literal["csv", "xpt"] = "csv") -> Response:
    """One SDTM domain from the whole ledger: CSV (the header row is the variable names) or SAS
    transport v5. `X-Ledger-Position` says which ledger position it reflects."""
    authorize(who, Action.READ_REPORTS)
    history = await query.history(rt.store)
    data = sdtm.dataset(history, domain, protocol.trial_id)
    headers = {"X-Ledger-Position": str(history.position),
               "content-disposition": f'attachment; filename="{domain.lower()}.{format}"'}
    if format == "csv":
        return Response(sdtm.to_csv(data), media_type="text/csv; charset=utf-8", headers=headers)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{domain.lower()}.xpt"
        sdtm.to_xpt(data, path)
        body = path.read_bytes()
    return Response(body, media_type="application/x-sas-xport", headers=headers)


def _base(request: Request, settings: Settings) -> str:
    """The public base of the FHIR views: the system's (`TRIAL_PUBLIC_URL`, the gateway's),
    never the audit service's own address behind it; unset, as the caller reached it."""
    return (settings.public_url or str(request.base_url)).rstrip("/") + "/v1/fhir"


@router.get("/fhir/ResearchStudy/{study_id}", response_class=FhirResponse)
async def research_study(study_id: str, who: CurrentPrincipal, rt: CurrentRuntime,
                         protocol: CurrentProtocol) -> dict[str, Any]:
    authorize(who, Action.READ_REPORTS)
    if study_id != protocol.trial_id:
        raise Refused("resource_not_found", f"No ResearchStudy {study_id}")
    return fhir.research_study(await query.history(rt.store), protocol)


@router.get("/fhir/ResearchSubject", response_class=FhirResponse)
async def research_subjects(request: Request, who: CurrentPrincipal, rt: CurrentRuntime,
                            protocol: CurrentProtocol, patient: PatientId = None
                            ) -> dict[str, Any]:
    """A searchset Bundle: every subject, or the one `patient` names."""
    authorize(who, Action.READ_REPORTS)
    return fhir.search_research_subjects(await query.history(rt.store), protocol, patient,
                                         base=_base(request, rt.settings))


@router.get("/fhir/AdverseEvent", response_class=FhirResponse)
async def adverse_events(request: Request, who: CurrentPrincipal, rt: CurrentRuntime,
                         protocol: CurrentProtocol, patient: PatientId = None) -> dict[str, Any]:
    authorize(who, Action.READ_REPORTS)
    return fhir.search_adverse_events(await query.history(rt.store), patient,
                                      study_id=protocol.trial_id, base=_base(request, rt.settings))
