"""The candidate type: long and short factors, an attention factor, the geometry they were made for.
Its baselines are in fitness/baselines.py, its files in fitness/factor_files.py.

Convention (shared with transformers, vLLM and llama.cpp `long_factor`): a rescale vector `lambda`
has one entry per frequency pair, and the rescaled inverse frequency is `theta_i / lambda_i`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fitness.config_io import validation_message
from fitness.errors import RopeSearchError
from fitness.geometry import RopeGeometry


class RopeCandidate(BaseModel):
    """One point of the search: long (and optional short) factors, an attention factor, and the
    geometry and target window they were made for. Byte for byte what search scores, export writes
    and training applies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    geometry: RopeGeometry
    target_window: int = Field(gt=0)
    long_factors: tuple[float, ...]
    short_factors: tuple[float, ...] | None = None
    attention_factor: float = Field(default=1.0, gt=0)
    method: str = "custom"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("long_factors", "short_factors")
    @classmethod
    def _finite_and_positive(cls, factors, info):
        if factors is None:
            return factors
        for i, value in enumerate(factors):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{info.field_name}[{i}] = {value}: factors must be finite and > 0")
        return factors

    @model_validator(mode="after")
    def _one_factor_per_pair(self) -> RopeCandidate:
        for name in ("long_factors", "short_factors"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != self.geometry.pairs:
                raise ValueError(
                    f"{name} has {len(factors)} entries, the rotary dimension {self.geometry.rotary_dim} "
                    f"needs {self.geometry.pairs} (one per frequency pair)"
                )
        return self

    @property
    def scale(self) -> float:
        return self.target_window / self.geometry.original_window

    def factors(self, long: bool) -> tuple[float, ...]:
        if long or self.short_factors is None:
            return self.long_factors if long else (1.0,) * self.geometry.pairs
        return self.short_factors

    def inv_freq(self, long: bool = True) -> torch.Tensor:
        """Rescaled inverse frequencies, float32, computed the way transformers' longrope does."""
        return self.geometry.base_inv_freq(self.factors(long))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


def make_candidate(
    geometry: RopeGeometry, target_window: int, long_factors, static: bool = False, **kwargs
) -> RopeCandidate:
    """A validated candidate. `static`: the same factors at every length (short = long), as transformers
    runs linear/yarn/llama3 scaling; otherwise short sequences keep the original RoPE (LongRoPE2)."""
    long_factors = tuple(float(x) for x in long_factors)
    if static:
        kwargs["short_factors"] = long_factors
    try:
        return RopeCandidate(geometry=geometry, target_window=target_window, long_factors=long_factors, **kwargs)
    except ValidationError as err:
        raise RopeSearchError(validation_message(err)) from None


# ---------------------------------------------------------------- attention factors
ATTENTION_FACTORS: dict[str, Callable[[float, int], float]] = {
    "none": lambda s, window: 1.0,
    "yarn": lambda s, window: 0.1 * math.log(s) + 1.0 if s > 1 else 1.0,
    "longrope": lambda s, window: math.sqrt(1 + math.log(s) / math.log(window)) if s > 1 else 1.0,
}


def attention_factor(name: str, scale: float, original_window: int) -> float:
    if name not in ATTENTION_FACTORS:
        raise RopeSearchError(f"unknown attention factor {name!r}; known: {', '.join(ATTENTION_FACTORS)}")
    return ATTENTION_FACTORS[name](scale, original_window)


def check_geometry(candidate: RopeCandidate, geometry: RopeGeometry, source: str = "factors") -> None:
    """A factor vector only means something for the geometry it was made for."""
    mine = candidate.geometry
    for field in ("rotary_dim", "base", "original_window"):
        if getattr(mine, field) != getattr(geometry, field):
            raise RopeSearchError(
                f"{source}: made for {field}={getattr(mine, field)}, but the model has {field}={getattr(geometry, field)}"
            )
