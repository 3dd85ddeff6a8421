"""Failpoints (issue 15): a fault test's way to kill a process at one exact place; refused in
production, and of no effect when unset or elsewhere."""

from __future__ import annotations

import signal

import pytest
from pydantic import ValidationError

from shared.failpoints import BEFORE_OFFSET_COMMIT, Failpoints
from shared.settings import Settings, production_refusals


def test_the_nth_reach_kills_the_process_with_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: kills.append((pid, sig)))
    points = Failpoints(Settings(failpoint=f"{BEFORE_OFFSET_COMMIT}:3"))
    points.reach("another.place")
    points.reach(BEFORE_OFFSET_COMMIT)
    points.reach(BEFORE_OFFSET_COMMIT)
    assert kills == []
    points.reach(BEFORE_OFFSET_COMMIT)
    assert [sig for _, sig in kills] == [signal.SIGKILL]


def test_unset_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[int] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: kills.append(sig))
    points = Failpoints(Settings())
    for _ in range(5):
        points.reach(BEFORE_OFFSET_COMMIT)
    assert kills == []


def test_an_unknown_failpoint_or_a_bad_spelling_is_refused() -> None:
    with pytest.raises(ValueError, match="no failpoint"):
        Failpoints(Settings(failpoint="consumer.nowhere:1"))
    with pytest.raises(ValidationError):
        Settings(failpoint=f"{BEFORE_OFFSET_COMMIT}:0")


def test_production_refuses_to_start_with_a_failpoint() -> None:
    refusals = production_refusals(Settings(env="production", service_name="gateway",
                                            failpoint=f"{BEFORE_OFFSET_COMMIT}:1"))
    assert any("TRIAL_FAILPOINT" in r for r in refusals)
