"""The protocol configuration's `randomization` section (file `v1/randomization.json`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.events import ARMS, Arm


class MinimizationConfig(BaseModel):
    """Pocock-Simon minimization over site and PASI band, with a random element."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # The chance of taking the arm that minimizes imbalance; otherwise any arm within the bound.
    p_best: float = Field(gt=1 / 3, le=1)
    # Largest tolerated (max - min) count over arms within one factor level (a site, a PASI band).
    max_imbalance: int = Field(ge=1)


class CrossoverConfig(BaseModel):
    """When an investigator may move a randomized patient to another arm, if at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool
    from_arms: tuple[Arm, ...]
    to_arms: tuple[Arm, ...]
    min_weeks_since_assignment: int = Field(ge=0)
    max_crossovers_per_patient: int = Field(ge=1)


class RandomizationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    method: Literal["permuted_blocks", "minimization"]
    # Block sizes and their relative weights: each block's size is drawn from these.
    block_sizes: tuple[int, ...]
    block_size_weights: tuple[int, ...]
    minimization: MinimizationConfig
    crossover: CrossoverConfig

    @model_validator(mode="after")
    def _consistent(self) -> RandomizationConfig:
        if not self.block_sizes or len(self.block_sizes) != len(self.block_size_weights):
            raise ValueError("one weight per block size")
        if any(size <= 0 or size % len(ARMS) for size in self.block_sizes):
            raise ValueError(f"block sizes must be positive multiples of {len(ARMS)} (1:1:1)")
        if any(w < 0 for w in self.block_size_weights) or sum(self.block_size_weights) <= 0:
            raise ValueError("block size weights must be non-negative and not all zero")
        return self
