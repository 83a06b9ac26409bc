"""The RoPE geometry of a model: rotary dimension, base, original window.

Read from a Hugging Face config in either the transformers 4.x form (`rope_theta`, `rope_scaling`,
`partial_rotary_factor` at the top level) or the 5.x form (`rope_parameters`), as an object or as
the plain dict of a config.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitness.errors import RopeSearchError


class RopeGeometry(BaseModel):
    """What a rescale vector is made for: `rotary_dim / 2` frequency pairs of `base`, window `original_window`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rotary_dim: int = Field(gt=0)
    base: float = Field(gt=1.0)
    original_window: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _rotary_dim_is_even_and_fits(self) -> RopeGeometry:
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} exceeds head_dim {self.head_dim}")
        return self

    @property
    def pairs(self) -> int:
        return self.rotary_dim // 2

    def base_inv_freq(self, factors: Sequence[float] | None = None) -> torch.Tensor:
        """theta_i = base^(-2i/d), divided by factor_i if given: float32, computed the way transformers
        computes it (default and longrope alike), so a candidate scores what an exported model runs."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        if factors is None:
            return 1.0 / (self.base**exponents)
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * self.base**exponents)

    def wavelengths(self) -> list[float]:
        return [2 * math.pi * self.base ** (2 * i / self.rotary_dim) for i in range(self.pairs)]

    def critical_dim(self, window: int | None = None) -> int:
        """Theoretical critical pair: the first pair whose wavelength exceeds the window.

        `ceil((d/2) * log_base(L / 2pi))` (LongRoPE2); pairs at and above it never completed a full
        rotation during pre-training, so they meet unseen angles when positions grow.
        """
        value = self.pair_turning(1.0, window)
        return int(min(max(math.ceil(value - 1e-9), 0), self.pairs - 1))

    def critical_dim_range(self, window: int | None = None) -> tuple[int, int]:
        """The LongRoPE2 search range for the real critical pair: from the pair that completes 10 turns
        in the window up to the theoretical critical pair."""
        low = math.ceil(self.pair_turning(10.0, window) - 1e-9)
        high = self.critical_dim(window)
        return max(1, min(low, high)), high

    def pair_turning(self, turns: float, window: int | None = None) -> float:
        """The (fractional) pair index whose rotation completes `turns` turns in the window: where YaRN's
        ramp starts and ends, and where the critical pair (1 turn) and its search range (10) lie."""
        window = window or self.original_window
        return self.rotary_dim * math.log(window / (turns * 2 * math.pi)) / (2 * math.log(self.base))


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        # to_dict drops nothing we need and flattens both 4.x and 5.x objects the same way
        data = config.to_dict()
        for key in ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "head_dim"):
            if hasattr(config, key) and key not in data:
                data[key] = getattr(config, key)
        return data
    raise RopeSearchError(f"cannot read a RoPE geometry from {type(config).__name__}; give a config or a dict")


def geometry_from_config(config: Any) -> RopeGeometry:
    """RopeGeometry of an HF config (object or config.json dict), transformers 4.x or 5.x form."""
    data = _as_dict(config)
    model_type = data.get("model_type", "?")
    rope_parameters = data.get("rope_parameters") or {}
    if rope_parameters and not isinstance(rope_parameters, Mapping):
        raise RopeSearchError(f"rope_parameters must be a mapping, got {type(rope_parameters).__name__}")
    if any(isinstance(v, Mapping) for v in rope_parameters.values()):
        raise RopeSearchError(
            f"model_type={model_type}: per-layer-type RoPE ({sorted(rope_parameters)}) is not supported"
        )
    rope_scaling = data.get("rope_scaling") or {}

    base = rope_parameters.get("rope_theta", data.get("rope_theta"))
    if base is None:
        raise RopeSearchError(f"model_type={model_type} has no rotary position embedding (no rope_theta)")

    num_heads = data.get("num_attention_heads")
    head_dim = data.get("head_dim") or (data["hidden_size"] // num_heads if num_heads else None)
    if not head_dim:
        raise RopeSearchError(f"model_type={model_type}: neither head_dim nor hidden_size/num_attention_heads")
    partial = rope_parameters.get("partial_rotary_factor", data.get("partial_rotary_factor")) or 1.0
    if not 0 < float(partial) <= 1:
        raise RopeSearchError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    rotary_dim = int(head_dim * float(partial))
    if rotary_dim % 2 or rotary_dim == 0:
        raise RopeSearchError(
            f"head_dim={head_dim} x partial_rotary_factor={partial} gives an odd rotary dimension {rotary_dim}"
        )

    original = (
        rope_parameters.get("original_max_position_embeddings")
        or rope_scaling.get("original_max_position_embeddings")
        or data.get("original_max_position_embeddings")
        or data.get("max_position_embeddings")
    )
    if not original:
        raise RopeSearchError(f"model_type={model_type}: no max_position_embeddings in the config")
    return RopeGeometry(rotary_dim=rotary_dim, base=float(base), original_window=int(original), head_dim=int(head_dim))
