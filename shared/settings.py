"""One settings class for every service, read from `TRIAL_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("randomization", "dosing", "safety", "efficacy", "audit")
DEV_JWT_SECRET = "dev-only-secret-change-me-in-production"
DEV_RANDOMIZATION_SECRET = "dev-only-randomization-secret-change-me"
MIN_SECRET_BYTES = 32  # a shared HS256 secret or the allocation seed, in production


class Settings(BaseSettings):
    """Every connection and knob is configuration, so one test suite runs on both backends."""

    model_config = SettingsConfigDict(env_prefix="TRIAL_", extra="ignore")

    # "production" (the default of the container image, compose and the chart) refuses to start
    # on anything that is only fit for a developer's machine: see `production_refusals`.
    env: Literal["development", "production"] = "development"
    service_name: str = "gateway"
    trial_id: str = "NCT03424629"
    data_dir: Path = Path(".run/data")
    # Empty means "SQLite file <data_dir>/<service_name>.db" (the embedded default). It may hold
    # a password: kept out of the settings' repr.
    database_url: str = Field("", repr=False)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_partitions: int = Field(3, ge=1)
    # Replicas of each topic the services create: 3 in production (the chart), 1 on one broker.
    kafka_replication_factor: int = Field(1, ge=1)
    # Kafka as a trust boundary (D48): SASL (SCRAM) as this service's own principal, whose ACLs
    # let it write only its own topics. PLAINTEXT: no authentication (a development broker).
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_request_timeout_ms: int = Field(10_000, ge=1000)
    # Production refuses PLAINTEXT (no authentication: anyone who reaches the broker could
    # publish as a service) unless this says so, as for HS256 tokens (D52).
    kafka_allow_plaintext: bool = False
    # Put before every topic name on the broker ("prod." gives prod.trial.enrollment), so that
    # environments can share a cluster; the code and the public contract keep the logical
    # names (shared.events), mapped only at the broker by shared.kafka.physical/logical (D52).
    # Empty: the names are the contract's.
    kafka_topic_prefix: str = Field("", max_length=100, pattern=r"^[A-Za-z0-9._-]*$")

    relay_enabled: bool = True
    relay_batch_size: int = Field(500, ge=1)
    relay_poll_interval_s: float = Field(0.2, gt=0)
    # How long a write's answer may wait for its events to reach the broker (D56); 0: not at all.
    answer_after_publish_s: float = Field(2.0, ge=0)
    consumers_enabled: bool = True
    kafka_fetch_max_wait_ms: int = Field(50, ge=10, le=5000)
    # How long a consumer may hold handled records' offsets before it commits them to the group
    # (D61): one commit for every fetch cost a round trip and the broker's work per record. A
    # crash re-reads at most this much, which the processed-event marks drop. 0: every fetch.
    kafka_commit_interval_ms: int = Field(500, ge=0, le=60_000)
    # How long a consumer lets records gather after a fetch that found some, before it fetches
    # again (D84): under traffic a few records share one fetch, transaction and commit instead
    # of one each. Never while a request waits for the consumer (`caught_up`: it is cut short),
    # never when idle (the first record after a quiet spell is handled at once). None: the
    # service's own (`ServiceSpec.consumer_linger_ms`); 0: never.
    kafka_consumer_linger_ms: int | None = Field(None, ge=0, le=1000)
    # Container allocations between two young-generation passes of the garbage collector, once
    # the process is up (D65, `shared.heap`); Python's own is 700. 0: Python's settings, no
    # freeze.
    gc_young_threshold: int = Field(20_000, ge=0, le=10_000_000)
    # A consumer's session: the embedded broker makes a joining member wait half of it before it
    # gets its partitions, so `trial run` shortens it (2 s: reading within a second of start);
    # Kafka's brokers refuse less than their group.min.session.timeout.ms (6 s by default).
    kafka_session_timeout_ms: int = Field(10_000, ge=1000, le=300_000)

    # Secrets are SecretStr: a repr, a log line or an error shows "**********".
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # In production, tokens signed with a shared secret (HS256) only when this says so: an
    # identity provider's keys (a JWKS, RS256) are the norm there.
    jwt_allow_hs256: bool = False
    # The longest a token may still be valid for when presented (and from its iat to its exp).
    jwt_max_lifetime_s: int = Field(12 * 3600, ge=60)

    # Seeds the concealed allocation sequence: only the randomization service may hold it.
    randomization_secret: SecretStr = SecretStr(DEV_RANDOMIZATION_SECRET)
    # A protocol configuration folder other than the built-in v1 (randomization honours it).
    protocol_dir: Path | None = None

    # Where `trial run` (make run) puts each process; the URLs below are how services find them.
    gateway_port: int = 8000
    randomization_port: int = 8001
    dosing_port: int = 8002
    safety_port: int = 8003
    audit_port: int = 8004
    efficacy_port: int = 8005
    randomization_url: str = "http://127.0.0.1:8001"
    dosing_url: str = "http://127.0.0.1:8002"
    safety_url: str = "http://127.0.0.1:8003"
    audit_url: str = "http://127.0.0.1:8004"
    efficacy_url: str = "http://127.0.0.1:8005"
    # The system's public base, as its callers reach it (the gateway): links the services make
    # for callers (FHIR's) start with it; unset, with the request's own base (D95).
    public_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    upstream_timeout_s: float = Field(10.0, gt=0)
    # The gateway's token bucket per principal: generous, so bursts of real work never trip it.
    rate_limit_per_s: float = Field(50.0, gt=0)
    rate_limit_burst: int = Field(200, ge=1)
    # Largest request body any service or the gateway reads (a screening is about 1 kB).
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # A first request with an Idempotency-Key that wrote nothing and has not answered after this
    # long is taken for dead (its process crashed): a retry with the key runs it again (D25).
    # Far longer than any request may run.
    idempotency_lease_s: float = Field(300.0, gt=0)
    # How often the audit ledger may publish its verified chain head to trial.audit.anchors (D27).
    audit_anchor_interval_s: float = Field(60.0, gt=0)
    # The audit ledger's name (its hash at position 1) pinned outside its database (D95): its
    # anchors are read for this name, and a ledger that no longer carries it fails verify (a
    # rewrite from position 1 renames the ledger, and its old anchors then name another).
    audit_ledger_id: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    # How often the audit service publishes the reads made through it to trial.access (D93).
    audit_views_interval_s: float = Field(1.0, gt=0)
    # How often dosing looks for visits whose window closed without a dose (VisitMissed).
    dosing_sweep_interval_s: float = Field(300.0, gt=0)
    # How often efficacy looks for assessment visits whose window closed (VisitMissed).
    efficacy_sweep_interval_s: float = Field(300.0, gt=0)
    # Tests and demonstrations only: dosing and efficacy read "now" from this file (an RFC 3339
    # instant) instead of the wall clock, so a test can move time for running processes.
    clock_file: Path | None = None
    # Fault tests only (issue 15; refused in production): `name:n` makes this process kill
    # itself (SIGKILL) the n-th time it reaches the failpoint `name` (shared/failpoints.py).
    failpoint: str | None = Field(None, pattern=r"^[a-z_.]+:[1-9][0-9]*$")
    # Log lines as JSON objects or readable text (shared/logs.py); unset: JSON in production,
    # the console elsewhere. The level of what is written (DEBUG shows the health probes' lines).
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / f'{self.service_name}.db'}"

    def service_ports(self) -> dict[str, int]:
        return {"gateway": self.gateway_port, "randomization": self.randomization_port,
                "dosing": self.dosing_port, "safety": self.safety_port,
                "audit": self.audit_port, "efficacy": self.efficacy_port}

    def service_urls(self) -> dict[str, str]:
        return {
            "randomization": self.randomization_url,
            "dosing": self.dosing_url,
            "safety": self.safety_url,
            "audit": self.audit_url,
            "efficacy": self.efficacy_url,
        }


class InsecureSettings(RuntimeError):
    """Production settings that must not run; the message names each problem, never a secret."""


def production_refusals(settings: Settings) -> list[str]:
    """What production mode refuses to start with (nothing in development)."""
    if settings.env != "production":
        return []
    found = []
    jwt_secret = settings.jwt_secret.get_secret_value()
    if settings.jwt_jwks_url is None:
        if not settings.jwt_allow_hs256:
            found.append("tokens would be HS256 with a shared secret: set TRIAL_JWT_JWKS_URL "
                         "(your identity provider's keys), or TRIAL_JWT_ALLOW_HS256=true")
        if jwt_secret == DEV_JWT_SECRET:
            found.append("TRIAL_JWT_SECRET is the development secret: anyone could mint a token")
        elif len(jwt_secret.encode()) < MIN_SECRET_BYTES:
            found.append(f"TRIAL_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
    elif settings.jwt_audience is None or settings.jwt_issuer is None:
        found.append("with a JWKS, TRIAL_JWT_AUDIENCE and TRIAL_JWT_ISSUER must both be set: "
                     "a token another application was issued would be accepted")
    if settings.failpoint is not None:
        found.append("TRIAL_FAILPOINT is set: a fault test's switch that kills the process")
    if settings.service_name in SERVICES:  # the processes with Kafka clients (not the gateway)
        found += _kafka_refusals(settings)
    if settings.service_name == "randomization":
        seed = settings.randomization_secret.get_secret_value()
        if seed == DEV_RANDOMIZATION_SECRET:
            found.append("TRIAL_RANDOMIZATION_SECRET is the development secret: the allocation "
                         "sequence could be regenerated from the source")
        elif len(seed.encode()) < MIN_SECRET_BYTES:
            found.append(f"TRIAL_RANDOMIZATION_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
    return found


def _kafka_refusals(settings: Settings) -> list[str]:
    if settings.kafka_security_protocol == "PLAINTEXT":
        if settings.kafka_allow_plaintext:
            return []
        return ["Kafka is PLAINTEXT (no authentication): anyone who reaches the broker could "
                "publish as this service; set TRIAL_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or "
                "SASL_PLAINTEXT) with TRIAL_KAFKA_SASL_USERNAME and TRIAL_KAFKA_SASL_PASSWORD, "
                "the service's own principal, or TRIAL_KAFKA_ALLOW_PLAINTEXT=true"]
    if not settings.kafka_sasl_username or settings.kafka_sasl_password is None:
        return [f"TRIAL_KAFKA_SECURITY_PROTOCOL is {settings.kafka_security_protocol} but "
                "TRIAL_KAFKA_SASL_USERNAME or TRIAL_KAFKA_SASL_PASSWORD is not set"]
    return []


def check_production(settings: Settings) -> None:
    """Refuse to start a process whose settings production mode refuses (`InsecureSettings`)."""
    if found := production_refusals(settings):
        raise InsecureSettings(f"TRIAL_ENV=production: {settings.service_name} will not start: "
                               + "; ".join(found))


@lru_cache
def get_settings() -> Settings:
    return Settings()
