"""The decider shape's one loop: an aggregate's state is its events folded through `evolve`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import reduce
from typing import TypeVar

S = TypeVar("S")
E = TypeVar("E")


def fold(evolve: Callable[[S, E], S], initial: S, events: Iterable[E]) -> S:
    return reduce(evolve, events, initial)
