"""The exports run in the engines that serve them: llama.cpp (through llama-cpp-python) loads the GGUF
export and scores needle documents the way ropesearch does.

The fast check uses a GGUF written here from the bundled tiny model (float32 weights, window 256), so
llama.cpp and transformers compute on the same numbers and the tolerance can be tight. The SmolLM2
check (its Q4_1 GGUF, one document beyond its 8k window) takes ~10 minutes on 2 cores: it is slow and
opt-in (`ROPESEARCH_SMOLLM2_ENGINE=1`). Outside CI the engine tests are skipped when llama-cpp-python
is not installed; in CI (`CI=true`) a missing engine is a failure.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fitness.baselines import critical_dim_shape
from fitness.factors import make_candidate
from fitness.geometry import geometry_from_config
from fitness.needles import NeedleSettings, build_needle_set
from fitness.scoring import score_candidate
from search.export import EXPORTERS, neighbour_pairs
from tests.test_export import rising_short

if os.environ.get("CI") == "true":
    import llama_cpp  # noqa: F401  (CI installs it: a missing engine must fail, not skip)
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see docs/serving.md)")
from benchmarks.llama_cpp_nll import llama_answer_nll  # after importorskip: needs llama_cpp

TARGET = 1024  # 4x the bundled model's window of 256
ATTENTION = 1.3  # not the default sqrt(1 + ln 4 / ln 256) = 1.118: a dropped attention factor must show
# float32 weights and KV cache on both sides: what is left is summation order (measured: < 1e-3)
TINY_TOLERANCE = 2e-3


def searched(geometry, target=TARGET, attention=ATTENTION, short=None):
    """A LongRoPE2-shaped vector (critical pair 9, rising tail, NTK head) with a non-default attention;
    short factors ones (None) unless given."""
    tail = [4.0 + 0.1 * i for i in range(geometry.pairs - 9)]
    shape = critical_dim_shape(geometry.pairs, 9, tail[0], tail)
    return make_candidate(
        geometry, target, shape, attention_factor=attention, short_factors=short, method="test", params={}
    )


# ---- a GGUF of the bundled tiny model, written the way llama.cpp's converter writes Llama models ----


def tiny_gguf(path, model_dir, arch="llama"):
    """float32 GGUF of an HF Llama or Qwen2 directory, written as llama.cpp's converter writes that
    architecture: Llama's q/k rows reordered to neighbouring pairs, Qwen2's kept (its graph rotates halves)
    with its q/k/v biases."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tokens = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    special = {t["content"] for t in vocab["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights and not config.get("tie_word_embeddings"):
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, ours in names.items():
            for part in ("weight", "bias"):
                w = weights.get(f"model.layers.{i}.{hf}.{part}")
                if w is None:
                    continue
                if ours in ("attn_q", "attn_k") and arch == "llama":
                    w = neighbour_pairs(w, heads if ours == "attn_q" else kv_heads)
                writer.add_tensor(f"blk.{i}.{ours}.{part}", np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def documents_of(needles):
    return [(needles.input_ids[j].tolist(), needles.answers[j].tolist()) for j in range(len(needles.input_ids))]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, tiny):
    """The tiny model as a GGUF, its geometry, and four needle documents at 4x its window."""
    from fitness.models import TINY_MODEL_DIR, load_config

    folder = tmp_path_factory.mktemp("engine")
    source = tiny_gguf(folder / "tiny-f32.gguf", TINY_MODEL_DIR)
    geometry = geometry_from_config(load_config("tiny"))
    model, tokenizer = tiny
    needles = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=11), TARGET)
    return folder, source, geometry, needles


def test_loading_a_gguf_prints_no_dequantizing_bar(tiny_engine, capfd):
    """transformers' GGUF conversion has a tqdm bar of its own; a search loads the model in every worker"""
    from fitness.models import load_model

    _, source, _, _ = tiny_engine
    capfd.readouterr()
    load_model(str(source))
    assert "de-quantizing" not in capfd.readouterr().err


def test_llama_cpp_scores_the_export_as_ropesearch_does(tiny_engine, tiny):
    folder, source, geometry, needles = tiny_engine
    candidate = searched(geometry)
    exported = EXPORTERS["gguf"](candidate, str(source), folder / "export.gguf")

    ours = np.array(score_candidate(tiny[0], needles, candidate).document_nll)
    theirs = llama_answer_nll(exported, documents_of(needles), n_ctx=TARGET)
    np.testing.assert_allclose(theirs, ours, atol=TINY_TOLERANCE, rtol=0)

    unscaled = llama_answer_nll(source, documents_of(needles), n_ctx=TARGET)
    assert np.abs(unscaled - ours).mean() > 20 * TINY_TOLERANCE, (unscaled, ours)


