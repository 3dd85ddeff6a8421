"""D65: the collector settled once a process is up: the heap built so far frozen, the young
generation larger; once a process, and not at all with a threshold of 0."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared import heap
from shared.settings import Settings


@pytest.fixture
def fresh_collector() -> Iterator[None]:
    """The collector as Python left it, and restored after the test."""
    threshold, settled = gc.get_threshold(), heap._settled
    heap._settled = False
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    heap._settled = settled


def test_settle_freezes_the_heap_and_raises_the_young_threshold(fresh_collector: None) -> None:
    gc.unfreeze()
    older = gc.get_threshold()[1:]
    heap.settle(Settings(service_name="heap-test", gc_young_threshold=12_345))
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (12_345, *older)


def test_settle_runs_once_a_process(fresh_collector: None) -> None:
    heap.settle(Settings(service_name="heap-test", gc_young_threshold=12_345))
    later = [object() for _ in range(10)]  # a container made after the first settle
    heap.settle(Settings(service_name="heap-test", gc_young_threshold=54_321))
    assert gc.get_threshold()[0] == 12_345
    # Not frozen: still in one of the collector's generations, so collectable.
    assert any(o is later for o in gc.get_objects())


def test_a_threshold_of_0_leaves_the_collector_as_it_is(fresh_collector: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    heap.settle(Settings(service_name="heap-test", gc_young_threshold=0))
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
