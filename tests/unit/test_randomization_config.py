"""The randomization service's settings: its protocol folder, its secret, the offline listing."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.randomization import config
from services.randomization.allocation import sequence
from shared.app import create_app
from shared.protocol import DEFAULT_PATH, default_protocol
from shared.runtime import ServiceSpec
from shared.settings import Settings
from tooling.cli import app

SERVICES = ("randomization", "dosing", "safety", "audit")


def spec(service: str) -> ServiceSpec:
    found: ServiceSpec = importlib.import_module(f"services.{service}.app").spec
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_the_built_in_protocol_unless_a_folder_is_configured(tmp_path: Path, service: str) -> None:
    assert create_app(spec(service), Settings()).state.protocol == default_protocol()
    folder = tmp_path / "v1-amended"
    shutil.copytree(DEFAULT_PATH, folder)
    trial = json.loads((folder / "trial.json").read_text())
    (folder / "trial.json").write_text(json.dumps({**trial, "enrollment_cap": 90}))
    app = create_app(spec(service), Settings(protocol_dir=folder))
    assert app.state.protocol.enrollment_cap == 90


@pytest.mark.parametrize("service", SERVICES)
def test_a_broken_protocol_folder_fails_at_start(tmp_path: Path, service: str) -> None:
    shutil.copytree(DEFAULT_PATH, tmp_path / "bad")
    section = json.loads((DEFAULT_PATH / "randomization.json").read_text())
    (tmp_path / "bad" / "randomization.json").write_text(
        json.dumps({**section, "block_sizes": [4], "block_size_weights": [1]}))
    with pytest.raises(ValueError, match="multiples of 3"):
        create_app(spec(service), Settings(protocol_dir=tmp_path / "bad"))


def test_the_development_secret_is_warned_about_and_never_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config.warn_if_development_secret(Settings())
    assert "TRIAL_RANDOMIZATION_SECRET" in caplog.text
    assert Settings().randomization_secret.get_secret_value() not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config.warn_if_development_secret(Settings(randomization_secret="s3cret-of-the-trial"))
    assert caplog.text == ""


def test_allocation_list_reprints_the_sequence_from_the_secret() -> None:
    result = CliRunner().invoke(app, ["allocation-list", "--secret", "k", "--stratum",
                                      "S2:pasi_ge20", "--count", "12", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    expected = sequence(b"k", default_protocol().randomization, "S2:pasi_ge20", 12)
    assert [(r["slot"], r["block"], r["block_size"], r["position"], r["arm"]) for r in rows] == [
        (s.slot, s.block_index, s.block_size, s.position, s.arm) for s in expected]


def test_allocation_list_needs_the_secret() -> None:
    result = CliRunner().invoke(app, ["allocation-list", "--stratum", "S1:pasi_lt20"],
                                    env={"TRIAL_RANDOMIZATION_SECRET": None})
    assert result.exit_code != 0


def test_allocation_list_reprints_a_sequence_over_the_open_arms() -> None:
    result = CliRunner().invoke(app, ["allocation-list", "--secret", "k", "--stratum",
                                      "S2:pasi_ge20|msc_low+mtx", "--count", "12", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    expected = sequence(b"k", default_protocol().randomization, "S2:pasi_ge20", 12,
                        ("msc_low", "mtx"))
    assert [r["arm"] for r in rows] == [s.arm for s in expected]
    assert {r["arm"] for r in rows} == {"msc_low", "mtx"}
    bad = CliRunner().invoke(app, ["allocation-list", "--secret", "k", "--stratum",
                                   "S2:pasi_ge20|placebo"])
    assert bad.exit_code != 0 and "placebo" in bad.output
