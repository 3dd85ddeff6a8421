"""The documents other teams code against are generated, and the committed copies are current."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from shared.events import CATALOGUE, TOPICS, catalogue_document
from shared.settings import DEV_JWT_SECRET, SERVICES

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_event_catalogue_is_the_generated_one() -> None:
    committed = json.loads((REPO / "docs" / "events.schema.json").read_text())
    assert committed == json.loads(json.dumps(catalogue_document())), \
        "run `.venv/bin/trial schemas` and commit docs/events.schema.json"
    assert set(committed["events"]) == set(CATALOGUE)
    assert {e["topic"] for e in committed["events"].values()} == set(TOPICS)


def test_docker_compose_runs_every_service_against_postgres_and_kafka() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "kafka", "gateway", *SERVICES} <= set(services)
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["TRIAL_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env["TRIAL_DATABASE_URL"].endswith(f"/trial_{name}")
        assert env["TRIAL_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert services[name]["command"][1] == f"services.{name}.app:app"
        assert (REPO / "services" / name / "app.py").exists()
    gateway_env = services["gateway"]["environment"]
    for name in SERVICES:
        assert gateway_env[f"TRIAL_{name.upper()}_URL"] == f"http://{name}:8000"
    assert "8000:8000" in services["gateway"]["ports"]
    init_sql = (REPO / "deploy" / "postgres-init.sql").read_text()
    assert all(f"trial_{name}" in init_sql for name in SERVICES)
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    # Never the development secret: compose refuses to start without a real one.
    assert services["randomization"]["environment"]["TRIAL_RANDOMIZATION_SECRET"].startswith(
        "${TRIAL_RANDOMIZATION_SECRET:?")
    for name in ("gateway", *SERVICES):
        env = services[name]["environment"]
        # Production mode, and no fallback to the development JWT secret: anyone could mint a
        # DSMB token with it.
        assert env["TRIAL_ENV"] == "production"
        assert env["TRIAL_JWT_SECRET"].startswith("${TRIAL_JWT_SECRET:?")
        assert DEV_JWT_SECRET not in str(env)
    assert "TRIAL_ENV=production" in (REPO / "deploy" / "Dockerfile").read_text()
    # Least privilege (D44): the services run as trial_app, which the one-shot migrate service
    # (the owner, trial) grants the service's rights; the role is made with a password of yours.
    for name in SERVICES:
        assert "://trial_app:${TRIAL_APP_DB_PASSWORD}@" in services[name]["environment"][
            "TRIAL_DATABASE_URL"]
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"}
    migrate = " ".join(services["migrate"]["command"])
    assert "trial migrate" in migrate and "--service-role trial_app" in migrate
    assert all(name in migrate for name in SERVICES)
    assert services["postgres"]["environment"]["TRIAL_APP_DB_PASSWORD"].startswith(
        "${TRIAL_APP_DB_PASSWORD:?")
    assert any("postgres-init-roles.sh" in v for v in services["postgres"]["volumes"])


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split(";")[0].strip()
    return pins


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]).lower()
            for r in requirements}


def test_installs_are_pinned_by_the_lock_files_make_and_the_image_use() -> None:
    """Reproducible installs: every dependency of pyproject.toml is pinned to one version,
    the image's lock agrees with the development one, and both installers use them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = _pins(REPO / "requirements.lock"), _pins(REPO / "requirements-dev.lock")
    assert _requirement_names(project["dependencies"]) <= set(runtime)
    assert _requirement_names(project["optional-dependencies"]["dev"]) <= set(dev)
    assert {name: dev.get(name) for name in runtime} == runtime  # the same versions in both
    makefile = (REPO / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml requirements-dev.lock" in makefile
    assert "pip install -q -r requirements-dev.lock" in makefile
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    assert "--no-deps ." in dockerfile


def test_compose_keeps_kafkas_history_on_a_volume() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    kafka = services["kafka"]
    logs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.split(":")[1] == logs for v in kafka["volumes"]), "Kafka's log dirs on no volume"
