"""The candidate type and the baseline rescale vectors, one pure function each, found by name.

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

from fitness.config_io import read_data, validation_message
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

    @classmethod
    def load(cls, path: str | Path) -> RopeCandidate:
        """A factor file: JSON, or YAML by its name (.yaml, .yml), read with bounds; numbers must be numbers."""
        path = Path(path)
        if not path.exists():
            raise RopeSearchError(f"{path}: no such factor file")
        data = read_data(path, "factor file", as_json=path.suffix not in (".yaml", ".yml"))
        _numbers_only(data, path)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise RopeSearchError(f"{path}: {validation_message(err)}") from None

    @classmethod
    def from_source(cls, source: str | Path) -> RopeCandidate:
        """A run folder (its best factors, with the short stage's short factors where it has run, and its
        search config as provenance) or a factor file (JSON or YAML): what export and training take,
        checked before anything is written."""
        source = Path(source)
        if source.is_dir():
            factors = source / "best_factors.json"
            if not factors.is_file():
                raise RopeSearchError(f"{source}: no best_factors.json (has the search finished a round?)")
            candidate = _extends(cls.load(factors), factors)
            short = source / "best_short_factors.json"  # the short-factor stage's, for these long factors
            if short.is_file():
                with_short = cls.load(short)
                if with_short.long_factors != candidate.long_factors:
                    raise RopeSearchError(f"{short}: searched for other long factors than {factors} holds")
                candidate = _extends(with_short, short)
            if (source / "config.yaml").exists():  # provenance: the search config travels with the factors
                config = read_data(source / "config.yaml", "run config")
                candidate = candidate.model_copy(update={"params": {**candidate.params, "search_config": config}})
            return candidate
        return _extends(cls.load(source), source)


NUMERIC_KEYS = ("target_window", "long_factors", "short_factors", "attention_factor", "geometry")


def _numbers_only(data, source: Path) -> None:
    """Factors written as strings ("1.5") would be coerced silently by the candidate type: a file that
    quotes its numbers was not written by this tool, so it is refused rather than guessed at."""
    if not isinstance(data, dict):
        return  # the candidate type reports what the top level should be
    for key in NUMERIC_KEYS:
        value = data.get(key)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for where, item in [(None, value), *items]:
            if isinstance(item, (str, bool)):
                at = key if where is None else f"{key}.{where}" if isinstance(where, str) else f"{key}[{where}]"
                raise RopeSearchError(f"{source}: {at} = {item!r}: numbers must be written as numbers")


def _extends(candidate: RopeCandidate, source: Path) -> RopeCandidate:
    g = candidate.geometry
    if candidate.target_window < g.original_window:
        raise RopeSearchError(
            f"{source}: target_window {candidate.target_window} is below the model's window {g.original_window} "
            "(factors extend a window; they cannot shrink it)"
        )
    return candidate


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


# ---------------------------------------------------------------- baselines
BASELINES: dict[str, Callable[..., RopeCandidate]] = {}


def register_baseline(name: str):
    def decorate(fn):
        BASELINES[name] = fn
        return fn

    return decorate


def baseline(name: str, geometry: RopeGeometry, target_window: int, **params) -> RopeCandidate:
    """Build the named baseline; unknown names and parameters are one-line errors."""
    if name not in BASELINES:
        raise RopeSearchError(f"unknown RoPE method {name!r}; known: {', '.join(BASELINES)}")
    try:
        return BASELINES[name](geometry, target_window, **params)
    except TypeError as err:
        raise RopeSearchError(f"method {name!r}: {err}") from None


def _scale(geometry: RopeGeometry, target_window: int) -> float:
    return target_window / geometry.original_window


@register_baseline("none")
def no_scaling(geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    return make_candidate(geometry, target_window, [1.0] * geometry.pairs, method="none")


@register_baseline("pi")
def position_interpolation(geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    """Linear PI: every frequency divided by s."""
    s = _scale(geometry, target_window)
    return make_candidate(geometry, target_window, [s] * geometry.pairs, method="pi", static=True)


@register_baseline("ntk")
def ntk_aware(geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    """NTK-aware: base * s^(d/(d-2)), i.e. lambda_i = s^(2i/(d-2))."""
    s = _scale(geometry, target_window)
    d = geometry.rotary_dim
    return make_candidate(
        geometry, target_window, [s ** (2 * i / (d - 2)) for i in range(geometry.pairs)], method="ntk", static=True
    )


@register_baseline("dynamic_ntk")
def dynamic_ntk(
    geometry: RopeGeometry, target_window: int, length: int | None = None, factor: float | None = None
) -> RopeCandidate:
    """What transformers' {"rope_type": "dynamic", "factor": s} computes for a sequence of `length`
    tokens (default: the target): NTK-aware with s' = s*len/L - (s-1), len = max(length, L). `factor`
    defaults to the target's s = L'/L, the config one would ship for that target; with factor 1 at the
    target it would be plain NTK (s' = s), and every report showed the two as one."""
    length = max(length or target_window, geometry.original_window)
    factor = _scale(geometry, target_window) if factor is None else factor
    s = factor * length / geometry.original_window - (factor - 1)
    d = geometry.rotary_dim
    return make_candidate(
        geometry,
        target_window,
        [s ** (2 * i / (d - 2)) for i in range(geometry.pairs)],
        method="dynamic_ntk",
        static=True,
        params={"length": length, "factor": factor},
    )


def _ramp(x: float, low: float, high: float) -> float:
    """0 at and below `low`, 1 at and above `high`, linear between: the ramp YaRN, NTK-by-parts and
    Llama 3 share (over pair indices or turn ratios)."""
    return min(max((x - low) / (high - low), 0.0), 1.0)


def _blend(s: float, extrapolate: float) -> float:
    """The factor of a pair that extrapolates by `extrapolate` (1: original frequency) and interpolates
    by the rest (0: divided by s), blended in frequency as transformers does."""
    return 1.0 / ((1 - extrapolate) / s + extrapolate)


@register_baseline("yarn")
def yarn(
    geometry: RopeGeometry,
    target_window: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    attention: str = "yarn",
) -> RopeCandidate:
    """YaRN as transformers builds it: a linear ramp over pair indices between the pairs that turn
    `beta_fast` and `beta_slow` times in the window; interpolation (s) below the ramp's end, none above."""
    s = _scale(geometry, target_window)
    d, window = geometry.rotary_dim, geometry.original_window
    low, high = geometry.pair_turning(beta_fast), geometry.pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    factors = []
    for i in range(geometry.pairs):
        factors.append(_blend(s, 1 - _ramp(i, low, high)))
    return make_candidate(
        geometry,
        target_window,
        factors,
        attention_factor=attention_factor(attention, s, window),
        method="yarn",
        static=True,
        params={"beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate},
    )


@register_baseline("ntk_by_parts")
def ntk_by_parts(
    geometry: RopeGeometry, target_window: int, alpha: float = 1.0, beta: float = 32.0, attention: str = "yarn"
) -> RopeCandidate:
    """The YaRN paper's ramp over the turn ratio r_i = L / wavelength_i: s below alpha turns, 1 above beta."""
    s = _scale(geometry, target_window)
    window = geometry.original_window
    factors = []
    for wavelength in geometry.wavelengths():
        factors.append(_blend(s, _ramp(window / wavelength, alpha, beta)))
    return make_candidate(
        geometry,
        target_window,
        factors,
        attention_factor=attention_factor(attention, s, window),
        method="ntk_by_parts",
        static=True,
        params={"alpha": alpha, "beta": beta},
    )


@register_baseline("llama3")
def llama3(
    geometry: RopeGeometry, target_window: int, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0
) -> RopeCandidate:
    """Llama 3.1: s for wavelengths beyond L/low_freq_factor, 1 below L/high_freq_factor, smooth between."""
    s = _scale(geometry, target_window)
    window = geometry.original_window
    low_wavelength, high_wavelength = window / low_freq_factor, window / high_freq_factor
    factors = []
    for wavelength in geometry.wavelengths():
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(s)
        else:
            factors.append(_blend(s, _ramp(window / wavelength, low_freq_factor, high_freq_factor)))
    return make_candidate(
        geometry,
        target_window,
        factors,
        method="llama3",
        static=True,
        params={"low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor},
    )


def critical_dim_shape(pairs: int, critical_dim: int, critical_factor: float, tail: list[float] | None = None):
    """LongRoPE2's shape: NTK-style `lambda_c^(i/c)` below the critical pair c, `tail` (or lambda_c) from it."""
    head = [critical_factor ** (i / critical_dim) for i in range(critical_dim)]
    tail = list(tail) if tail is not None else [critical_factor] * (pairs - critical_dim)
    return head + tail


@register_baseline("critical_ntk")
def critical_ntk(
    geometry: RopeGeometry,
    target_window: int,
    critical_dim: int | None = None,
    critical_factor: float | None = None,
    attention: str = "longrope",
) -> RopeCandidate:
    """LongRoPE2's critical-dimension NTK: pairs from the (theoretical) critical pair get s, pairs below
    it NTK-style from that factor. The starting point the search refines."""
    s = _scale(geometry, target_window)
    critical_dim = geometry.critical_dim() if critical_dim is None else critical_dim
    if not 0 < critical_dim < geometry.pairs:
        raise RopeSearchError(f"critical_dim must be in [1, {geometry.pairs - 1}], got {critical_dim}")
    critical_factor = s if critical_factor is None else critical_factor
    return make_candidate(
        geometry,
        target_window,
        critical_dim_shape(geometry.pairs, critical_dim, critical_factor),
        attention_factor=attention_factor(attention, s, geometry.original_window),
        method="critical_ntk",
        params={"critical_dim": critical_dim, "critical_factor": critical_factor},
    )


def check_geometry(candidate: RopeCandidate, geometry: RopeGeometry, source: str = "factors") -> None:
    """A factor vector only means something for the geometry it was made for."""
    mine = candidate.geometry
    for field in ("rotary_dim", "base", "original_window"):
        if getattr(mine, field) != getattr(geometry, field):
            raise RopeSearchError(
                f"{source}: made for {field}={getattr(mine, field)}, but the model has {field}={getattr(geometry, field)}"
            )


# transformers' dynamic NTK rescales by each input's own length (and leaves inputs inside the original
# window unscaled): no single vector, so no export, deploys it
LENGTH_DEPENDENT = {"dynamic_ntk"}


def deployed_baseline(name: str, geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    """A baseline as an engine deploys it for `target_window` tokens: the same factors and attention factor
    at every length, as transformers' `rope_type: yarn` (or linear, llama3...) applies them. Its short
    factors are its long ones, so a longrope export of it computes exactly that at every length."""
    if name in LENGTH_DEPENDENT:
        raise RopeSearchError(f"{name} rescales by each input's length; no factor vector deploys it "
                              f"(compare it under `methods:` in `ropesearch eval`)")
    candidate = baseline(name, geometry, target_window)
    return make_candidate(geometry, target_window, candidate.long_factors, static=True,
                          attention_factor=candidate.attention_factor, method=candidate.method,
                          params={**candidate.params, "deployed": "static"})


def factors_from(value: str, geometry: RopeGeometry, target_window: int | None) -> RopeCandidate:
    """What a config's `factors:` names: a method (`yarn`, `pi`, ...; a name wins over a file of that name,
    write ./yarn for the file), deployed for `target_window`, or a factor file or run folder, which must
    be for `geometry` (and, where `target_window` is given, for that target)."""
    if value in BASELINES:
        if target_window is None:
            raise RopeSearchError(f"the method {value!r} needs a target: give scale or target_window")
        return deployed_baseline(value, geometry, target_window)
    candidate = RopeCandidate.from_source(value)
    check_geometry(candidate, geometry, source=value)
    if target_window is not None and candidate.target_window != target_window:
        raise RopeSearchError(f"{value} was made for {candidate.target_window} tokens, not the target "
                              f"{target_window}; leave scale and target_window out, or give its own")
    return candidate
