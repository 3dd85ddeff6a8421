"""Structured logs (shared/logs.py): one JSON line a request, with the fields an operator searches
by, and no token, secret or patient data in any line; the standard library's calls come out as
JSON too. The gateway runs in process, its upstream a small aiohttp server on loopback."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from shared.auth import issue_dev_token
from shared.logs import configure_logging
from shared.settings import Settings
from tests.unit.gateway_upstream import SECRET, gateway_with

PATIENT = "PT-7Q3ZKX91AB"
NAME = "Wilhelmina Zwanenburg"  # a name-like field in a body: must appear in no line


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(Settings(service_name="gateway", log_format="json"), stream=stream)
    yield stream
    configure_logging(Settings(service_name="gateway", log_format="json"))  # back to stderr


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_a_request_is_one_json_line_with_its_fields_and_no_secret(
        lines: io.StringIO) -> None:
    seen: list[bytes] = []

    async def answer(request: web.BaseRequest) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"arm": "mtx"}, status=201)

    token = issue_dev_token(SECRET, "site_coordinator", "S1", sub="coordinator-17")
    async with gateway_with(answer) as client:
        r = await client.post(f"/v1/patients/{PATIENT}/randomization",
                              json={"full_name": NAME, "note": f"password={SECRET}"},
                              headers={"Authorization": f"Bearer {token}",
                                       "X-Request-ID": "req-logs-1"})
    assert r.status_code == 201 and len(seen) == 1  # forwarded, body and all
    assert json.loads(seen[0])["full_name"] == NAME

    found = parsed(lines)
    requests = [line for line in found if line.get("logger") == "trial.request"]
    assert len(requests) == 1, found
    line = requests[0]
    assert line["event"] == "request" and line["level"] == "info"
    assert line["service"] == "gateway"
    assert line["method"] == "POST"
    assert line["route"] == "/v1/patients/{patient_id}/randomization"  # the template, not the id
    assert line["status"] == 201
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["request_id"] == line["correlation_id"] == "req-logs-1"
    assert line["principal"] == {"sub": "coordinator-17", "role": "site_coordinator"}
    assert line["timestamp"].endswith("Z") and line["timestamp"][:4].isdigit()

    text = lines.getvalue()
    for leak in (token, token.split(".")[1], SECRET, NAME, PATIENT, "Bearer"):
        assert leak not in text, leak


async def test_a_stdlib_log_call_in_a_request_comes_out_as_json(lines: io.StringIO) -> None:
    token = issue_dev_token(SECRET, "monitor")  # may not enrol: the refusal is reported upstream
    async with gateway_with(None) as client:  # ... to a service that is down
        r = await client.post("/v1/patients", json={"screening_id": "s-1", "name": NAME},
                              headers={"Authorization": f"Bearer {token}",
                                       "X-Request-ID": "req-logs-2"})
    assert r.status_code == 403

    found = parsed(lines)
    # services/gateway/app.py's own `log.warning(...)`: a plain logging call
    warning = [line for line in found if line.get("logger") == "services.gateway.app"]
    assert len(warning) == 1, found
    assert warning[0]["level"] == "warning"
    assert warning[0]["event"].startswith("could not report AccessDenied to randomization")
    assert warning[0]["request_id"] == "req-logs-2" and warning[0]["service"] == "gateway"
    request = [line for line in found if line.get("logger") == "trial.request"]
    assert [(x["status"], x["route"], x["principal"]["role"]) for x in request] == [
        (403, "/v1/patients", "monitor")]
    assert token not in lines.getvalue() and NAME not in lines.getvalue()


def test_outside_a_request_a_stdlib_line_is_json_and_token_like_text_is_blanked(
        lines: io.StringIO) -> None:
    token = issue_dev_token(SECRET, "monitor")
    logging.getLogger("shared.relay").warning("publish failed: %r", f"Authorization: Bearer {token}",
                                              extra={"jwt_secret": SECRET, "topic": "trial.x"})
    (line,) = parsed(lines)
    assert line["level"] == "warning" and line["logger"] == "shared.relay"
    assert line["service"] == "gateway" and line["topic"] == "trial.x"
    assert "request_id" not in line
    assert token not in lines.getvalue() and SECRET not in lines.getvalue()
    assert line["jwt_secret"] == "[redacted]"


def test_every_line_is_scrubbed_not_only_the_first_with_its_keys(lines: io.StringIO) -> None:
    """The scrub remembers which keys are plain and which secret (D82): a key's second line is
    blanked as its first was, and a plain key's text is still searched for a token each time."""
    token = issue_dev_token(SECRET, "monitor")
    relay = logging.getLogger("shared.relay")
    relay.warning("first", extra={"api_key": "k-1", "detail": "plain"})
    relay.warning("second", extra={"api_key": "k-2", "detail": f"refused: Bearer {token}"})
    first, second = parsed(lines)
    assert first["api_key"] == second["api_key"] == "[redacted]"
    assert first["detail"] == "plain" and second["detail"] == "refused: [redacted]"
    assert token not in lines.getvalue()


