"""The gateway's documents, built in process from the services' routers and the catalogue."""

from __future__ import annotations

import importlib
import re
from typing import Any

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from services.gateway.app import create_gateway
from services.gateway.asyncapi import channel_id
from services.gateway.docs import asyncapi, merged_openapi
from shared.events import CATALOGUE, TOPICS
from shared.settings import SERVICES, Settings


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolves(document: dict[str, Any], ref: str) -> bool:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_merged_openapi_has_every_public_route_and_resolvable_refs() -> None:
    document = merged_openapi({"/healthz": {"get": {"responses": {}}}})
    for service in SERVICES:
        router = importlib.import_module(f"services.{service}.app").spec.router
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path.startswith("/v1/"):
                for method in route.methods or ():
                    operation = document["paths"][route.path][method.lower()]
                    assert operation["security"] == [{"bearer": []}]
                    assert "403" in operation["responses"] and "429" in operation["responses"]
    assert "/healthz" in document["paths"]
    assert all(_resolves(document, ref) for ref in _refs(document))


def test_the_asyncapi_document_names_every_topic_and_event() -> None:
    document = asyncapi()
    assert document["asyncapi"].startswith("3.")
    text = str(document)
    assert all(name in text for name in CATALOGUE)
    assert all(topic in text for topic in TOPICS)
    assert all(_resolves(document, ref) for ref in _refs(document))
    assert set(document["channels"][channel_id("trial.access")]["messages"]) == {
        "AccessDenied", "PatientDataViewed"}


def test_the_api_docs_load_nothing_from_outside() -> None:
    """/docs and /redoc work offline: every script and stylesheet is the gateway's own, and
    it serves them."""
    client = TestClient(create_gateway(Settings()))
    for page in ("/docs", "/redoc"):
        answer = client.get(page)
        assert answer.status_code == 200, page
        sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", answer.text)
        assert sources, page
        for source in sources:
            assert source.startswith("/"), f"{page} loads {source}"
            if source.endswith((".js", ".css")):
                asset = client.get(source)
                assert asset.status_code == 200 and len(asset.content) > 10_000, source
    assert "openapi.json" in client.get("/docs").text
    assert client.get("/openapi.json").json()["info"]["title"] == "NCT03424629 trial API"
