"""Pure allocation: concealed permuted blocks per stratum, and Pocock-Simon minimization.

Every random choice comes from HMAC-SHA256 keyed by the service's secret, used as a
deterministic generator: block `i` of stratum `s` is drawn from HMAC(secret, "block|s|i|n") for
n = 0, 1, ... So the whole sequence is fixed by the secret alone (a statistician regenerates it
offline with `trial allocation-list`), and without the secret nothing predicts a slot.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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


# A sequence is a stratum's own (every arm), or, while arms are suspended, the stratum's sequence
# restricted to the open arms: "S1:pasi_lt20|msc_low+mtx". Each is drawn independently from the
# secret, so using one reveals nothing of another's slots (docs/decisions.md, D30).
RESTRICTED = "|"


def sequence_id(stratum: str, arms: tuple[Arm, ...]) -> str:
    return stratum if arms == ARMS else f"{stratum}{RESTRICTED}{'+'.join(arms)}"


def sequence_arms(sequence_or_stratum: str) -> tuple[str, tuple[Arm, ...]]:
    """(stratum, arms) of a sequence id; raises ValueError for an arm that is not the trial's."""
    stratum, _, restricted = sequence_or_stratum.partition(RESTRICTED)
    if not restricted:
        return stratum, ARMS
    named = tuple(restricted.split("+"))
    if not named or any(a not in ARMS for a in named) or len(set(named)) != len(named):
        raise ValueError(f"not a sequence of the trial's arms: {sequence_or_stratum}")
    return stratum, tuple(a for a in ARMS if a in named)


@functools.lru_cache(maxsize=4096)  # a block is fixed by its arguments; sequences reuse them
def block(secret: bytes, config: RandomizationConfig, stratum: str, index: int,
          arms: tuple[Arm, ...] = ARMS) -> tuple[Arm, ...]:
    """Block `index` (from 0) of the sequence of `stratum` over `arms`: its size drawn by weight
    (a configured size keeps its patients per arm: 3 and 6 over three arms are 2 and 4 over two),
    then a uniform permutation."""
    rng = Generator(secret, f"block|{sequence_id(stratum, arms)}|{index}")
    pick = rng.below(sum(config.block_size_weights))
    size = config.block_sizes[-1]
    for candidate, weight in zip(config.block_sizes, config.block_size_weights, strict=True):
        if pick < weight:
            size = candidate
            break
        pick -= weight
    slots: list[Arm] = list(arms) * (size // len(ARMS))
    for i in range(len(slots) - 1, 0, -1):  # Fisher-Yates
        j = rng.below(i + 1)
        slots[i], slots[j] = slots[j], slots[i]
    return tuple(slots)


@dataclass(frozen=True)
class Slot:
    """One slot of a stratum's sequence; only the offline listing shows the block fields."""

    slot: int          # from 1, within the stratum
    block_index: int   # from 0
    block_size: int
    position: int      # from 1, within the block
    arm: Arm


def sequence(secret: bytes, config: RandomizationConfig, stratum: str, count: int,
             arms: tuple[Arm, ...] = ARMS) -> list[Slot]:
    """The first `count` slots of the sequence of `stratum` over `arms`, block by block."""
    slots: list[Slot] = []
    index = 0
    while len(slots) < count:
        arms_of_block = block(secret, config, stratum, index, arms)
        for position, arm in enumerate(arms_of_block, start=1):
            slots.append(Slot(len(slots) + 1, index, len(arms_of_block), position, arm))
        index += 1
    return slots[:count]


def slot_arm(secret: bytes, config: RandomizationConfig, stratum: str, slot: int,
             arms: tuple[Arm, ...] = ARMS) -> Arm:
    """The arm of slot `slot` (from 1) of the sequence of `stratum` over `arms`: `sequence`'s
    answer, found by block sizes alone (the blocks before it are cached)."""
    index = 0
    while slot > len(arms_of_block := block(secret, config, stratum, index, arms)):
        slot -= len(arms_of_block)
        index += 1
    return arms_of_block[slot - 1]


# --- what an unblinded observer can work out ---------------------------------------------------


def possible_next(history: Sequence[Arm], config: RandomizationConfig,
                  arms: tuple[Arm, ...] = ARMS) -> set[Arm]:
    """The arms the next slot of a sequence may hold, for someone who knows every earlier slot
    of it (an open-label trial's site staff) and the block sizes, but not the secret.

    The history must split into whole balanced blocks followed by the start of one more; a
    single possible arm means the next allocation is known before it is made.
    """
    per_arm = sorted({size // len(ARMS) for size, weight
                      in zip(config.block_sizes, config.block_size_weights, strict=True)
                      if weight > 0})
    n = len(history)
    whole = [True] + [False] * n  # whole[i]: history[:i] is a run of complete blocks
    for i in range(n):
        if whole[i]:
            for k in per_arm:
                part = history[i:i + k * len(arms)]
                if len(part) == k * len(arms) and all(part.count(a) == k for a in arms):
                    whole[i + len(part)] = True
    possible: set[Arm] = set()
    for start in (i for i in range(n + 1) if whole[i]):
        counts = Counter(history[start:])
        for k in per_arm:
            if n - start < k * len(arms) and all(counts[a] <= k for a in arms):
                possible |= {a for a in arms if counts[a] < k}
    return possible


# --- minimization -----------------------------------------------------------------------------

Counts = Mapping[str, Mapping[Arm, int]]  # factor level (e.g. "site=S1") -> arm -> patients


def imbalance_after(counts: Counts, levels: tuple[str, ...], arm: Arm,
                    arms: tuple[Arm, ...] = ARMS) -> list[int]:
    """Per level of the patient: max - min count over `arms` if the patient joined `arm`."""
    ranges = []
    for level in levels:
        per_arm = {a: counts.get(level, {}).get(a, 0) + (a == arm) for a in arms}
        ranges.append(max(per_arm.values()) - min(per_arm.values()))
    return ranges


def minimize(counts: Counts, levels: tuple[str, ...], config: MinimizationConfig,
             rng: Generator, arms: tuple[Arm, ...] = ARMS) -> Arm:
    """Pocock-Simon (range, equal factor weights) over the open `arms`: the least-imbalancing arm
    with chance `p_best`, else a uniform arm; both only among arms that keep every level within
    `max_imbalance`. A suspended arm is neither a candidate nor counted in the imbalance."""
    ranges = {arm: imbalance_after(counts, levels, arm, arms) for arm in arms}
    candidates = [a for a in arms if max(ranges[a]) <= config.max_imbalance] or list(arms)
    least = min(sum(ranges[a]) for a in candidates)
    best = [a for a in candidates if sum(ranges[a]) == least]
    pool = best if rng.unit() < config.p_best else candidates
    return pool[rng.below(len(pool))]
