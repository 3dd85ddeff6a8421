#!/usr/bin/env python3
"""A pharmacy's subscriber to `trial.dosing`: prints what to prepare, and stops or restarts on holds.

Standalone on purpose (aiokafka only, no project imports): it is what a pharmacy system would
write against docs/asyncapi.json. Each record is one CloudEvents 1.0 JSON object.

    python examples/pharmacy_subscriber.py --bootstrap 127.0.0.1:9092 --group pharmacy-S1

Against a secured broker (SASL/SCRAM, the pharmacy's own principal, which may only read
trial.dosing and use its group) whose topics carry an environment's prefix (prod.trial.dosing):

    KAFKA_SASL_PASSWORD=... python examples/pharmacy_subscriber.py --bootstrap kafka:9092 \
        --security-protocol SASL_SSL --sasl-username pharmacy --topic-prefix prod.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.helpers import create_ssl_context

TOPIC = "trial.dosing"


def _amount(visit: dict[str, Any]) -> str:
    if visit.get("planned_cells") is not None:
        return f"cells={visit['planned_cells']}"
    return f"mg={visit.get('planned_dose_mg')}"


def _preparation_list(data: dict[str, Any], header: str) -> list[str]:
    doses = [v for v in data.get("visits", []) if v.get("kind") in ("infusion", "methotrexate")]
    lines = [f"{header} patient={data['patient_id']} arm={data['arm']} "
             f"anchor={data['anchor_date']} doses={len(doses)}"]
    lines += [f"PREPARE patient={data['patient_id']} due={v['due_date']} week={v['week']} "
              f"product={v.get('product')} {_amount(v)}" for v in doses]
    return lines


def describe(event: dict[str, Any]) -> list[str]:
    """The lines a pharmacist needs for one event; nothing for events that change no preparation."""
    kind, data = event.get("type"), event.get("data") or {}
    if kind == "DosingScheduleCreated":
        return _preparation_list(data, "SCHEDULE")
    if kind == "DosingScheduleReanchored":  # day 0 is fixed: every due date moves with it
        return _preparation_list(data, "RESCHEDULE")
    if kind == "InfusionGiven":
        return [f"GIVEN patient={data['patient_id']} week={data['week']} product=UC-MSC "
                f"cells={data['cells_administered']} lot={data['lot_number']}"]
    if kind == "MethotrexateDoseGiven":
        return [f"GIVEN patient={data['patient_id']} week={data['week']} product=methotrexate "
                f"mg={data['dose_mg']}"]
    if kind == "DosingHeld":
        return [f"STOP preparing product={data.get('product', 'any')} for {data['scope']} "
                f"{data['target']} (rule {data['rule_id']}, hold {data['hold_id']})"]
    if kind == "DosingResumed":
        return [f"RESTART preparing product={data.get('product', 'any')} for {data['scope']} "
                f"{data['target']} (hold {data['hold_id']} lifted)"]
    if kind == "VisitMissed":
        return [f"MISSED patient={data['patient_id']} week={data['week']} kind={data['kind']} "
                f"(window ended {data['window_end']}): do not prepare"]
    if kind == "VisitsCancelled":
        weeks = ",".join(str(v["week"]) for v in data.get("visits", []) if v["kind"] != "assessment")
        return [f"CANCEL patient={data['patient_id']} arm={data['arm']} cause={data['cause']} "
                f"weeks={weeks or '-'}"]
    return []


def concerns(event: dict[str, Any], patient: str | None) -> bool:
    """With --patient, only that patient's events, and holds wider than one patient."""
    if patient is None:
        return True
    data = event.get("data") or {}
    return (data.get("patient_id") == patient or data.get("target") == patient
            or data.get("scope") in ("arm", "trial"))


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """The bootstrap and, on a secured broker, SASL as the pharmacy's principal (its password
    from the environment, never an argument: arguments show in the process list)."""
    options: dict[str, Any] = {"bootstrap_servers": args.bootstrap}
    if args.security_protocol != "PLAINTEXT":
        options.update(security_protocol=args.security_protocol,
                       sasl_mechanism=args.sasl_mechanism,
                       sasl_plain_username=args.sasl_username,
                       sasl_plain_password=os.environ.get("KAFKA_SASL_PASSWORD"))
        if args.security_protocol == "SASL_SSL":
            options["ssl_context"] = create_ssl_context()
    return options


async def run(args: argparse.Namespace) -> int:
    topic = args.topic_prefix + TOPIC  # the environment's name of trial.dosing on the broker
    group = args.group or args.topic_prefix + "pharmacy"
    consumer = AIOKafkaConsumer(
        topic, **connection(args), group_id=group,
        auto_offset_reset="earliest", enable_auto_commit=True, metadata_max_age_ms=5000)
    await consumer.start()
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    print(f"LISTENING topic={topic} group={group}", flush=True)
    try:
        while deadline is None or time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        event = json.loads(record.value or b"")
                    except ValueError:
                        print(f"SKIP offset={record.offset}: not JSON", file=sys.stderr)
                        continue
                    if not isinstance(event, dict) or not concerns(event, args.patient):
                        continue
                    for line in describe(event):
                        print(line, flush=True)
                    if args.until is not None and event.get("type") == args.until:
                        return 0
    finally:
        await consumer.stop()
    # Out of time: fine when listening for a while, a failure when waiting for --until.
    return 0 if args.until is None else 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--group", help="this pharmacy's consumer group (default: pharmacy, "
                                         "after the topic prefix)")
    parser.add_argument("--patient", help="only this patient (and arm- or trial-wide holds)")
    parser.add_argument("--until", help="exit after printing an event of this type")
    parser.add_argument("--max-seconds", type=float, help="exit after this long")
    parser.add_argument("--topic-prefix", default="",
                        help="the environment's topic prefix (TRIAL_KAFKA_TOPIC_PREFIX), e.g. prod.")
    parser.add_argument("--security-protocol", default="PLAINTEXT",
                        choices=["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"])
    parser.add_argument("--sasl-mechanism", default="SCRAM-SHA-512",
                        choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    parser.add_argument("--sasl-username", default="pharmacy",
                        help="the pharmacy's principal (password: KAFKA_SASL_PASSWORD)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
