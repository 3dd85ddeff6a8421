"""docker-compose.yml is a valid Compose file: checked against the Compose Specification's JSON
schema, as check-jsonschema ships it (vendored from compose-spec/compose-spec, with its licence).

What the file runs (services, URLs, databases) is test_published_documents' concern; this is only
whether `docker compose` would accept its shape at all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

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