def test_a_line_orjson_refuses_is_written_whole_by_the_standard_encoder(
        lines: io.StringIO) -> None:
    logging.getLogger("shared.relay").warning("counted", extra={"total": 2**70, "by_arm": {1: "a"}})
    (line,) = parsed(lines)
    assert line["event"] == "counted" and line["total"] == 2**70 and line["by_arm"] == {"1": "a"}


def test_a_console_traceback_shows_the_stack_and_never_the_locals() -> None:
    """Locals can hold patient data and, rendered by rich, ran to thousands of lines an error
    (docs/faults.md, defect 4): the development console prints a plain stack."""
    stream = io.StringIO()
    configure_logging(Settings(service_name="gateway", log_format="console"), stream=stream)
    try:
        patient_secret = "PATIENT-BIRTHDATE-1980-05-01"  # noqa: F841 (a local rich would show)
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("test").exception("failed")
    finally:
        configure_logging(Settings(service_name="gateway", log_format="json"))
    text = stream.getvalue()
    assert "RuntimeError: boom" in text and "Traceback" in text
    assert "PATIENT-BIRTHDATE" not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_consumed_line_is_what_structlogs_own_path_writes(fmt: str) -> None:
    """The per-record line skips the standard library's LogRecord (D60): the same processors
    must make the same line, token-like text blanked as everywhere."""
    import re

    import structlog

    from shared import logs

    stream = io.StringIO()
    configure_logging(Settings(service_name="audit", log_format=fmt), stream=stream)
    try:
        fields = {"service": "audit", "group": "audit", "topic": "trial.dosing", "partition": 1,
                  "offset": 42, "event_id": "e-1", "event_type": "InfusionGiven",
                  "correlation_id": "Bearer abc.def", "outcome": "handled", "duration_ms": 1.5}
        logs.consumed(**fields)  # type: ignore[arg-type]
        own = {("type" if key == "event_type" else key): value for key, value in fields.items()}
        structlog.stdlib.get_logger(logs.CONSUMER_LOGGER).info("record consumed", **own)
    finally:
        configure_logging(Settings(service_name="gateway", log_format="json"))
    direct, through_stdlib = (re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "T", line)
                              for line in stream.getvalue().splitlines())
    assert "record consumed" in direct and "abc.def" not in direct
    if fmt == "json":
        assert json.loads(direct) == json.loads(through_stdlib)
        assert json.loads(direct)["logger"] == logs.CONSUMER_LOGGER
    else:
        assert direct == through_stdlib


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_batchs_consumed_lines_are_one_write_each_line_whole() -> None:
    from shared import logs

    stream = _CountingStream()
    configure_logging(Settings(service_name="audit", log_format="json"), stream=stream)
    try:
        base = {"service": "audit", "group": "audit", "topic": "trial.dosing", "partition": 0,
                "event_type": "InfusionGiven", "correlation_id": None, "duration_ms": 2.345,
                "batch": 3}
        logs.consumed_lines([{**base, "offset": n, "event_id": f"e-{n}", "outcome": outcome}
                             for n, outcome in enumerate(("handled", "duplicate", "skipped"))])
    finally:
        configure_logging(Settings(service_name="gateway", log_format="json"))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert stream.writes == 1
    assert [(line["offset"], line["event_id"], line["outcome"], line["batch"]) for line in lines] == [
        (0, "e-0", "handled", 3), (1, "e-1", "duplicate", 3), (2, "e-2", "skipped", 3)]
    assert all(line["event"] == "record consumed" and line["duration_ms"] == 2.35
               and "correlation_id" not in line for line in lines)
