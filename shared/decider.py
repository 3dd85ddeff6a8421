"""The decider shape of every aggregate: `decide(state, command) -> [events]`, `evolve(state, event)
-> state`, both pure; an aggregate's state is its events folded through `evolve` from `initial`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import reduce
from typing import Any, Generic, NamedTuple, TypeVar

S = TypeVar("S")
C = TypeVar("C")
E = TypeVar("E")


def fold(evolve: Callable[[S, E], S], initial: S, events: Iterable[E]) -> S:
    return reduce(evolve, events, initial)


@dataclass(frozen=True)
class Decider(Generic[S, C, E]):
    """One aggregate. `decide` raises `shared.errors.Refused` for a command the rules refuse."""

    initial: S
    evolve: Callable[[S, E], S]
    decide: Callable[[S, C], list[E]]

    def fold(self, events: Iterable[E], state: S | None = None) -> S:
        return fold(self.evolve, self.initial if state is None else state, events)

    def run(self, state: S, command: C) -> tuple[list[E], S]:
        """The command's events, and the state after them."""
        events = self.decide(state, command)
        return events, self.fold(events, state)


class Identified(NamedTuple, Generic[E]):
    """An event with the id it is stored under, for aggregates whose rules cite events by id (the
    safety rules' evidence): the id travels with the event, so `evolve` keeps its two arguments."""

    event_id: str
    event: E


def no_commands(state: object, command: object) -> list[Any]:
    """The decide of an aggregate that only other aggregates' decisions evolve (an allocation)."""
    raise TypeError(f"{type(command).__name__}: this aggregate takes no commands")
