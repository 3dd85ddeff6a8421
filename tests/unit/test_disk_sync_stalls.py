"""bench.disk_sync's stall summary: overlapping slow syncs of several writers are one episode."""

from __future__ import annotations

from bench.disk_sync import _stalls


def test_overlapping_slow_syncs_of_several_writers_are_one_episode() -> None:
    runs = [
        [(0.0, 1.0), (10.0, 300.0), (20.0, 1.0)],  # writer 0: a stall from 10.0 to 10.3 s
        [(0.5, 1.0), (10.1, 250.0), (19.0, 60.0)],  # writer 1: caught by it, then one alone
        [(1.0, 1.0), (15.0, 2.0), (20.0, 1.0)],  # writer 2: never
    ]
    summary = _stalls(runs)
    assert summary.startswith("2 episodes of syncs over 50 ms in 20 s, the longest 350 ms")
    assert "median 1.5 of 3" in summary
    assert summary.endswith("2.0 % of the time inside one")  # (0.35 + 0.06) s of 20


def test_no_stall() -> None:
    assert _stalls([[(0.0, 1.0), (5.0, 2.0)]]) == "no sync over 50 ms in 5 s"
