"""docker-compose.yml is a valid Compose file: checked against the Compose Specification's JSON
schema, as check-jsonschema ships it (vendored from compose-spec/compose-spec, with its licence).

What the file runs (services, URLs, databases) is test_published_documents' concern; this is
whether `docker compose` would accept its shape at all, and that its Kafka is secured (D48, D52):
the broker asks every client for SASL/SCRAM and enforces ACLs, each service logs in as itself
with a password from the environment, the ACLs are deploy/kafka_acls.py's table, and nothing
runs production mode on plaintext Kafka.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from deploy.kafka_acls import CONSUMES, WITHOUT_RELAY, expand, grants, principals
from shared.settings import SERVICES, Settings, production_refusals

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    document = get_builtin_schema("vendor.compose-spec")
    assert document["title"] == "Compose Specification", "not the Compose Specification's schema"
    jsonschema.validators.validator_for(document).check_schema(document)
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the file's anchors and `<<` merge keys, as Compose does.
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(
        schema, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.path)))]


def test_docker_compose_yml_follows_the_compose_specification(
        schema: dict[str, Any], compose: dict[str, Any]) -> None:
    found = errors(schema, compose)
    assert not found, "docker-compose.yml is not a valid Compose file:\n" + "\n".join(found)


def _misspelled_healthcheck(doc: dict[str, Any]) -> None:
    doc["services"]["postgres"]["healthcheck"]["intervall"] = "5s"


def _ports_not_a_list(doc: dict[str, Any]) -> None:
    doc["services"]["gateway"]["ports"] = "8000:8000"


def _depends_on_bad_condition(doc: dict[str, Any]) -> None:
    doc["services"]["gateway"]["depends_on"]["audit"]["condition"] = "service_ready"


def _unknown_top_level_key(doc: dict[str, Any]) -> None:
    doc["service"] = {}


def _environment_value_a_mapping(doc: dict[str, Any]) -> None:
    doc["services"]["dosing"]["environment"]["TRIAL_SERVICE_NAME"] = {"name": "dosing"}


@pytest.mark.parametrize("spoil", [_misspelled_healthcheck, _ports_not_a_list,
                                   _depends_on_bad_condition, _unknown_top_level_key,
                                   _environment_value_a_mapping])
def test_the_schema_check_refuses_a_broken_compose_file(
        schema: dict[str, Any], compose: dict[str, Any], spoil: Any) -> None:
    broken = copy.deepcopy(compose)
    spoil(broken)
    assert errors(schema, broken), f"{spoil.__name__}: the schema accepted a broken file"


# --- Kafka: SASL/SCRAM, one user per service, ACLs from the one table (D48, D52) ---------------
# Docker is not on the machines that run the suite: the broker's start script and the ACL script
# run here with stand-ins for Kafka's own tools, which record what they were given.

VARIABLE = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def placeholder(variable: str) -> str:
    """What the test's environment holds in `variable` (long enough for any secret)."""
    return f"{variable.lower()}-{'0' * 32}"


def interpolated(value: str) -> str:
    """A compose value with every ${VAR...} replaced as `docker compose` would, given test values."""
    return VARIABLE.sub(lambda m: placeholder(m.group(1)), value)


def from_variable(value: Any) -> str | None:
    """The variable a compose value is read from, when it is only that and has no default."""
    match = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str(value))
    return match.group(1) if match else None


def _script(compose: dict[str, Any], service: str, mounted: str) -> Path:
    for volume in compose["services"][service].get("volumes", []):
        source, _, target = volume.partition(":")
        if target.split(":")[0] == mounted:
            return REPO / source
    raise AssertionError(f"{service} mounts nothing at {mounted}")


def _stand_ins(home: Path) -> None:
    """bin/ of a Kafka home whose tools only record their arguments."""
    (home / "bin").mkdir(parents=True)
    for tool, body in (
            ("kafka-storage.sh", 'if [[ $1 == random-uuid ]]; then echo cluster-id; exit; fi\n'
                                 'printf "%s\\n" "$@" > "$HOME_DIR/format"\n'
                                 'touch "$KAFKA_LOG_DIRS/meta.properties"\n'),
            ("kafka-server-start.sh", 'printf "%s\\n" "$@" > "$HOME_DIR/started"\n'),
            ("kafka-acls.sh", 'printf "%s\\n" "$*" >> "$HOME_DIR/acls"\n')):
        path = home / "bin" / tool
        path.write_text(f'#!/usr/bin/env bash\nHOME_DIR="$(dirname "$0")/.."\n{body}')
        path.chmod(0o755)


