"""The AsyncAPI 3 document of every topic, generated from the event catalogue: the gateway serves
it, `trial asyncapi` writes it to docs/asyncapi.json."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from shared.events import CATALOGUE, DOSING, EFFICACY, ENROLLMENT, SAFETY, TOPICS, CloudEvent, dlq_topic

CONTENT_TYPE = "application/cloudevents+json"
KAFKA_BINDING = "0.5.0"
SCHEMAS = "#/components/schemas/{model}"
TOPIC_NOTES = {
    ENROLLMENT: "Screening, enrolment, arm assignment, crossover and withdrawal; key: the patient "
                "id (the screening id for PatientScreened).",
    DOSING: "The pharmacy contract: each patient's visit calendar (every planned dose with its "
            "due date, cells or mg), doses given, missed and cancelled visits, and holds "
            "(DosingHeld: stop preparing product; DosingResumed: restart). Key: the patient id, "
            "or the arm or trial id for holds of that scope, so each patient's events stay ordered.",
    SAFETY: "Adverse events, stopping rules, holds and DSMB decisions; key: the patient, arm or "
            "trial id.",
    EFFICACY: "Assessments (PASI with every component, BSA, DLQI, sPGA) and their corrections, "
              "assessment visits missed (VisitMissed with kind assessment), and dispositions: "
              "treatment discontinued, lost to follow-up, death, study completed. Key: the "
              "patient id.",
}


def channel_id(topic: str) -> str:
    """`trial.dosing` -> `trialDosing`; `trial.dosing.dlq` -> `trialDosingDlq`."""
    head, *rest = topic.split(".")
    return head + "".join(part.capitalize() for part in rest)


def _schemas() -> dict[str, Any]:
    models = [(cls, "validation") for cls in (CloudEvent, *CATALOGUE.values())]
    _, top = models_json_schema(models, ref_template=SCHEMAS)  # type: ignore[arg-type]
    return dict(sorted(top["$defs"].items()))


def _message(name: str) -> dict[str, Any]:
    cls = CATALOGUE[name]
    doc = (cls.__doc__ or "").strip()
    return {
        "name": name,
        "title": name,
        "summary": doc.splitlines()[0] if doc else f"{name} on {cls.topic}",
        "contentType": CONTENT_TYPE,
        "headers": {"type": "object", "properties": {
            "content-type": {"type": "string", "const": CONTENT_TYPE},
            "ce_type": {"type": "string", "const": name}}},
        "payload": {"allOf": [
            {"$ref": SCHEMAS.format(model="CloudEvent")},
            {"type": "object", "required": ["type", "data"], "properties": {
                "type": {"const": name},
                "schemaversion": {"const": cls.schema_version},
                "data": {"$ref": SCHEMAS.format(model=name)}}},
        ]},
        "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING, "key": {
            "type": "string", "description": f"the CloudEvents subject: data.{cls.subject_field}"}}},
    }


def _dead_letter() -> dict[str, Any]:
    return {
        "name": "DeadLetter",
        "title": "A record a consumer could not parse or handle",
        "summary": "The original record's bytes and key, with why and where it failed in headers.",
        "headers": {"type": "object", "properties": {
            h: {"type": "string"} for h in ("dlq_error", "dlq_consumer", "dlq_topic",
                                            "dlq_partition", "dlq_offset")}},
        "payload": {"description": "the original record value, unchanged"},
    }


def asyncapi_document() -> dict[str, Any]:
    """Channels for every topic (and its DLQ), one message per event type, one receive
    operation per channel; payloads are the CloudEvents envelope around each event's data."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for topic in TOPICS:
        names = sorted(n for n, cls in CATALOGUE.items() if topic in cls.topics())
        cid = channel_id(topic)
        channels[cid] = {
            "address": topic,
            "title": topic,
            "description": TOPIC_NOTES.get(topic, f"Events of {topic}."),
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
            "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING, "topic": topic}},
        }
        operations[f"receive{cid[0].upper()}{cid[1:]}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"Consume {topic}: one CloudEvent per record; use your own consumer group.",
            "messages": [{"$ref": f"#/channels/{cid}/messages/{n}"} for n in names],
        }
        dlq = channel_id(dlq_topic(topic))
        channels[dlq] = {
            "address": dlq_topic(topic),
            "title": dlq_topic(topic),
            "description": f"Records of {topic} that a service's consumer dead-lettered.",
            "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
        }
    return {
        "asyncapi": "3.0.0",
        "id": "urn:nct03424629:trial-events",
        "info": {
            "title": "NCT03424629 trial events",
            "version": "1.0.0",
            "description": "Every Kafka topic of the UC-MSC vs methotrexate psoriasis trial. "
                           "Each record's value is one CloudEvents 1.0 structured JSON object. "
                           "No record carries a name or any direct identifier of a person. "
                           "Generated from the event catalogue by `trial asyncapi`.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {"embedded": {
            "host": "127.0.0.1:9092", "protocol": "kafka",
            "description": "`make run`; set TRIAL_KAFKA_BOOTSTRAP_SERVERS for other brokers"}},
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {**{n: _message(n) for n in sorted(CATALOGUE)},
                         "DeadLetter": _dead_letter()},
            "schemas": _schemas(),
        },
    }