def test_a_dropped_attention_factor_or_factors_would_be_caught(tiny_engine, tiny):
    """The tolerance above is tight enough to see the mistakes this check exists for."""
    folder, source, geometry, needles = tiny_engine
    scored = np.array(score_candidate(tiny[0], needles, searched(geometry)).document_nll)
    default_attention = searched(geometry, attention=math.sqrt(1 + math.log(4) / math.log(256)))
    for wrong in (default_attention, searched(geometry, attention=1.0)):
        exported = EXPORTERS["gguf"](wrong, str(source), folder / f"wrong-{wrong.attention_factor:.3f}.gguf")
        nll = llama_answer_nll(exported, documents_of(needles), n_ctx=TARGET)
        assert np.abs(nll - scored).max() > 5 * TINY_TOLERANCE, (wrong.attention_factor, nll, scored)


def test_static_export_keeps_the_attention_factor_in_llama_cpp(tiny_engine, tiny):
    folder, source, geometry, needles = tiny_engine
    dynamic = searched(geometry)
    static = make_candidate(geometry, TARGET, dynamic.long_factors, static=True, attention_factor=ATTENTION)
    exported = EXPORTERS["gguf"](static, str(source), folder / "static.gguf", static=True)
    ours = np.array(score_candidate(tiny[0], needles, static).document_nll)
    theirs = llama_answer_nll(exported, documents_of(needles), n_ctx=TARGET)
    np.testing.assert_allclose(theirs, ours, atol=TINY_TOLERANCE, rtol=0)


def test_short_prompts_get_what_the_context_size_selects(tiny_engine, tiny):
    """llama.cpp picks long or short factors once, from the allocated context: a context above the
    original window (the export's default, `context_length` = target) applies the long factors to a
    short prompt too; a context of at most the original window gives the short (original) RoPE.
    The attention factor applies either way, as in transformers."""
    folder, source, geometry, _ = tiny_engine
    candidate = searched(geometry)
    exported = EXPORTERS["gguf"](candidate, str(source), folder / "short.gguf")
    short_docs = build_needle_set(tiny[1], NeedleSettings(documents=3, seed=12), geometry.original_window)
    as_long = make_candidate(geometry, TARGET, candidate.long_factors, static=True, attention_factor=ATTENTION)
    short_scored = np.array(score_candidate(tiny[0], short_docs, candidate).document_nll)
    long_scored = np.array(score_candidate(tiny[0], short_docs, as_long).document_nll)
    assert np.abs(short_scored - long_scored).min() > 5 * TINY_TOLERANCE

    default_ctx = llama_answer_nll(exported, documents_of(short_docs), n_ctx=0)  # 0: the GGUF's context_length
    np.testing.assert_allclose(default_ctx, long_scored, atol=TINY_TOLERANCE, rtol=0)
    small_ctx = llama_answer_nll(exported, documents_of(short_docs), n_ctx=geometry.original_window)
    np.testing.assert_allclose(small_ctx, short_scored, atol=TINY_TOLERANCE, rtol=0)


