"""The LongRoPE2 space: every parameter dict decodes to a candidate inside the constraints."""

import random

import pytest

from fitness.baselines import baseline
from fitness.geometry import RopeGeometry
from search.space import RopeSpace, SpaceSettings

GEOMETRY = RopeGeometry(rotary_dim=64, base=10000.0, original_window=256, head_dim=64)


def random_params(space, rng):
    params = {name: (rng.randint(d.low, d.high) if name == "critical_dim" else rng.uniform(d.low - 1, d.high + 1))
              for name, d in space.distributions().items()}
    return params


@pytest.mark.parametrize("mode", ["critical", "free"])
def test_any_params_decode_inside_the_constraints(mode):
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings(mode=mode))
    rng = random.Random(0)
    for _ in range(200):
        candidate = space.decode(random_params(space, rng))
        factors = candidate.long_factors
        assert list(factors) == sorted(factors)
        assert max(factors) <= 8.0 + 1e-9
        if mode == "critical":
            c = candidate.params["critical_dim"]
            assert 5 <= c <= 13 == space.critical_range[1]
            assert all(4.0 <= f for f in factors[c:])
            for i in range(c):
                assert factors[i] == pytest.approx(factors[c] ** (i / c))
        else:
            assert min(factors) >= 1.0


def test_critical_range_is_the_papers_by_default():
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    assert space.critical_range == GEOMETRY.critical_dim_range() == (5, 13)
    assert "f4" not in space.distributions() and "f5" in space.distributions()


def test_encode_decode_keeps_critical_ntk_exactly():
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    for c in range(5, 14):
        seed = baseline("critical_ntk", GEOMETRY, 1024, critical_dim=c)
        assert space.decode(space.encode(seed)).long_factors == pytest.approx(seed.long_factors)


def test_yarn_seed_lands_at_its_ramp_end():
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    params = space.encode(baseline("yarn", GEOMETRY, 1024))
    yarn = baseline("yarn", GEOMETRY, 1024).long_factors
    reach = next(i for i, f in enumerate(yarn) if f >= 4.0 * (1 - 1e-6))
    assert params["critical_dim"] == min(reach, 13)


def test_attention_is_fixed_or_searched():
    fixed = RopeSpace(GEOMETRY, 1024, SpaceSettings(attention="yarn"))
    assert fixed.decode(fixed.encode(baseline("pi", GEOMETRY, 1024))).attention_factor == pytest.approx(1.1386294)
    searched = RopeSpace(GEOMETRY, 1024, SpaceSettings(search_attention=True))
    assert "attention_factor" in searched.distributions()
    params = searched.encode(baseline("critical_ntk", GEOMETRY, 1024))
    params["attention_factor"] = 99
    assert searched.decode(params).attention_factor == pytest.approx(searched.distributions()["attention_factor"].high)


def test_key_ignores_the_unused_head_and_float_noise():
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    params = space.encode(baseline("critical_ntk", GEOMETRY, 1024, critical_dim=9))
    other = dict(params, f5=7.5)  # below the critical pair: not part of the candidate
    other["f20"] = params["f20"] + 1e-9
    assert space.key(params) == space.key(other)
