"""What makes two POSTs "the same request" for Idempotency-Key."""

from __future__ import annotations

from shared.idempotency import request_hash


def test_the_same_request_hashes_the_same() -> None:
    assert request_hash("POST", "/v1/screenings", b"", b'{"a":1}') == \
        request_hash("POST", "/v1/screenings", b"", b'{"a":1}')


def test_body_path_query_and_method_each_count() -> None:
    base = request_hash("POST", "/v1/screenings", b"", b'{"a":1}')
    assert len({base,
                request_hash("POST", "/v1/screenings", b"", b'{"a":2}'),
                request_hash("POST", "/v1/patients", b"", b'{"a":1}'),
                request_hash("POST", "/v1/screenings", b"x=1", b'{"a":1}'),
                request_hash("PUT", "/v1/screenings", b"", b'{"a":1}')}) == 5


def test_parts_cannot_slide_into_each_other() -> None:
    assert request_hash("POST", "/v1/a", b"", b"b") != request_hash("POST", "/v1/", b"", b"ab")
