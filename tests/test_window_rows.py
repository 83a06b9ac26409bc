"""Short rows at the model's window: a micro-batch in parts of unlike shapes (target-long rows, window-long
rows) trains as the same micro-batch in one piece would, at a fraction of the attention cost."""

import pytest
import torch

from fitness.factor_files import load_factor_file
from fitness.patch import apply_candidates
from mixed_window_train.data import MixedBatches, MixedData
from mixed_window_train.trainer import Batch, TrainSettings, chunked_loss, loss_totals, train, weighted_lm_loss
from tests.test_training import FACTORS, losses


def test_short_rows_are_window_long_and_hold_the_tokens_of_target_long_ones(tiny):
    _, tokenizer = tiny
    settings = MixedData(long_ratio=0.5, short_loss="distill", short_rows="window")
    make = lambda: MixedBatches(tokenizer, settings, 256, 1024, 8, seed=1)  # noqa: E731
    long_part, short_part = make()(3, 0)
    assert long_part.input_ids.shape[1] == 1024 and short_part.input_ids.shape[1] == 256
    assert long_part.input_ids.shape[0] + short_part.input_ids.shape[0] // 4 == 8  # each short row: 4 window rows
    assert 0 < long_part.input_ids.shape[0] < 8
    assert (long_part.position_ids == torch.arange(1024)).all() and long_part.distill_weight is None
    assert (short_part.position_ids[:, 0] == 0).all() and short_part.position_ids.max() < 256
    assert (short_part.position_ids == 0).sum() > short_part.input_ids.shape[0]  # documents packed in rows
    assert (short_part.distill_weight == 1).all() and (short_part.loss_weight == 0).all()
    again = make()(3, 0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(again, (long_part, short_part)))


def test_window_rows_run_under_the_short_factors(tiny):
    model, tokenizer = tiny
    candidate = load_factor_file(FACTORS)
    [short_part] = MixedBatches(tokenizer, MixedData(long_ratio=0.0, short_rows="window"), 256, 1024, 1, seed=0)(0, 0)
    with apply_candidates(model, candidate) as handle:
        cos, _ = handle.rotary(torch.zeros(1), short_part.position_ids)
    where = (short_part.position_ids[0] == 5).nonzero()[0, 0]
    pair = len(candidate.long_factors) - 1  # the slowest pair, which the long factors stretch most
    expected = torch.cos(candidate.inv_freq(long=False)[pair] * 5) * candidate.attention_factor
    assert cos[0, where, pair].item() == pytest.approx(expected.item(), rel=1e-5)
    assert candidate.inv_freq(long=False)[pair] != candidate.inv_freq(long=True)[pair]


def _rows(seed: int, rows: int, length: int, distill_rows=()) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    distill = torch.zeros(rows, length)
    distill[list(distill_rows)] = 1.0
    return Batch(torch.randint(0, 2000, (rows, length), generator=generator), torch.rand(rows, length, generator=generator),
                 None, distill if distill_rows else None)


@pytest.mark.parametrize("chunk", [0, 50])
def test_a_micro_batch_in_parts_has_the_loss_and_gradients_of_one_batch(tiny, make_llama, chunk):
    model, _ = tiny
    teacher = make_llama(seed=5, vocab_size=model.config.vocab_size, hidden_size=64, head_dim=32) if chunk else None
    whole = _rows(0, 4, 120, distill_rows=(2, 3) if chunk else ())
    parts = [Batch(whole.input_ids[a:b], whole.loss_weight[a:b], None,
                   whole.distill_weight[a:b] if whole.distill_weight is not None else None) for a, b in ((0, 1), (1, 4))]

    def loss_of(batch, totals=None):
        if chunk:
            return chunked_loss(model, batch, None, chunk, teacher, totals)
        return weighted_lm_loss(model(input_ids=batch.input_ids).logits, batch, totals)

    expected = loss_of(whole)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    totals, got = loss_totals(parts), 0.0
    for part in parts:
        loss = loss_of(part, totals)
        loss.backward()
        got += loss.item()
    assert got == pytest.approx(expected.item(), rel=1e-5)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_training_on_a_micro_batch_in_parts_follows_the_one_batch_curve(tmp_path):
    """The loop runs each part's forward and backward in turn, and the step is the one-batch step."""
    from fitness.models import ModelSettings, load_model

    whole = [_rows(step, 4, 96) for step in range(3)]
    settings = TrainSettings(steps=3, batch_size=4, warmup=1, lr=1e-3, checkpoint_every=3, loss_chunk=32)
    curves = {}
    for name, batch_for in {
        "whole": lambda step, micro: whole[step],
        "parts": lambda step, micro: [Batch(whole[step].input_ids[:1], whole[step].loss_weight[:1]),
                                      Batch(whole[step].input_ids[1:], whole[step].loss_weight[1:])],
    }.items():
        model, _ = load_model(ModelSettings(name="tiny", device="cpu", threads=1))
        train(model, batch_for, settings, tmp_path / name)
        curves[name] = [float(loss) for _, loss in losses(tmp_path / name)]
    assert len(curves["whole"]) == 3
    assert curves["parts"] == pytest.approx(curves["whole"], rel=1e-4)
