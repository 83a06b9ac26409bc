"""The LongRoPE2 search space, and candidates <-> Optuna parameters.

critical mode (default): the critical pair `c` is searched inside a range; factors at and above it
lie in [s, upper*s] and never decrease; factors below it follow NTK from the factor at `c`
(`lambda_i = lambda_c^(i/c)`), recomputed after every change.
free mode (ablation): every pair in [1, upper*s], never decreasing.

Parameters: `critical_dim` (int), `f{i}` for every pair that can be searched, optionally
`attention_factor`. Any parameter dict decodes to a valid candidate: `repair` clamps and makes the
factors monotone, so Optuna's own samplers (TPE, CMA-ES, random) can share the space.
"""

from __future__ import annotations

from typing import Literal

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from fitness.baselines import critical_dim_shape
from fitness.errors import RopeSearchError
from fitness.factors import ATTENTION_FACTORS, RopeCandidate, attention_factor, make_candidate
from fitness.geometry import RopeGeometry


class SpaceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["critical", "free"] = "critical"
    critical_dim_range: tuple[int, int] | None = None  # None: LongRoPE2's (10-turn pair, theoretical)
    upper: float = Field(default=2.0, ge=1.0)  # factors at/above the critical pair lie in [s, upper*s]
    attention: Literal["longrope", "yarn", "none"] | PositiveFloat = "longrope"  # a formula's name, or the factor
    search_attention: bool = False
    attention_range: tuple[float, float] = (0.8, 1.3)  # multiples of the fixed attention factor

    @field_validator("critical_dim_range")
    @classmethod
    def _ordered(cls, value):
        if value is not None and value[0] > value[1]:
            raise ValueError("must be [low, high] with low <= high")
        return value

    @field_validator("attention_range")
    @classmethod
    def _attention_range(cls, value):
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value


class RopeSpace:
    """The space for one geometry and target window."""

    def __init__(self, geometry: RopeGeometry, target_window: int, settings: SpaceSettings):
        self.geometry, self.target_window, self.settings = geometry, target_window, settings
        self.scale = target_window / geometry.original_window
        if self.scale <= 1:
            raise RopeSearchError(f"target window {target_window} must exceed the original {geometry.original_window}")
        self.pairs = geometry.pairs
        low, high = settings.critical_dim_range or geometry.critical_dim_range()
        if not 1 <= low <= high < self.pairs:
            raise RopeSearchError(f"critical_dim_range [{low}, {high}] must lie within [1, {self.pairs - 1}]")
        self.critical_range = (low, high)
        self.attention = (
            attention_factor(settings.attention, self.scale, geometry.original_window)
            if settings.attention in ATTENTION_FACTORS
            else float(settings.attention)
        )
        self.factor_low = self.scale if settings.mode == "critical" else 1.0
        self.factor_high = settings.upper * self.scale
        self.first_searched = low if settings.mode == "critical" else 0

    @property
    def critical(self) -> bool:
        return self.settings.mode == "critical"

    def distributions(self) -> dict[str, BaseDistribution]:
        space: dict[str, BaseDistribution] = {}
        if self.critical:
            space["critical_dim"] = IntDistribution(*self.critical_range)
        for i in range(self.first_searched, self.pairs):
            space[f"f{i}"] = FloatDistribution(self.factor_low, self.factor_high)
        if self.settings.search_attention:
            low, high = self.settings.attention_range
            space["attention_factor"] = FloatDistribution(low * self.attention, high * self.attention)
        return space

    # ---------------------------------------------------------------- candidate <-> params
    def repair(self, params: dict) -> dict:
        """Clamp into bounds and sort the active factors ascending; the result decodes as-is.

        Sorting (rather than a running maximum) keeps the values a sampler chose, so a step down
        moves a value to an earlier pair instead of vanishing."""
        fixed = dict(params)
        low, high = self.critical_range
        start = 0
        if self.critical:
            start = fixed["critical_dim"] = int(min(max(round(params["critical_dim"]), low), high))
        clamped = {i: min(max(float(params[f"f{i}"]), self.factor_low), self.factor_high)
                   for i in range(self.first_searched, self.pairs)}
        active = sorted(clamped[i] for i in range(start, self.pairs))
        clamped.update(zip(range(start, self.pairs), active))
        fixed.update({f"f{i}": value for i, value in clamped.items()})
        if self.settings.search_attention:
            dist = self.distributions()["attention_factor"]
            fixed["attention_factor"] = min(max(float(params["attention_factor"]), dist.low), dist.high)
        return fixed

    def decode(self, params: dict) -> RopeCandidate:
        params = self.repair(params)
        if self.critical:
            c = params["critical_dim"]
            tail = [params[f"f{i}"] for i in range(c, self.pairs)]
            factors = critical_dim_shape(self.pairs, c, tail[0], tail)
            extra = {"critical_dim": c}
        else:
            factors = [params[f"f{i}"] for i in range(self.pairs)]
            extra = {}
        return make_candidate(
            self.geometry,
            self.target_window,
            factors,
            attention_factor=params.get("attention_factor", self.attention),
            method="longrope2-search" if self.critical else "free-search",
            params=extra,
        )

    def encode(self, candidate: RopeCandidate) -> dict:
        """Parameters of the nearest point of the space (used to seed it from baselines)."""
        factors = list(candidate.long_factors)
        params: dict = {}
        if self.critical:
            # the critical pair of a ramp is where the factor first reaches s
            reach = next((i for i, f in enumerate(factors) if f >= self.scale * (1 - 1e-6)), self.pairs - 1)
            params["critical_dim"] = candidate.params.get("critical_dim", reach)
        for i in range(self.first_searched, self.pairs):
            params[f"f{i}"] = factors[i]
        if self.settings.search_attention:
            params["attention_factor"] = candidate.attention_factor
        return self.repair(params)

    def key(self, params: dict) -> tuple:
        """What makes two points the same candidate (rounded, so float noise is no novelty)."""
        params = self.repair(params)
        start = params["critical_dim"] if self.critical else 0
        factors = tuple(round(params[f"f{i}"], 5) for i in range(start, self.pairs))
        return (params.get("critical_dim"), factors, round(params.get("attention_factor", self.attention), 5))


