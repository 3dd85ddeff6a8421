"""Reading a `Server-Timing` value (D90): what the benchmark and a site's tooling parse."""

from __future__ import annotations

from shared.timing import entries


def test_entries_sum_by_name_and_skip_what_has_no_duration() -> None:
    value = 'commit;dur=4.2, publish;desc="broker";dur=9.8, cache, app;dur=x, commit;dur=0.8'
    assert entries(value) == {"commit": 5.0, "publish": 9.8}


def test_nothing_timed_is_nothing() -> None:
    assert entries("") == {}
