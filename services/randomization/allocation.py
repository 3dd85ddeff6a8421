"""Pure allocation: concealed permuted blocks per stratum, and Pocock-Simon minimization.

Every random choice comes from HMAC-SHA256 keyed by the service's secret, used as a
deterministic generator: block `i` of stratum `s` is drawn from HMAC(secret, "block|s|i|n") for
n = 0, 1, ... So the whole sequence is fixed by the secret alone (a statistician regenerates it
offline with `trial allocation-list`), and without the secret nothing predicts a slot.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from shared.events import ARMS, Arm
from shared.protocol.randomization import MinimizationConfig, RandomizationConfig

_WORD = 2**32


class Generator:
    """A deterministic random bit generator: HMAC-SHA256(secret, label|counter) as a stream."""

    def __init__(self, secret: bytes, label: str) -> None:
        self._words = self._stream(secret, label)

    @staticmethod
    def _stream(secret: bytes, label: str) -> Iterator[int]:
        counter = 0
        while True:
            digest = hmac.new(secret, f"{label}|{counter}".encode(), hashlib.sha256).digest()
            for i in range(0, len(digest), 4):
                yield int.from_bytes(digest[i:i + 4], "big")
            counter += 1

    def below(self, n: int) -> int:
        """A uniform integer in [0, n): rejection sampling, so no value is favoured."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = (_WORD // n) * n
        while True:
            word = next(self._words)
            if word < limit:
                return word % n

    def unit(self) -> float:
        """A uniform number in [0, 1)."""
        return next(self._words) / _WORD


def block(secret: bytes, config: RandomizationConfig, stratum: str, index: int) -> tuple[Arm, ...]:
    """Block `index` (from 0) of `stratum`: its size drawn by weight, then a uniform permutation."""
    rng = Generator(secret, f"block|{stratum}|{index}")
    pick = rng.below(sum(config.block_size_weights))
    size = config.block_sizes[-1]
    for candidate, weight in zip(config.block_sizes, config.block_size_weights, strict=True):
        if pick < weight:
            size = candidate
            break
        pick -= weight
    arms: list[Arm] = list(ARMS) * (size // len(ARMS))
    for i in range(len(arms) - 1, 0, -1):  # Fisher-Yates
        j = rng.below(i + 1)
        arms[i], arms[j] = arms[j], arms[i]
    return tuple(arms)


@dataclass(frozen=True)
class Slot:
    """One slot of a stratum's sequence; only the offline listing shows the block fields."""

    slot: int          # from 1, within the stratum
    block_index: int   # from 0
    block_size: int
    position: int      # from 1, within the block
    arm: Arm


def sequence(secret: bytes, config: RandomizationConfig, stratum: str, count: int) -> list[Slot]:
    """The first `count` slots of `stratum`, block by block."""
    slots: list[Slot] = []
    index = 0
    while len(slots) < count:
        arms = block(secret, config, stratum, index)
        for position, arm in enumerate(arms, start=1):
            slots.append(Slot(len(slots) + 1, index, len(arms), position, arm))
        index += 1
    return slots[:count]


def slot_arm(secret: bytes, config: RandomizationConfig, stratum: str, slot: int) -> Arm:
    """The arm of slot `slot` (from 1) of `stratum`."""
    return sequence(secret, config, stratum, slot)[-1].arm


# --- minimization -----------------------------------------------------------------------------

Counts = Mapping[str, Mapping[Arm, int]]  # factor level (e.g. "site=S1") -> arm -> patients


def imbalance_after(counts: Counts, levels: tuple[str, ...], arm: Arm) -> list[int]:
    """Per level of the patient: max - min count over arms if the patient joined `arm`."""
    ranges = []
    for level in levels:
        per_arm = {a: counts.get(level, {}).get(a, 0) + (a == arm) for a in ARMS}
        ranges.append(max(per_arm.values()) - min(per_arm.values()))
    return ranges


def minimize(counts: Counts, levels: tuple[str, ...], config: MinimizationConfig,
             rng: Generator) -> Arm:
    """Pocock-Simon (range, equal factor weights): the least-imbalancing arm with chance `p_best`,
    else a uniform arm; both only among arms that keep every level within `max_imbalance`."""
    ranges = {arm: imbalance_after(counts, levels, arm) for arm in ARMS}
    candidates = [a for a in ARMS if max(ranges[a]) <= config.max_imbalance] or list(ARMS)
    least = min(sum(ranges[a]) for a in candidates)
    best = [a for a in candidates if sum(ranges[a]) == least]
    pool = best if rng.unit() < config.p_best else candidates
    return pool[rng.below(len(pool))]
