"""Our constructors against transformers' own RoPE init functions, and the candidate's own checks."""

import math

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fitness.baselines import BASELINES, baseline
from fitness.errors import RopeSearchError
from fitness.factor_files import load_factor_file
from fitness.factors import RopeCandidate, make_candidate
from fitness.geometry import RopeGeometry, geometry_from_config
from fitness.hf_config import longrope_config_keys
from tests.conftest import llama_config

WINDOW, SCALE = 256, 4.0


def exported_scaling(candidate) -> dict:
    """The rope_scaling dict an export writes for this candidate (what transformers should agree with)."""
    return longrope_config_keys(candidate, "llama")["rope_scaling"]


def transformers_rope(rope_type, seq_len=None, window=WINDOW, scale=SCALE, **params):
    """inv_freq and attention factor as transformers computes them for an equivalent config."""
    if rope_type == "dynamic":  # dynamic reads the window from max_position_embeddings
        config = llama_config(window=window, rope_scaling={"rope_type": "dynamic", "factor": scale, **params})
    else:
        rope_scaling = {"rope_type": rope_type, "factor": scale, "original_max_position_embeddings": window, **params}
        config = llama_config(window=window, scale=scale, rope_scaling=rope_scaling)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len), geometry_from_config(config)


def assert_same(ours: RopeCandidate, theirs, long=True):
    inv_freq, attention = theirs
    torch.testing.assert_close(ours.inv_freq(long=long), inv_freq.float(), rtol=1e-6, atol=1e-9)
    assert ours.attention_factor == pytest.approx(attention, rel=1e-6, abs=1e-6)


def test_pi_equals_linear():
    theirs, geometry = transformers_rope("linear")
    assert_same(baseline("pi", geometry, int(WINDOW * SCALE)), theirs)


@pytest.mark.parametrize("length", [256, 700, 1024, 3000])
def test_dynamic_ntk_equals_dynamic_at_each_length(length):
    theirs, geometry = transformers_rope("dynamic", seq_len=length, scale=1.0)
    assert_same(baseline("dynamic_ntk", geometry, 1024, length=length, factor=1.0), theirs)


@pytest.mark.parametrize("multiple", [2, 4])
def test_dynamic_ntk_baseline_is_the_dynamic_config_for_its_target(multiple):
    """As a baseline (no length, no factor: how the search and the reports build it) dynamic_ntk is
    {"rope_type": "dynamic", "factor": s} at the target length, not plain NTK."""
    target = WINDOW * multiple
    config = llama_config(window=WINDOW, rope_scaling={"rope_type": "dynamic", "factor": float(multiple)})
    theirs = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=target)
    geometry = geometry_from_config(config)
    ours = baseline("dynamic_ntk", geometry, target)
    assert_same(ours, theirs)
    assert ours.long_factors != baseline("ntk", geometry, target).long_factors


def test_dynamic_ntk_with_factor():
    theirs, geometry = transformers_rope("dynamic", seq_len=2048, scale=2.0)
    assert_same(baseline("dynamic_ntk", geometry, 1024, length=2048, factor=2.0), theirs)


@pytest.mark.parametrize("beta_fast, beta_slow", [(32, 1), (16, 2)])
def test_yarn_equals_yarn(beta_fast, beta_slow):
    theirs, geometry = transformers_rope("yarn", beta_fast=beta_fast, beta_slow=beta_slow)
    assert_same(baseline("yarn", geometry, int(WINDOW * SCALE), beta_fast=beta_fast, beta_slow=beta_slow), theirs)


def test_llama3_equals_llama3():
    theirs, geometry = transformers_rope("llama3", low_freq_factor=1.0, high_freq_factor=4.0)
    assert_same(baseline("llama3", geometry, int(WINDOW * SCALE)), theirs)