# ---------------------------------------------------------------- the short factors (second stage)
class ShortSpaceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["monotone", "free"] = "monotone"  # monotone: never decreasing over the pairs, as the long ones
    low: float = Field(default=1.0, gt=0)
    high: float | None = Field(default=None, gt=0, le=1e6)  # None: the largest long factor (at least s), so long^p fits

    @field_validator("high")
    @classmethod
    def _above_low(cls, value, info):
        if value is not None and value < info.data.get("low", 0):
            raise ValueError("must be at least low")
        return value


class ShortSpace:
    """Short factors (one per pair, `s{i}`) for a fixed long candidate: its long factors and attention
    factor never change here, so whatever this stage finds leaves inputs beyond the window as they were."""

    def __init__(self, long: RopeCandidate, settings: ShortSpaceSettings):
        self.long, self.settings, self.pairs = long, settings, long.geometry.pairs
        self.low = settings.low
        self.high = settings.high if settings.high is not None else max(long.scale, *long.long_factors, settings.low)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {f"s{i}": FloatDistribution(self.low, self.high) for i in range(self.pairs)}

    def repair(self, params: dict) -> dict:
        values = [min(max(float(params[f"s{i}"]), self.low), self.high) for i in range(self.pairs)]
        if self.settings.mode == "monotone":
            values.sort()
        return {f"s{i}": value for i, value in enumerate(values)}

    def decode(self, params: dict) -> RopeCandidate:
        params = self.repair(params)
        short = tuple(params[f"s{i}"] for i in range(self.pairs))
        return self.long.model_copy(update={"short_factors": short, "method": "longrope2-search+short"})

    def encode(self, candidate: RopeCandidate) -> dict:
        return self.repair({f"s{i}": f for i, f in enumerate(candidate.factors(long=False))})

    def seed(self, exponent: float) -> RopeCandidate:
        """Short factors long^p: 0 gives ones (what the long stage exports), 1 the long factors themselves."""
        return self.decode({f"s{i}": f**exponent for i, f in enumerate(self.long.long_factors)})
