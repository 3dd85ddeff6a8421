"""The gateway's published documents: one OpenAPI built from the services' routers, and AsyncAPI."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fastapi.openapi.utils import get_openapi

from services.gateway.asyncapi import asyncapi_document
from services.gateway.routes import ROUTES, match_route

log = logging.getLogger(__name__)
TITLE = "NCT03424629 trial API"
VERSION = "1.0.0"
PROBLEM = {"description": "RFC 9457 problem", "content": {"application/problem+json": {
    "schema": {"$ref": "#/components/schemas/Problem"}}}}
PROBLEM_SCHEMA = {"type": "object", "required": ["type", "title", "status", "code"], "properties": {
    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
    "code": {"type": "string"}, "detail": {"type": "string"},
    "errors": {"type": "array", "items": {"type": "object"}}}}


def _service_document(service: str) -> dict[str, Any]:
    # Same codebase: the router is imported, never fetched, so the document needs no network.
    spec = importlib.import_module(f"services.{service}.app").spec
    return get_openapi(title=service, version=VERSION, routes=spec.router.routes)


def merged_openapi(gateway_paths: dict[str, Any]) -> dict[str, Any]:
    """Every public route of every service (what ROUTES forwards), plus the gateway's own."""
    paths: dict[str, Any] = dict(gateway_paths)
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    for service in sorted({r.service for r in ROUTES}):
        try:
            document = _service_document(service)
        except Exception as exc:  # one broken service must not take the others' docs away
            log.warning("no OpenAPI from %s: %r", service, exc)
            continue
        for path, operations in document.get("paths", {}).items():
            public = {m: op for m, op in operations.items()
                      if match_route(m.upper(), path) is not None}
            for op in public.values():
                op.setdefault("security", [{"bearer": []}])
                for status in ("401", "403", "404", "429", "502", "503", "504"):
                    op.setdefault("responses", {}).setdefault(status, PROBLEM)
            if public:
                paths.setdefault(path, {}).update(public)
        for name, schema in document.get("components", {}).get("schemas", {}).items():
            schemas.setdefault(name, schema)
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "The one public entry of the trial backend: bearer JWT, "
                                "Idempotency-Key on every POST, X-Request-ID on every response."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items())), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3 document of every topic (served at `/asyncapi.json`)."""
    return asyncapi_document()
