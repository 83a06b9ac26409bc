import pytest

from fitness.errors import RopeSearchError
from fitness.geometry import RopeGeometry, geometry_from_config
from tests.conftest import llama_config


def test_critical_dim_matches_the_paper_examples():
    llama3 = RopeGeometry(rotary_dim=128, base=500000.0, original_window=8192, head_dim=128)
    phi3 = RopeGeometry(rotary_dim=96, base=10000.0, original_window=2048, head_dim=96)
    assert llama3.critical_dim() == 35
    assert phi3.critical_dim() == 31
    low, high = llama3.critical_dim_range()
    assert high == 35 and low <= 30 < high  # the paper found 30 inside the range


def test_smollm2_critical_range():
    smol = RopeGeometry(rotary_dim=64, base=100000.0, original_window=8192, head_dim=64)
    assert smol.critical_dim_range() == (14, 20)


def test_geometry_from_object_4x_and_5x_forms():
    config = llama_config(
        window=256, scale=4, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    )
    geometry = geometry_from_config(config)
    assert geometry == RopeGeometry(rotary_dim=32, base=10000.0, original_window=256, head_dim=32)


def test_geometry_from_raw_dicts():
    v4 = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "rope_theta": 5e5,
        "max_position_embeddings": 8192,
    }
    v5 = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5, "original_max_position_embeddings": 8192},
    }
    phi = {
        "model_type": "phi3",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "rope_theta": 1e4,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.5,
    }
    assert geometry_from_config(v4) == geometry_from_config(v5)
    assert geometry_from_config(phi) == RopeGeometry(rotary_dim=32, base=1e4, original_window=4096, head_dim=64)


def test_explicit_head_dim_wins():
    config = {
        "hidden_size": 512,
        "num_attention_heads": 8,
        "head_dim": 128,
        "rope_theta": 1e4,
        "max_position_embeddings": 4096,
    }
    assert geometry_from_config(config).rotary_dim == 128


@pytest.mark.parametrize(
    "config, field",
    [
        ({"model_type": "gpt2", "n_embd": 64, "n_head": 2, "max_position_embeddings": 64}, "rope_theta"),
        (
            {
                "hidden_size": 60,
                "num_attention_heads": 2,
                "partial_rotary_factor": 0.5,
                "rope_theta": 1e4,
                "max_position_embeddings": 64,
            },
            "partial_rotary_factor",
        ),
        ({"head_dim": 33, "num_attention_heads": 2, "rope_theta": 1e4, "max_position_embeddings": 64}, "head_dim"),
        (
            {
                "hidden_size": 64,
                "num_attention_heads": 2,
                "rope_theta": 1e4,
                "max_position_embeddings": 64,
                "partial_rotary_factor": 1.5,
            },
            "partial_rotary_factor",
        ),
    ],
)
def test_bad_geometry_names_the_field(config, field):
    with pytest.raises(RopeSearchError, match=field):
        geometry_from_config(config)