def test_searched_short_factors_reach_llama_cpp(tiny_engine, tiny):
    """Short factors that are not ones: a context of at most the original window runs
    `rope_factors_short` (with the attention factor) and scores short documents as ropesearch does,
    clearly not as with ones; the export's default context still runs the long factors."""
    folder, source, geometry, _ = tiny_engine
    candidate = searched(geometry, short=rising_short(geometry))
    exported = EXPORTERS["gguf"](candidate, str(source), folder / "searched-short.gguf")
    short_docs = build_needle_set(tiny[1], NeedleSettings(documents=3, seed=12), geometry.original_window)
    ours = np.array(score_candidate(tiny[0], short_docs, candidate).document_nll)
    with_ones = np.array(score_candidate(tiny[0], short_docs, searched(geometry)).document_nll)
    assert np.abs(ours - with_ones).min() > 100 * TINY_TOLERANCE, (ours, with_ones)

    small_ctx = llama_answer_nll(exported, documents_of(short_docs), n_ctx=geometry.original_window)
    np.testing.assert_allclose(small_ctx, ours, atol=TINY_TOLERANCE, rtol=0)
    as_long = make_candidate(geometry, TARGET, candidate.long_factors, static=True, attention_factor=ATTENTION)
    long_scored = np.array(score_candidate(tiny[0], short_docs, as_long).document_nll)
    default_ctx = llama_answer_nll(exported, documents_of(short_docs), n_ctx=0)
    np.testing.assert_allclose(default_ctx, long_scored, atol=TINY_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """The bundled model's weights as a Qwen2 model (Llama plus q/k/v biases, here random and large enough
    to matter), its HF directory and its GGUF (architecture qwen2, as llama.cpp's converter writes it)."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fitness.models import TINY_MODEL_DIR, load_tokenizer, save_hf_model

    folder = tmp_path_factory.mktemp("qwen2")
    llama = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    config = Qwen2Config(**{key: llama[key] for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
        "eos_token_id")}, rope_theta=llama["rope_theta"])
    model = Qwen2ForCausalLM(config)
    missing = model.load_state_dict(load_file(str(TINY_MODEL_DIR / "model.safetensors")), strict=False).missing_keys
    missing = [key for key in missing if key != "lm_head.weight"]  # tied to the embedding
    assert missing and all(key.endswith("_proj.bias") for key in missing), missing
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key in missing:
            model.get_parameter(key).copy_(0.5 * torch.randn(model.get_parameter(key).shape, generator=generator))
    save_hf_model(model.eval(), load_tokenizer("tiny"), folder / "hf")
    return folder, tiny_gguf(folder / "tiny-qwen2-f32.gguf", folder / "hf", arch="qwen2")


def test_qwen2_export_runs_in_llama_cpp_as_llama(tiny_qwen2, tiny_engine):
    """llama.cpp's qwen2 graph reads no RoPE factors: the export writes a Qwen2 model as Llama, q/k rows
    and biases reordered to neighbouring pairs, and llama.cpp then scores it as ropesearch does."""
    import gguf

    from fitness.models import load_model

    folder, source = tiny_qwen2
    _, _, geometry, needles = tiny_engine
    model, _ = load_model(str(folder / "hf"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    candidate = searched(geometry)
    exported = EXPORTERS["gguf"](candidate, str(source), folder / "export.gguf")
    assert gguf.GGUFReader(exported).get_field(gguf.Keys.General.ARCHITECTURE).contents() == "llama"

    ours = np.array(score_candidate(model, needles, candidate).document_nll)
    theirs = llama_answer_nll(exported, documents_of(needles), n_ctx=TARGET)
    np.testing.assert_allclose(theirs, ours, atol=TINY_TOLERANCE, rtol=0)
    unscaled = llama_answer_nll(source, documents_of(needles), n_ctx=TARGET)  # llama.cpp's own qwen2 graph
    assert np.abs(unscaled - ours).mean() > 20 * TINY_TOLERANCE, (unscaled, ours)


# Q4_1 weights in llama.cpp against their float32 dequantization in transformers, one document of
# 10,240 tokens (1.25x the window; the 16k candidate's long factors apply): measured 0.013
SMOLLM2_TOLERANCE = 0.1
SMOLLM2_LENGTH = 10240


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ROPESEARCH_SMOLLM2_ENGINE") != "1",
    reason="SmolLM2 beyond its window: ~10 min on 2 cores, beyond CI's budget; ROPESEARCH_SMOLLM2_ENGINE=1 runs it",
)
def test_smollm2_q4_export_agrees_beyond_the_window(tmp_path):
    """The real model and its Q4_1 GGUF: the export of a 16k critical-dimension candidate with a
    non-default attention factor, one needle document beyond the 8k window, in llama.cpp and ropesearch."""
    from fitness.baselines import baseline
    from fitness.models import load_config, load_model, smollm2_gguf_path

    geometry = geometry_from_config(load_config("smollm2-135m"))
    candidate = baseline("critical_ntk", geometry, 16384).model_copy(update={"attention_factor": 1.2})
    model, tokenizer = load_model("smollm2-135m")
    needles = build_needle_set(tokenizer, NeedleSettings(documents=1, seed=3), SMOLLM2_LENGTH)
    ours = np.array(score_candidate(model, needles, candidate).document_nll)
    del model
    exported = EXPORTERS["gguf"](candidate, "smollm2-135m", tmp_path / "smol.gguf")
    theirs = llama_answer_nll(exported, documents_of(needles), n_ctx=16384)
    unscaled = llama_answer_nll(smollm2_gguf_path(), documents_of(needles), n_ctx=16384)
    print(f"SmolLM2 {SMOLLM2_LENGTH} answer NLL: ropesearch {ours}, llama.cpp {theirs}, llama.cpp unscaled {unscaled}")
    np.testing.assert_allclose(theirs, ours, atol=SMOLLM2_TOLERANCE, rtol=0)
    assert np.abs(unscaled - ours).min() > 5 * SMOLLM2_TOLERANCE