@dataclass
class Broker:
    """What compose's kafka service would start: its configuration and how it formatted."""

    properties: dict[str, str]
    format_args: list[str]


def start_broker(compose: dict[str, Any], tmp: Path) -> Broker:
    kafka = compose["services"]["kafka"]
    command = kafka["command"]
    script = _script(compose, "kafka", command[-1])
    home, data = tmp / "kafka-home", tmp / "data"
    _stand_ins(home)
    data.mkdir()
    env = {k: interpolated(str(v)) for k, v in kafka["environment"].items()}
    env.update(KAFKA_HOME=str(home), KAFKA_LOG_DIRS=str(data),
               TRIAL_KAFKA_CONFIG_DIR=str(tmp / "config"), PATH=os.environ["PATH"])
    done = subprocess.run([command[0], str(script)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (home / "started").read_text().split() == [str(tmp / "config" / "server.properties")]
    lines = (tmp / "config" / "server.properties").read_text().splitlines()
    properties = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return Broker(properties, (home / "format").read_text().splitlines())


@pytest.fixture
def broker(compose: dict[str, Any], tmp_path: Path) -> Broker:
    return start_broker(compose, tmp_path)


def broker_problems(broker: Broker, compose: dict[str, Any]) -> list[str]:
    """Every listener a client can reach asks for SASL/SCRAM; the ACLs decide; admin alone is a
    super user; the controller listener is the container's own; every service has a user."""
    p = broker.properties
    problems = []
    protocols = dict(entry.split(":") for entry in p["listener.security.protocol.map"].split(","))
    for listener in p["listeners"].split(","):
        name, _, address = listener.partition("://")
        if name == p["controller.listener.names"]:
            if not address.startswith("127.0.0.1:"):
                problems.append(f"the controller listener {listener} is reachable from outside")
        elif not protocols.get(name, "").startswith("SASL_"):
            problems.append(f"listener {listener} is {protocols.get(name)}, not SASL")
    if p.get("sasl.enabled.mechanisms") != "SCRAM-SHA-512":
        problems.append(f"SASL mechanisms {p.get('sasl.enabled.mechanisms')}, not SCRAM-SHA-512")
    if p.get("authorizer.class.name") != "org.apache.kafka.metadata.authorizer.StandardAuthorizer":
        problems.append("no StandardAuthorizer: the ACLs are not enforced")
    if p.get("allow.everyone.if.no.acl.found") != "false":
        problems.append("a resource without ACLs is open to everyone")
    if set(p.get("super.users", "").split(";")) != {"User:admin", "User:ANONYMOUS"}:
        problems.append(f"super users {p.get('super.users')}, not admin (and the controller's)")
    if p.get("auto.create.topics.enable") != "false":
        problems.append("topics are created by any metadata request")
    scram = {re.fullmatch(r"SCRAM-SHA-512=\[name=([^,]+),password=([^\]]+)\]", arg)
             for arg in broker.format_args if arg.startswith("SCRAM")}
    users = {m.group(1): m.group(2) for m in scram if m}
    env = compose["services"]["kafka"]["environment"]
    for user in ("admin", *principals()):
        variable = f"TRIAL_KAFKA_{user.upper()}_PASSWORD"
        if users.get(user) != placeholder(variable):
            problems.append(f"Kafka's storage is formatted without the SCRAM user {user}")
        if from_variable(env.get(variable)) != variable:
            problems.append(f"{user}'s password is not from ${{{variable}}} without a default")
    return problems


def kafka_client_problems(compose: dict[str, Any]) -> list[str]:
    """Each of the five services logs in as itself, with a password from the environment (the
    same variable the broker made its user with); nothing runs production on plaintext Kafka;
    and production mode accepts every service's settings."""
    problems = []
    services = compose["services"]
    for name, service in services.items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        if env.get("TRIAL_ENV") == "production" and env.get(
                "TRIAL_KAFKA_ALLOW_PLAINTEXT", "false").lower() in ("true", "1", "yes", "on"):
            problems.append(f"{name} runs production mode on plaintext Kafka")
        if name not in SERVICES:
            continue
        if not env.get("TRIAL_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").startswith("SASL_"):
            problems.append(f"{name} connects to Kafka without SASL")
        if env.get("TRIAL_KAFKA_SASL_USERNAME") != name:
            problems.append(f"{name} logs in to Kafka as {env.get('TRIAL_KAFKA_SASL_USERNAME')}")
        variable = f"TRIAL_KAFKA_{name.upper()}_PASSWORD"
        if from_variable(env.get("TRIAL_KAFKA_SASL_PASSWORD")) != variable:
            problems.append(f"{name}'s Kafka password is not from ${{{variable}}} without a default")
        if name not in str(services["kafka"]["environment"].get("TRIAL_KAFKA_SCRAM_USERS")).split():
            problems.append(f"the broker has no user {name}")
        with _environment({k: interpolated(v) for k, v in env.items()}):
            refused = production_refusals(Settings())
        if refused:
            problems.append(f"{name} would not start: {refused}")
    return problems


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("TRIAL_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def granted(compose: dict[str, Any], tmp: Path) -> list[str]:
    """The grants compose's kafka-acls service makes, one each, as kafka-acls.sh was asked."""
    service = compose["services"]["kafka-acls"]
    entrypoint = service["entrypoint"]
    home = tmp / "kafka-home"
    _stand_ins(home)
    env = {k: interpolated(str(v)) for k, v in service["environment"].items()}
    env.update(KAFKA_HOME=str(home), PATH=os.environ["PATH"])
    done = subprocess.run([entrypoint[0], str(_script(compose, "kafka-acls", entrypoint[-1])),
                           *service["command"]], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = []
    for call in (home / "acls").read_text().splitlines():
        args = call.split()
        assert args[args.index("--bootstrap-server") + 1] == "kafka:9092"
        principal = args[args.index("--allow-principal") + 1].removeprefix("User:")
        operations = [args[i + 1] for i, a in enumerate(args) if a == "--operation"]
        resources = [(args[i][2:].upper(), args[i + 1]) for i, a in enumerate(args)
                     if a in ("--topic", "--group")]
        found += [f"{principal}:{op}:{kind}:{name}" for op in operations for kind, name in resources]
    return found


def test_kafka_asks_every_client_for_sasl_and_has_a_user_per_service(
        broker: Broker, compose: dict[str, Any]) -> None:
    assert broker_problems(broker, compose) == []


def test_every_service_logs_in_to_kafka_as_itself_in_production(compose: dict[str, Any]) -> None:
    assert kafka_client_problems(compose) == []
    # Only the five services talk to Kafka: the gateway has no credentials to hold.
    assert "TRIAL_KAFKA_SASL_PASSWORD" not in compose["services"]["gateway"]["environment"]


def test_compose_grants_exactly_the_acl_table(compose: dict[str, Any], tmp_path: Path) -> None:
    assert sorted(expand(compose["services"]["kafka-acls"]["command"])) == sorted(grants())
    made = granted(compose, tmp_path)
    assert sorted(set(made)) == sorted(set(grants()))
    # The services start once the grants are made, after the broker answers.
    for name in SERVICES:
        assert compose["services"][name]["depends_on"]["kafka-acls"] == {
            "condition": "service_completed_successfully"}
    assert compose["services"]["kafka-acls"]["depends_on"]["kafka"] == {
        "condition": "service_healthy"}


def test_the_acl_table_is_what_the_services_consume_and_publish() -> None:
    from services.audit.app import spec as audit
    from services.dosing.app import spec as dosing
    from services.efficacy.app import spec as efficacy
    from services.randomization.app import spec as randomization
    from services.safety.app import spec as safety

    specs = {s.name: s for s in (randomization, dosing, safety, efficacy, audit)}
    assert {name: tuple(spec.consumes) for name, spec in specs.items()} == CONSUMES
    assert {name for name, spec in specs.items() if not spec.publishes} == set(WITHOUT_RELAY)
    table = set(grants())
    assert "dosing:WRITE:TOPIC:trial.dosing" in table
    assert not any(g.startswith("dosing:WRITE:TOPIC:trial.safety") and not g.endswith(".dlq")
                   for g in table), "dosing could forge a safety record"
    assert {g for g in table if g.startswith("pharmacy:")} == {
        "pharmacy:READ:TOPIC:trial.dosing", "pharmacy:DESCRIBE:TOPIC:trial.dosing",
        "pharmacy:READ:GROUP:pharmacy"}
    # The audit service has no relay: it writes its anchors and the reads made through it (D93),
    # nothing else it may publish.
    assert "audit:WRITE:TOPIC:trial.access" in table
    assert "audit:WRITE:TOPIC:trial.protocol" not in table
    prefixed = grants(topic_prefix="prod.", principal_prefix="prod-")
    assert "prod-dosing:WRITE:TOPIC:prod.trial.dosing" in prefixed
    assert "prod-dosing:READ:GROUP:prod.dosing" in prefixed
    assert all(g.split(":")[3].startswith("prod.") for g in prefixed)


def _plaintext_listener(broker: Broker, compose: dict[str, Any]) -> None:
    broker.properties["listener.security.protocol.map"] = broker.properties[
        "listener.security.protocol.map"].replace("HOST:SASL_PLAINTEXT", "HOST:PLAINTEXT")


def _no_authorizer(broker: Broker, compose: dict[str, Any]) -> None:
    del broker.properties["authorizer.class.name"]


def _controller_on_every_address(broker: Broker, compose: dict[str, Any]) -> None:
    broker.properties["listeners"] = broker.properties["listeners"].replace(
        "CONTROLLER://127.0.0.1:", "CONTROLLER://:")


def _a_user_missing(broker: Broker, compose: dict[str, Any]) -> None:
    broker.format_args = [a for a in broker.format_args if "name=audit," not in a]


def _a_default_password(broker: Broker, compose: dict[str, Any]) -> None:
    compose["services"]["kafka"]["environment"]["TRIAL_KAFKA_DOSING_PASSWORD"] = (
        "${TRIAL_KAFKA_DOSING_PASSWORD:-dosing}")


@pytest.mark.parametrize("spoil", [_plaintext_listener, _no_authorizer,
                                   _controller_on_every_address, _a_user_missing,
                                   _a_default_password])
def test_the_broker_check_refuses_an_open_broker(broker: Broker, compose: dict[str, Any],
                                                 spoil: Any) -> None:
    broken = copy.deepcopy(compose)
    spoil(broker, broken)
    assert broker_problems(broker, broken), f"{spoil.__name__}: the check passed"


def _plaintext_client(doc: dict[str, Any]) -> None:
    doc["services"]["safety"]["environment"]["TRIAL_KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
    doc["services"]["safety"]["environment"]["TRIAL_KAFKA_ALLOW_PLAINTEXT"] = "true"


def _allowance_alone(doc: dict[str, Any]) -> None:
    doc["services"]["gateway"]["environment"]["TRIAL_KAFKA_ALLOW_PLAINTEXT"] = "true"


def _shared_user(doc: dict[str, Any]) -> None:
    doc["services"]["efficacy"]["environment"]["TRIAL_KAFKA_SASL_USERNAME"] = "dosing"


def _literal_password(doc: dict[str, Any]) -> None:
    doc["services"]["audit"]["environment"]["TRIAL_KAFKA_SASL_PASSWORD"] = "audit-password"


def _no_password(doc: dict[str, Any]) -> None:
    del doc["services"]["randomization"]["environment"]["TRIAL_KAFKA_SASL_PASSWORD"]


@pytest.mark.parametrize("spoil", [_plaintext_client, _allowance_alone, _shared_user,
                                   _literal_password, _no_password])
def test_the_client_check_refuses_a_service_that_does_not_log_in_as_itself(
        compose: dict[str, Any], spoil: Any) -> None:
    broken = copy.deepcopy(compose)
    spoil(broken)
    assert kafka_client_problems(broken), f"{spoil.__name__}: the check passed"
