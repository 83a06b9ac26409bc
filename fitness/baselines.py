"""The baselines: each RoPE method as one pure function of the geometry and the target window, found by
name, as transformers' modeling_rope_utils.py keeps one function per `rope_type`. Each says where it comes
from and which transformers `rope_type` computes the same frequencies.

To add one: write `def my_method(geometry, target_window, **params) -> RopeCandidate` under
`@register_baseline("my_method")` (static=True if engines apply it at every length); configs, `ropesearch
eval` and `factors: my_method` find it by that name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate, attention_factor, make_candidate
from fitness.geometry import RopeGeometry

BASELINES: dict[str, Callable[..., RopeCandidate]] = {}
# the methods a search and an evaluation compare against by default
COMPARED = ("none", "pi", "ntk", "dynamic_ntk", "yarn", "critical_ntk")


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
    """The model as trained. transformers: `rope_type: default`."""
    return make_candidate(geometry, target_window, [1.0] * geometry.pairs, method="none")


@register_baseline("pi")
def position_interpolation(geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595): every frequency divided by s.
    transformers: `rope_type: linear`, factor s."""
    s = _scale(geometry, target_window)
    return make_candidate(geometry, target_window, [s] * geometry.pairs, method="pi", static=True)


@register_baseline("ntk")
def ntk_aware(geometry: RopeGeometry, target_window: int) -> RopeCandidate:
    """NTK-aware scaling (the YaRN paper's section 3.1, arXiv 2309.00071): base * s^(d/(d-2)), i.e.
    lambda_i = s^(2i/(d-2)). transformers has no static type for it (its `dynamic` type is `dynamic_ntk`)."""
    s = _scale(geometry, target_window)
    d = geometry.rotary_dim
    return make_candidate(
        geometry, target_window, [s ** (2 * i / (d - 2)) for i in range(geometry.pairs)], method="ntk", static=True
    )


@register_baseline("dynamic_ntk")
def dynamic_ntk(
    geometry: RopeGeometry, target_window: int, length: int | None = None, factor: float | None = None
) -> RopeCandidate:
    """Dynamic NTK (the YaRN paper's section 3.3): what transformers' {"rope_type": "dynamic", "factor": s}
    computes for a sequence of `length`
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
    """YaRN (Peng et al. 2023, arXiv 2309.00071), as transformers' `rope_type: yarn` builds it (beta_fast
    32, beta_slow 1, attention factor 0.1 ln s + 1): a linear ramp over pair indices between the pairs that turn
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
    """NTK-by-parts (the YaRN paper's section 3.2): a ramp over the turn ratio r_i = L / wavelength_i, s
    below alpha turns, 1 above beta. No transformers type: its `yarn` ramps over pair indices instead."""
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
    """Llama 3.1 (Meta 2024): s for wavelengths beyond L/low_freq_factor, 1 below L/high_freq_factor,
    smooth between. transformers: `rope_type: llama3`."""
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
    """LongRoPE2's critical-dimension NTK (Shang et al. 2025, arXiv 2502.20082), exported as transformers'
    `rope_type: longrope` (short and long factors): pairs from the (theoretical) critical pair get s, pairs below
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
