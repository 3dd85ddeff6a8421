"""The protocol configuration: the default version loads, is immutable, and bad versions fail."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.events import ARMS
from shared.protocol import (
    DEFAULT_PATH,
    ArmConfig,
    ProtocolConfig,
    ProtocolError,
    default_protocol,
    load_protocol,
    read_document,
)


def raw_default() -> dict[str, Any]:
    """The built-in version as one document: trial.json with every section under its name."""
    return read_document(DEFAULT_PATH)


def trial_keys() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEFAULT_PATH / "trial.json").read_text())
    return loaded


def test_default_protocol_loads_the_registry_facts() -> None:
    protocol = default_protocol()
    assert protocol.trial_id == "NCT03424629"
    assert protocol.version == "1.2.0"
    assert protocol.enrollment_cap == 57
    assert set(protocol.arms) == set(ARMS)
    assert protocol.arms["msc_low"].cells_per_kg == 1_000_000
    assert protocol.arms["msc_high"].cells_per_kg == 3_000_000
    assert protocol.arms["mtx"].kind == "methotrexate"
    assert protocol.window_days == 2
    assert protocol.pasi_band_threshold == 20
    assert default_protocol() is protocol  # read once


def test_load_protocol_from_a_path_equals_the_default(tmp_path: Path) -> None:
    folder = tmp_path / "v1-copy"
    folder.mkdir()
    for section in DEFAULT_PATH.glob("*.json"):
        (folder / section.name).write_text(section.read_text())
    assert load_protocol(folder) == default_protocol()


def test_default_protocol_is_frozen() -> None:
    protocol = default_protocol()
    with pytest.raises(ValidationError):
        protocol.enrollment_cap = 1000  # type: ignore[misc]
    with pytest.raises(ValidationError):
        protocol.arms["msc_high"].cells_per_kg = 10_000_000  # type: ignore[misc]
    assert isinstance(protocol.assessment_weeks, tuple)
    assert isinstance(protocol.arms["mtx"].dose_weeks, tuple)
    assert default_protocol().enrollment_cap == 57


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    """A version folder: the built-in sections, with `config` as its trial.json."""
    folder = tmp_path / "protocol"
    folder.mkdir(exist_ok=True)
    for section in DEFAULT_PATH.glob("*.json"):
        (folder / section.name).write_text(section.read_text())
    (folder / "trial.json").write_text(json.dumps(config))
    return folder


def test_unknown_top_level_key_fails(tmp_path: Path) -> None:
    config = {**trial_keys(), "stopping_rulez": []}
    with pytest.raises(ValidationError, match="stopping_rulez"):
        load_protocol(write(tmp_path, config))


def test_unknown_arm_key_fails(tmp_path: Path) -> None:
    config = copy.deepcopy(trial_keys())
    config["arms"]["msc_low"]["cells_per_lb"] = 450_000
    with pytest.raises(ValidationError, match="cells_per_lb"):
        load_protocol(write(tmp_path, config))


@pytest.mark.parametrize("field", ["name", "product", "kind", "dose_weeks"])
def test_missing_arm_field_fails(tmp_path: Path, field: str) -> None:
    config = copy.deepcopy(trial_keys())
    del config["arms"]["msc_high"][field]
    with pytest.raises(ValidationError, match=field):
        load_protocol(write(tmp_path, config))


@pytest.mark.parametrize("field", ["version", "trial_id", "enrollment_cap", "arms", "window_days",
                                   "assessment_weeks", "mtx_dose_range_mg", "pasi_band_threshold"])
def test_missing_top_level_field_fails(field: str) -> None:
    config = raw_default()
    del config[field]
    with pytest.raises(ValidationError, match=field):
        ProtocolConfig.model_validate(config)


@pytest.mark.parametrize("bad", [{"enrollment_cap": 0}, {"window_days": -1}, {"mtx_dose_range_mg": [5]},
                                 {"arms": {"placebo": raw_default()["arms"]["mtx"]}}])
def test_out_of_range_values_fail(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProtocolConfig.model_validate({**raw_default(), **bad})


def test_arm_config_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        ArmConfig.model_validate({"name": "x", "product": "y", "kind": "infusion", "dose_weeks": [0],
                                  "route": "IV"})


def test_malformed_file_fails(tmp_path: Path) -> None:
    (tmp_path / "trial.json").write_text("{ not json")
    with pytest.raises(json.JSONDecodeError):
        load_protocol(tmp_path)


@pytest.mark.parametrize("section", ["eligibility", "randomization", "safety"])
def test_a_folder_without_a_section_is_refused_naming_the_file(tmp_path: Path,
                                                               section: str) -> None:
    folder = write(tmp_path, trial_keys())
    (folder / f"{section}.json").unlink()
    with pytest.raises(ProtocolError, match=f"lacks {section}.json"):
        load_protocol(folder)


@pytest.mark.parametrize("section", ["eligibility", "randomization", "safety"])
def test_no_section_has_defaults_in_code(section: str) -> None:
    """Version 1's values live in its folder only: an empty section is refused, not filled in."""
    with pytest.raises(ValidationError, match=section):
        ProtocolConfig.model_validate({**raw_default(), section: {}})


def test_a_safety_section_without_rules_is_refused() -> None:
    safety = {**raw_default()["safety"], "rules": []}
    with pytest.raises(ValidationError, match="rules"):
        ProtocolConfig.model_validate({**raw_default(), "safety": safety})
