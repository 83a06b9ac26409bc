"""Applying candidates to a loaded model: same logits as transformers' own scaling, exact restore."""

import pytest
import torch

from fitness.baselines import baseline
from fitness.errors import RopeSearchError
from fitness.factors import make_candidate
from fitness.geometry import geometry_from_config
from fitness.hf_config import longrope_config_keys
from fitness.patch import apply_candidates
from tests.conftest import llama_config

WINDOW, SCALE = 64, 4.0
TARGET = int(WINDOW * SCALE)


def exported_scaling(candidate) -> dict:
    """The rope_scaling dict an export writes for this candidate (what transformers should agree with)."""
    return longrope_config_keys(candidate, "llama")["rope_scaling"]


def logits(model, length, seed=1, batch=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    with torch.no_grad():
        return model(ids).logits


def reference_model(base_model, rope_scaling, window=WINDOW, scale=SCALE, **overrides):
    """The same weights, built by transformers from an equivalent rope_scaling."""
    from transformers import LlamaForCausalLM

    config = llama_config(window=window, scale=scale, rope_scaling=rope_scaling, **overrides)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(base_model.state_dict())
    return model


EQUIVALENT = {
    "pi": {"rope_type": "linear", "factor": SCALE},
    "yarn": {"rope_type": "yarn", "factor": SCALE, "original_max_position_embeddings": WINDOW},
    "llama3": {
        "rope_type": "llama3",
        "factor": SCALE,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": WINDOW,
    },
}


@pytest.mark.parametrize("method", sorted(EQUIVALENT))
@pytest.mark.parametrize("length", [WINDOW // 2, WINDOW * 3])
def test_logits_equal_transformers_scaling(make_llama, method, length):
    model = make_llama(window=WINDOW)
    reference = reference_model(model, EQUIVALENT[method])
    candidate = baseline(method, geometry_from_config(model.config), TARGET)
    with apply_candidates(model, candidate):
        ours = logits(model, length)
    torch.testing.assert_close(ours, logits(reference, length))


@pytest.mark.parametrize("length", [WINDOW // 2, WINDOW, WINDOW + 1, WINDOW * 3])
def test_logits_equal_transformers_longrope_both_sides_of_the_window(make_llama, length):
    model = make_llama(window=WINDOW)
    candidate = baseline("critical_ntk", geometry_from_config(model.config), TARGET)
    reference = reference_model(model, exported_scaling(candidate), original_max_position_embeddings=WINDOW)
    with apply_candidates(model, candidate):
        ours = logits(model, length)
    torch.testing.assert_close(ours, logits(reference, length))


def test_dynamic_ntk_at_the_length_equals_dynamic(make_llama):
    model = make_llama(window=WINDOW)
    reference = reference_model(model, {"rope_type": "dynamic", "factor": 1.0}, scale=1.0)
    length = WINDOW * 3
    candidate = baseline("dynamic_ntk", geometry_from_config(model.config), TARGET, length=length, factor=1.0)
    with apply_candidates(model, candidate):
        ours = logits(model, length)
    torch.testing.assert_close(ours, logits(reference, length))


def test_restore_is_exact(make_llama):
    model = make_llama(window=WINDOW)
    before_short, before_long = logits(model, WINDOW // 2), logits(model, WINDOW * 2)
    rotary = model.model.rotary_emb
    buffers = {k: v.clone() for k, v in rotary.named_buffers()}
    handle = apply_candidates(model, baseline("yarn", geometry_from_config(model.config), TARGET))
    assert not torch.equal(logits(model, WINDOW * 2), before_long)
    handle.restore()
    assert model.model.rotary_emb is rotary
    assert all(torch.equal(v, dict(rotary.named_buffers())[k]) for k, v in buffers.items())
    assert torch.equal(logits(model, WINDOW // 2), before_short)
    assert torch.equal(logits(model, WINDOW * 2), before_long)


@pytest.mark.parametrize("own", ["longrope", "dynamic"])
def test_holds_across_transformers_own_per_forward_update(make_llama, own):
    """A model whose own config is longrope/dynamic updates inv_freq every forward; ours must win, and
    restore must give back the model's own behaviour at both lengths."""
    plain = make_llama(window=WINDOW)
    geometry = geometry_from_config(plain.config)
    if own == "longrope":
        own_scaling = exported_scaling(baseline("ntk", geometry, TARGET).model_copy(update={"short_factors": None}))
        model = reference_model(plain, own_scaling, original_max_position_embeddings=WINDOW)
    else:
        model = reference_model(plain, {"rope_type": "dynamic", "factor": 2.0}, scale=1.0)
    own_logits = {n: logits(model, n) for n in (WINDOW * 3, WINDOW // 2)}
    candidate = baseline("critical_ntk", geometry, TARGET)
    expected = reference_model(plain, exported_scaling(candidate), original_max_position_embeddings=WINDOW)
    with apply_candidates(model, candidate):
        for length in (WINDOW * 3, WINDOW // 2, WINDOW * 2):  # long, short, long again
            torch.testing.assert_close(logits(model, length), logits(expected, length))
    for length in (WINDOW // 2, WINDOW * 3):
        assert torch.equal(logits(model, length), own_logits[length])


def test_rows_get_their_own_candidate(make_llama):
    model = make_llama(window=WINDOW)
    geometry = geometry_from_config(model.config)
    candidates = [baseline(m, geometry, TARGET) for m in ("pi", "yarn", "critical_ntk")]
    separately = []
    for candidate in candidates:
        with apply_candidates(model, candidate):
            separately.append(logits(model, WINDOW * 2))
    with apply_candidates(model, candidates):
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (1, WINDOW * 2), generator=generator).repeat(3, 1)
        with torch.no_grad():
            batched = model(ids).logits
    for k in range(3):
        torch.testing.assert_close(batched[k : k + 1], separately[k], rtol=1e-5, atol=1e-5)


def test_partial_rotary_model_works():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=WINDOW,
        partial_rotary_factor=0.5,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    geometry = geometry_from_config(model.config)
    assert geometry.rotary_dim == 16 and geometry.head_dim == 32
    before = logits(model, WINDOW * 2)
    with apply_candidates(model, baseline("none", geometry, TARGET)):
        torch.testing.assert_close(logits(model, WINDOW * 2), before)
    with apply_candidates(model, baseline("pi", geometry, TARGET)):
        assert not torch.allclose(logits(model, WINDOW * 2), before)


def test_other_families(make_llama):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    for config_cls, model_cls in ((Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM)):
        config = config_cls(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=WINDOW,
        )
        model = model_cls(config).eval()
        before = logits(model, WINDOW * 2)
        with apply_candidates(model, baseline("yarn", geometry_from_config(config), TARGET)):
            assert not torch.allclose(logits(model, WINDOW * 2), before)
        assert torch.equal(logits(model, WINDOW * 2), before)


def test_wrong_geometry_and_double_apply_are_refused(make_llama):
    model = make_llama(window=WINDOW)
    geometry = geometry_from_config(model.config)
    other = geometry.model_copy(update={"base": 500000.0})
    with pytest.raises(RopeSearchError, match="base"):
        apply_candidates(model, make_candidate(other, TARGET, [1.0] * other.pairs))
    with apply_candidates(model, baseline("pi", geometry, TARGET)):
        with pytest.raises(RopeSearchError, match="already applied"):
            apply_candidates(model, baseline("pi", geometry, TARGET))


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    geometry = geometry_from_config(llama_config())
    with pytest.raises(RopeSearchError, match="rotary|rope_theta"):
        apply_candidates(model, baseline("pi", geometry, TARGET))
