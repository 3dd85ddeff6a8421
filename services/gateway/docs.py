"""The gateway's published documents: one OpenAPI built from the services' routers, and AsyncAPI."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from services.gateway.routes import ROUTES, match_route
from shared.events import CATALOGUE, TOPICS, CloudEvent

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


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return schema


def minimal_asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3 document generated from the event catalogue: each topic, each event."""
    components: dict[str, Any] = {}
    components["CloudEvent"] = _schema(CloudEvent, components)
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {t: {"address": t, "messages": {}} for t in TOPICS}
    for name, cls in CATALOGUE.items():
        components[name] = _schema(cls, components)
        messages[name] = {
            "name": name, "contentType": "application/cloudevents+json",
            "summary": f"{name} (subject: {cls.subject_field}, schemaversion {cls.schema_version})",
            "payload": {"allOf": [{"$ref": "#/components/schemas/CloudEvent"}, {
                "type": "object", "properties": {
                    "type": {"const": name},
                    "data": {"$ref": f"#/components/schemas/{name}"}}}]},
        }
        channels[cls.topic]["messages"][name] = {"$ref": f"#/components/messages/{name}"}
    operations = {f"receive-{t}": {"action": "receive", "channel": {"$ref": f"#/channels/{t}"}}
                  for t in TOPICS}
    return {"asyncapi": "3.0.0",
            "info": {"title": f"{TITLE}: events", "version": VERSION},
            "defaultContentType": "application/cloudevents+json",
            "channels": channels, "operations": operations,
            "components": {"schemas": components, "messages": messages}}


def asyncapi() -> dict[str, Any]:
    """The dosing area's document when it exists (shared/asyncapi.py), else the catalogue's."""
    try:
        module = importlib.import_module("shared.asyncapi")
    except ImportError:
        return minimal_asyncapi()
    document: dict[str, Any] = module.asyncapi_document()
    return document
