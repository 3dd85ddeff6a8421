"""Who may do what on the trial's Kafka (D48, D52): one table of the ACLs a secured broker grants.

Each service's principal (named as the service) may write, and create, the topics it publishes
to (`shared.events.PUBLISHERS`, through its relay, which reads them back too, or, for the audit
service, `WITHOUT_RELAY`: its anchors and the reads made through it, D93) and the DLQs of the
topics it consumes; read the topics it consumes (`CONSUMES`, which a test holds equal to each
service's `ServiceSpec.consumes`) and use its own consumer group. A pharmacy's principal may
only read `trial.dosing` and use its group. Topic and group names are the broker's
(`shared.kafka.physical`: an environment's prefix before them).

Used by compose's one-shot `kafka-acls` service (its command lists exactly these grants, which
tests/unit/test_compose_schema.py checks), by tests/integration/test_kafka_acls.py, and by an
operator granting them on a cluster of their own (the chart assumes a cluster that has them):

    python -m deploy.kafka_acls --topic-prefix prod. [--principal-prefix prod-]

prints one grant a line, ``principal:OPERATION:RESOURCE_TYPE:name`` (what deploy/kafka/Acls.java
and deploy/infra.py's `grant_kafka_acls` take); with ``--kafka-acls BOOTSTRAP``, as
`kafka-acls.sh` commands.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from shared.events import (
    ACCESS,
    AUDIT_ANCHORS,
    DOSING,
    EFFICACY,
    ENROLLMENT,
    LEDGER_TOPICS,
    PUBLISHERS,
    SAFETY,
    dlq_topic,
)
from shared.kafka import physical
from shared.settings import SERVICES, Settings

# What each service's consumer group reads (services/<name>/app.py: spec.consumes).
CONSUMES: dict[str, tuple[str, ...]] = {
    "randomization": (SAFETY, EFFICACY),
    "dosing": (ENROLLMENT, SAFETY, EFFICACY),
    "safety": (ENROLLMENT, DOSING, SAFETY),
    "efficacy": (ENROLLMENT, DOSING, SAFETY),
    "audit": LEDGER_TOPICS,
}
# Read without a group: the audit service checks its ledger against its anchors (D27).
READS_WITHOUT_GROUP: dict[str, tuple[str, ...]] = {"audit": (AUDIT_ANCHORS,)}
PHARMACY = "pharmacy"  # the principal, and the consumer group, of a pharmacy reading trial.dosing
WRITE = ("WRITE", "CREATE", "DESCRIBE")  # a writer creates its topics when they are missing
READ = ("READ", "DESCRIBE")
# A relay reads back the tail of the topics it publishes to before it publishes again after a
# start or a failure, so as to send nothing twice (shared/relay.py): it reads them too.
RELAY = (*WRITE, "READ")


# Services without a relay (`ServiceSpec.publishes` False) write only the topics named here, not
# every one they may publish to: the audit service its anchors (D27) and the reads made through
# it, to trial.access (`services.audit.views`, D93); not trial.protocol.
WITHOUT_RELAY: dict[str, tuple[str, ...]] = {"audit": (AUDIT_ANCHORS, ACCESS)}


def writes(service: str) -> list[str]:
    """The topics `service` publishes to (logical names)."""
    if service in WITHOUT_RELAY:
        return list(WITHOUT_RELAY[service])
    source = f"/services/{service}"
    return [topic for topic, owners in PUBLISHERS.items() if source in owners]


def grants(topic_prefix: str = "", principal_prefix: str = "",
           pharmacy: str | None = PHARMACY) -> list[str]:
    """Every grant, ``principal:OPERATION:RESOURCE_TYPE:name``, in a stable order."""
    settings = Settings(kafka_topic_prefix=topic_prefix)

    def on_broker(name: str) -> str:
        return physical(settings, name)

    found: list[str] = []
    for service in SERVICES:
        principal = principal_prefix + service
        relay = RELAY if service not in WITHOUT_RELAY else WRITE
        for topic in writes(service):
            found += [f"{principal}:{op}:TOPIC:{on_broker(topic)}" for op in relay]
        for topic in (dlq_topic(t) for t in CONSUMES[service]):
            found += [f"{principal}:{op}:TOPIC:{on_broker(topic)}" for op in WRITE]
        for topic in (*CONSUMES[service], *READS_WITHOUT_GROUP.get(service, ())):
            found += [f"{principal}:{op}:TOPIC:{on_broker(topic)}" for op in READ]
        found.append(f"{principal}:READ:GROUP:{on_broker(service)}")
    if pharmacy:
        principal = principal_prefix + pharmacy
        found += [f"{principal}:{op}:TOPIC:{on_broker(DOSING)}" for op in READ]
        found.append(f"{principal}:READ:GROUP:{on_broker(pharmacy)}")
    return list(dict.fromkeys(found))  # a topic both written and read: DESCRIBE once


def principals(principal_prefix: str = "", pharmacy: str | None = PHARMACY) -> list[str]:
    """The principals the grants name (each needs SCRAM credentials on the broker)."""
    return [principal_prefix + name for name in (*SERVICES, *([pharmacy] if pharmacy else []))]


def compact(grant_list: Sequence[str]) -> list[str]:
    """The grants one line per principal and resource, the operations joined by commas
    (``dosing:WRITE,CREATE,DESCRIBE:TOPIC:trial.dosing``): how compose lists them."""
    by_resource: dict[tuple[str, str, str], list[str]] = {}
    for grant in grant_list:
        principal, operation, kind, name = grant.split(":", 3)
        by_resource.setdefault((principal, kind, name), []).append(operation)
    return [f"{principal}:{','.join(ops)}:{kind}:{name}"
            for (principal, kind, name), ops in by_resource.items()]


def expand(compact_list: Sequence[str]) -> list[str]:
    """`compact`'s lines back to one grant each."""
    found = []
    for line in compact_list:
        principal, operations, kind, name = line.split(":", 3)
        found += [f"{principal}:{op}:{kind}:{name}" for op in operations.split(",")]
    return found


def kafka_acls_commands(grant_list: Sequence[str], bootstrap: str,
                        command_config: str) -> list[str]:
    """The grants as `kafka-acls.sh --add` commands, one per principal and resource."""
    commands = []
    for line in compact(grant_list):
        principal, operations, kind, name = line.split(":", 3)
        commands.append(shlex.join([
            "kafka-acls.sh", "--bootstrap-server", bootstrap, "--command-config", command_config,
            "--add", "--allow-principal", f"User:{principal}",
            *(a for op in operations.split(",") for a in ("--operation", op.capitalize())),
            f"--{kind.lower()}", name]))
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic-prefix", default="", help="TRIAL_KAFKA_TOPIC_PREFIX, e.g. prod.")
    parser.add_argument("--principal-prefix", default="",
                        help="before each principal's name, e.g. prod- (one cluster, several "
                             "environments)")
    parser.add_argument("--pharmacy", default=PHARMACY,
                        help="the pharmacy's principal and group ('' for none)")
    parser.add_argument("--kafka-acls", metavar="BOOTSTRAP",
                        help="print kafka-acls.sh commands against this bootstrap instead")
    parser.add_argument("--command-config", default="admin.properties",
                        help="with --kafka-acls: the admin's client properties file")
    args = parser.parse_args(argv)
    found = grants(args.topic_prefix, args.principal_prefix, args.pharmacy or None)
    lines = (kafka_acls_commands(found, args.kafka_acls, args.command_config)
             if args.kafka_acls else found)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
