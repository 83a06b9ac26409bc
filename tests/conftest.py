"""Shared fixtures: tiny random transformers models built in the test, never a stand-in for a model."""

import os

import pytest
import torch

from fitness.factor_files import load_factor_file
from search import runs
from tests.search_helpers import history_of, write_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def llama_config(window=64, scale=1.0, rope_scaling=None, **overrides):
    """A tiny LlamaConfig in the form both transformers 4.x and 5.x accept (rope_theta + rope_scaling)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=int(window * scale),
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


@pytest.fixture
def make_llama():
    def build(seed=0, **kwargs):
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(**kwargs)).eval()

    return build


@pytest.fixture(scope="session")
def tiny():
    """The bundled train-short model and its tokenizer (fp32, CPU)."""
    from fitness.models import load_model

    return load_model("tiny")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPESEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def reference_history(tmp_path_factory):
    """An uninterrupted run with Ray and one worker: what every other way of running must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    config = runs.load_search_config(write_config(tmp, **{"workers.backend": "ray", "workers.count": 1}))
    run_dir = runs.create(config, tmp / "runs")
    runs.run(run_dir, quiet=True)
    return history_of(run_dir), load_factor_file(run_dir / "best_factors.json")
