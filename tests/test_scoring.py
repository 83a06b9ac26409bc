"""Answer-only scoring equals the full-logits reference; K candidates in one forward equal one at a time."""

import math

import pytest
import torch

from fitness.baselines import baseline
from fitness.geometry import geometry_from_config
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import apply_candidates
from fitness.scoring import answer_nll, full_logits_nll, score_candidate, score_candidates


@pytest.fixture(scope="module")
def needles_4x(tiny):
    model, tokenizer = tiny
    return build_needle_set(tokenizer, NeedleSettings(documents=6, seed=7), 1024, cache=False)


@pytest.mark.parametrize("method", ["none", "yarn"])
def test_answer_only_equals_full_logits(tiny, needles_4x, method):
    model, _ = tiny
    candidate = baseline(method, geometry_from_config(model.config), 1024)
    with apply_candidates(model, candidate):
        ours, _ = answer_nll(model, needles_4x.input_ids, needles_4x.answers)
        reference = full_logits_nll(model, needles_4x.input_ids, needles_4x.answers)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_batched_candidates_equal_sequential(tiny, needles_4x):
    model, _ = tiny
    geometry = geometry_from_config(model.config)
    candidates = [baseline(m, geometry, 1024) for m in ("pi", "ntk", "yarn", "critical_ntk", "none")]
    sequential = [score_candidate(model, needles_4x, c) for c in candidates]
    for documents_per_forward in (1, 3):
        batched = score_candidates(model, needles_4x, candidates, documents_per_forward)
        for one, many in zip(sequential, batched):
            assert many.fitness == pytest.approx(one.fitness, rel=1e-4)
            assert many.retrieval == one.retrieval
            torch.testing.assert_close(
                torch.tensor(many.document_nll), torch.tensor(one.document_nll), atol=1e-4, rtol=0
            )


def test_fitness_is_exp_mean_nll_and_retrieval_is_exact_match(tiny):
    model, tokenizer = tiny
    needles = build_needle_set(tokenizer, NeedleSettings(documents=8, seed=1), 256, cache=False)
    candidate = baseline("none", geometry_from_config(model.config), 256)
    score = score_candidate(model, needles, candidate)
    assert score.fitness == pytest.approx(math.exp(sum(score.document_nll) / 8))
    with torch.no_grad():
        logits = model(needles.input_ids).logits
    exact = [torch.equal(logits[j, needles.answers[j] - 1].argmax(-1), needles.answer_ids(j)) for j in range(8)]
    assert score.retrieval == sum(exact) / 8


def test_scaling_changes_the_score(tiny, needles_4x):
    """The bundled model fails past its window without scaling and recovers with YaRN."""
    model, _ = tiny
    geometry = geometry_from_config(model.config)
    none, yarn = score_candidates(model, needles_4x, [baseline(m, geometry, 1024) for m in ("none", "yarn")])
    assert yarn.fitness < none.fitness


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny, needles_4x, dtype):
    model, _ = tiny
    candidate = baseline("yarn", geometry_from_config(model.config), 1024)
    fp32 = score_candidate(model, needles_4x.subset(range(2)), candidate)
    half_model = type(model)(model.config).to(dtype).eval()
    half_model.load_state_dict(model.state_dict())
    half = score_candidate(half_model, needles_4x.subset(range(2)), candidate)
    assert half.fitness == pytest.approx(fp32.fitness, rel=0.1)
