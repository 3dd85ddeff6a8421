"""A service started in production mode with development settings exits at once, saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", ["gateway", "randomization"])
def test_production_mode_refuses_to_start_with_the_development_secrets(
        service: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAL_")}
    env.update({"TRIAL_ENV": "production", "TRIAL_DATA_DIR": str(tmp_path),
                "TRIAL_SERVICE_NAME": service})
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", f"services.{service}.app:app", "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "InsecureSettings" in done.stderr
    assert "TRIAL_JWT_SECRET is the development secret" in done.stderr
    assert ("TRIAL_RANDOMIZATION_SECRET is the development secret" in done.stderr) == (
        service == "randomization")
    # No SASL and no TRIAL_KAFKA_ALLOW_PLAINTEXT, on purpose: a service refuses plaintext Kafka
    # too (D52); the gateway has no Kafka client.
    assert ("Kafka is PLAINTEXT" in done.stderr) == (service == "randomization")
    assert not list(tmp_path.iterdir())  # nothing created: it stopped before any store