@pytest.mark.parametrize("method", ["critical_ntk", "ntk", "yarn", "ntk_by_parts"])
@pytest.mark.parametrize("long", [True, False])
def test_any_candidate_equals_longrope_with_its_factors(method, long):
    _, geometry = transformers_rope("linear")
    ours = baseline(method, geometry, int(WINDOW * SCALE))
    rope_scaling = exported_scaling(ours)
    # transformers 4.x reads the window for longrope from the top-level key only
    config = llama_config(
        window=WINDOW, scale=SCALE, rope_scaling=rope_scaling, original_max_position_embeddings=WINDOW
    )
    seq_len = WINDOW * 2 if long else WINDOW
    theirs = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)
    assert_same(ours, theirs, long=long)


def test_longrope_default_attention_factor_is_su():
    geometry = RopeGeometry(rotary_dim=32, base=1e4, original_window=WINDOW, head_dim=32)
    ours = baseline("critical_ntk", geometry, 1024)
    assert ours.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))


def test_ntk_is_a_new_base():
    geometry = RopeGeometry(rotary_dim=32, base=1e4, original_window=WINDOW, head_dim=32)
    ours = baseline("ntk", geometry, 1024)
    new_base = 1e4 * 4 ** (32 / 30)
    expected = 1.0 / new_base ** (torch.arange(0, 32, 2).double() / 32)
    torch.testing.assert_close(ours.inv_freq().double(), expected, rtol=1e-6, atol=0)


def test_critical_ntk_shape():
    geometry = RopeGeometry(rotary_dim=64, base=1e4, original_window=WINDOW, head_dim=64)
    ours = baseline("critical_ntk", geometry, 1024, critical_dim=10)
    assert ours.long_factors[0] == 1.0
    assert all(f == 4.0 for f in ours.long_factors[10:])
    assert ours.long_factors[5] == pytest.approx(4.0**0.5)
    assert list(ours.long_factors) == sorted(ours.long_factors)


def test_every_baseline_is_monotone_and_bounded():
    geometry = RopeGeometry(rotary_dim=64, base=1e4, original_window=WINDOW, head_dim=64)
    for name in BASELINES:
        factors = baseline(name, geometry, 1024).long_factors
        assert list(factors) == sorted(factors), name
        # dynamic NTK with factor s at s*L tokens interpolates as NTK with s*s - (s-1) = 13 (transformers)
        bound = 13.0 if name == "dynamic_ntk" else 4.0
        assert 1.0 - 1e-12 <= min(factors) and max(factors) <= bound + 1e-9, name


def test_json_round_trip(tmp_path):
    geometry = RopeGeometry(rotary_dim=64, base=1e4, original_window=WINDOW, head_dim=64)
    ours = baseline("yarn", geometry, 1024)
    ours.save(tmp_path / "f.json")
    back = load_factor_file(tmp_path / "f.json")
    assert back == ours
    assert torch.equal(back.inv_freq(), ours.inv_freq())


@pytest.mark.parametrize(
    "factors, needle",
    [
        ([1.0] * 31, "32 entries|31 entries"),
        ([1.0] * 31 + [float("nan")], r"long_factors\[31\]"),
        ([1.0] * 31 + [float("inf")], r"long_factors\[31\]"),
        ([0.0] + [1.0] * 31, r"long_factors\[0\]"),
        ([-2.0] + [1.0] * 31, r"long_factors\[0\]"),
    ],
)
def test_bad_factors_name_the_field(factors, needle):
    geometry = RopeGeometry(rotary_dim=64, base=1e4, original_window=WINDOW, head_dim=64)
    with pytest.raises(RopeSearchError, match=needle):
        make_candidate(geometry, 1024, factors)


def test_bad_factor_file_is_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '{"geometry": {"rotary_dim": 64, "base": 10000, "original_window": 256, "head_dim": 64},'
        ' "target_window": 1024, "long_factors": [1, 2]}'
    )
    with pytest.raises(RopeSearchError) as err:
        load_factor_file(path)
    assert "\n" not in str(err.value) and "bad.json" in str(err.value)


def test_unknown_method():
    geometry = RopeGeometry(rotary_dim=64, base=1e4, original_window=WINDOW, head_dim=64)
    with pytest.raises(RopeSearchError, match="unknown RoPE method"):
        baseline("linear-ish", geometry, 1024)
