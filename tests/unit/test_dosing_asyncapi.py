"""The AsyncAPI 3 document: every topic and event, every reference resolvable, the copy current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.gateway.asyncapi import asyncapi_document, channel_id
from shared.events import CATALOGUE, DOSING, TOPICS, dlq_topic

REPO = Path(__file__).resolve().parents[2]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_the_committed_asyncapi_document_is_the_generated_one() -> None:
    committed = json.loads((REPO / "docs" / "asyncapi.json").read_text())
    assert committed == json.loads(json.dumps(asyncapi_document())), \
        "run `.venv/bin/trial asyncapi` and commit docs/asyncapi.json"


def test_every_topic_is_a_channel_carrying_exactly_its_events() -> None:
    doc = asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    for topic in TOPICS:
        channel = doc["channels"][channel_id(topic)]
        assert channel["address"] == topic
        expected = {n for n, cls in CATALOGUE.items() if topic in cls.topics()}
        assert set(channel["messages"]) == expected
        assert doc["channels"][channel_id(dlq_topic(topic))]["address"] == dlq_topic(topic)
    dosing = doc["channels"]["trialDosing"]
    assert {"DosingScheduleCreated", "InfusionGiven", "MethotrexateDoseGiven", "DosingHeld",
            "DosingResumed", "VisitMissed", "VisitsCancelled"} <= set(dosing["messages"])
    assert dosing["address"] == DOSING
    efficacy = doc["channels"]["trialEfficacy"]
    assert {"AssessmentRecorded", "AssessmentCorrected", "VisitMissed", "TreatmentDiscontinued",
            "LostToFollowUp", "DeathRecorded", "StudyCompleted"} <= set(efficacy["messages"])


def test_every_reference_resolves_and_every_operation_receives_its_channel() -> None:
    doc = asyncapi_document()
    for ref in refs(doc):
        assert resolve(doc, ref) is not None
    for operation in doc["operations"].values():
        assert operation["action"] == "receive"
        channel = operation["channel"]["$ref"]
        assert all(m["$ref"].startswith(channel + "/messages/") for m in operation["messages"])


def test_a_message_is_the_cloudevent_envelope_around_the_events_data() -> None:
    doc = asyncapi_document()
    message = doc["components"]["messages"]["InfusionGiven"]
    envelope, specific = message["payload"]["allOf"]
    assert resolve(doc, envelope["$ref"])["title"] == "CloudEvent"
    data = resolve(doc, specific["properties"]["data"]["$ref"])
    assert {"patient_id", "site_id", "arm", "week", "cells_administered", "cells_per_kg",
            "weight_kg", "lot_number", "given_at"} <= set(data["required"])
    assert message["bindings"]["kafka"]["key"]["description"].endswith("patient_id")
    planned = resolve(doc, "#/components/schemas/DosingScheduleCreated")
    visit = resolve(doc, planned["properties"]["visits"]["items"]["$ref"])
    assert {"due_date", "planned_cells", "planned_dose_mg", "product"} <= set(visit["properties"])
