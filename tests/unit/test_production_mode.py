"""Production mode (TRIAL_ENV=production) refuses what only a developer's machine may run with;
secrets never show in a repr or an error; token lifetimes are capped."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from services.gateway.app import create_gateway
from shared.app import create_app
from shared.auth import AuthError, JWTVerifier, issue_dev_token
from shared.runtime import ServiceSpec
from shared.settings import (
    DEV_JWT_SECRET,
    DEV_RANDOMIZATION_SECRET,
    InsecureSettings,
    Settings,
    production_refusals,
)

STRONG = "a-real-secret-of-this-deployment-" + "7" * 16
SEED = "the-allocation-seed-of-this-trial-" + "3" * 16
JWKS = {"jwt_jwks_url": "https://idp.example/jwks.json"}
# A service's Kafka as production has it: SASL as its own principal (D48).
SASL = {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "randomization", "kafka_sasl_password": "kafka-" + "5" * 32}


def production(**values: Any) -> Settings:
    return Settings(env="production", **values)


def test_development_refuses_nothing_even_with_the_development_secrets() -> None:
    assert production_refusals(Settings(service_name="randomization")) == []


def test_production_refuses_the_development_jwt_secret_and_hs256_by_default() -> None:
    found = production_refusals(production(service_name="gateway"))
    assert any("TRIAL_JWT_SECRET is the development secret" in f for f in found)
    assert any("HS256" in f and "TRIAL_JWT_JWKS_URL" in f for f in found)
    assert not any("RANDOMIZATION" in f for f in found)  # only randomization holds the seed


def test_production_refuses_a_short_shared_secret_even_when_hs256_is_allowed() -> None:
    found = production_refusals(production(jwt_allow_hs256=True, jwt_secret="short"))
    assert found == ["TRIAL_JWT_SECRET is shorter than 32 bytes"]
    assert production_refusals(production(jwt_allow_hs256=True, jwt_secret=STRONG)) == []


def test_production_refuses_a_jwks_without_audience_and_issuer() -> None:
    for partial in ({}, {"jwt_audience": "trial-api"}, {"jwt_issuer": "https://idp.example"}):
        found = production_refusals(production(**JWKS, **partial))
        assert len(found) == 1 and "TRIAL_JWT_AUDIENCE and TRIAL_JWT_ISSUER" in found[0]
    assert production_refusals(production(**JWKS, jwt_audience="trial-api",
                                          jwt_issuer="https://idp.example")) == []


def test_production_randomization_needs_a_seed_of_its_own() -> None:
    ok = {**JWKS, "jwt_audience": "trial-api", "jwt_issuer": "https://idp.example", **SASL}
    found = production_refusals(production(service_name="randomization", **ok))
    assert len(found) == 1 and "TRIAL_RANDOMIZATION_SECRET is the development secret" in found[0]
    short = production(service_name="randomization", randomization_secret="x" * 31, **ok)
    assert production_refusals(short) == ["TRIAL_RANDOMIZATION_SECRET is shorter than 32 bytes"]
    assert production_refusals(production(service_name="randomization",
                                          randomization_secret=SEED, **ok)) == []


TOKENS_OK = {"jwt_allow_hs256": True, "jwt_secret": STRONG}


@pytest.mark.parametrize("service", ["randomization", "dosing", "safety", "efficacy", "audit"])
def test_production_refuses_plaintext_kafka_in_every_service_and_says_how_to_fix_it(
        service: str) -> None:
    seed = {"randomization_secret": SEED} if service == "randomization" else {}
    found = production_refusals(production(service_name=service, **TOKENS_OK, **seed))
    assert len(found) == 1, found
    assert "Kafka is PLAINTEXT" in found[0]
    for fix in ("TRIAL_KAFKA_SECURITY_PROTOCOL=SASL_SSL", "TRIAL_KAFKA_SASL_USERNAME",
                "TRIAL_KAFKA_SASL_PASSWORD", "TRIAL_KAFKA_ALLOW_PLAINTEXT=true"):
        assert fix in found[0]
    # With SASL as the service's own principal, nothing is refused.
    assert production_refusals(production(service_name=service, **TOKENS_OK, **seed,
                                          **SASL)) == []


def test_the_gateway_has_no_kafka_client_and_so_no_kafka_refusal() -> None:
    assert production_refusals(production(service_name="gateway", **TOKENS_OK)) == []


def test_plaintext_kafka_only_when_explicitly_allowed() -> None:
    allowed = production(service_name="dosing", kafka_allow_plaintext=True, **TOKENS_OK)
    assert production_refusals(allowed) == []
    # The allowance changes nothing in development, which refuses nothing anyway.
    assert production_refusals(Settings(service_name="dosing")) == []
    assert Settings().kafka_allow_plaintext is False


def test_production_refuses_sasl_without_the_services_credentials() -> None:
    for missing in ("kafka_sasl_username", "kafka_sasl_password"):
        partial = {k: v for k, v in SASL.items() if k != missing}
        found = production_refusals(production(service_name="safety", **TOKENS_OK, **partial))
        assert found == ["TRIAL_KAFKA_SECURITY_PROTOCOL is SASL_SSL but TRIAL_KAFKA_SASL_USERNAME "
                         "or TRIAL_KAFKA_SASL_PASSWORD is not set"]


def test_a_refused_service_names_plaintext_kafka_and_never_the_sasl_password() -> None:
    from services.dosing.api import router

    password = "kafka-password-of-this-deployment"
    settings = production(service_name="dosing", **TOKENS_OK, kafka_sasl_password=password)
    with pytest.raises(InsecureSettings) as refused:
        create_app(ServiceSpec(name="dosing", router=router, consumes=[]), settings)
    assert "Kafka is PLAINTEXT" in str(refused.value)
    assert password not in str(refused.value) + repr(settings)


@pytest.mark.parametrize("service", ["gateway", "dosing"])
def test_a_refused_process_does_not_start_and_never_shows_the_secret(service: str) -> None:
    secret = "leaky-but-short"
    settings = production(service_name=service, jwt_secret=secret, jwt_allow_hs256=True)
    with pytest.raises(InsecureSettings) as refused:
        if service == "gateway":
            create_gateway(settings)
        else:
            from services.dosing.api import router
            create_app(ServiceSpec(name=service, router=router, consumes=[]), settings)
    assert "TRIAL_JWT_SECRET is shorter than 32 bytes" in str(refused.value)
    assert secret not in str(refused.value)


def test_secrets_and_the_database_url_stay_out_of_the_settings_repr() -> None:
    settings = Settings(jwt_secret=STRONG, randomization_secret=SEED,
                        database_url="postgresql+asyncpg://svc:hunter2@db/trial")
    shown = repr(settings) + str(settings)
    for secret in (STRONG, SEED, "hunter2", DEV_JWT_SECRET, DEV_RANDOMIZATION_SECRET):
        assert secret not in shown
    assert settings.jwt_secret.get_secret_value() == STRONG  # still there for who needs it


def test_a_token_valid_for_longer_than_the_cap_is_refused() -> None:
    settings = Settings(jwt_secret=STRONG, jwt_max_lifetime_s=3600)
    verifier = JWTVerifier(settings)
    assert verifier.verify(issue_dev_token(settings.jwt_secret, "monitor", ttl_s=3000)).role == (
        "monitor")
    with pytest.raises(AuthError, match="lifetime"):
        verifier.verify(issue_dev_token(settings.jwt_secret, "monitor", ttl_s=3700))
    now = int(time.time())
    # Issued long ago with a long life, even if little of it is left: refused all the same.
    old = jwt.encode({"sub": "m", "role": "monitor", "iat": now - 7000, "exp": now + 60},
                     STRONG, algorithm="HS256")
    with pytest.raises(AuthError, match="lifetime"):
        verifier.verify(old)
