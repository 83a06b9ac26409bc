"""Mixed-window training: packed short documents attend only to themselves under the original RoPE,
long ones get the searched factors; a killed run resumes onto the identical loss curve."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fitness.factors import RopeCandidate
from fitness.patch import apply_candidates
from mixed_window_train.data import MixedBatches, MixedData

REPO = Path(__file__).resolve().parents[1]
FACTORS = REPO / "configs" / "factors" / "tiny-4x.json"


def test_packed_short_documents_equal_separate_forwards(tiny):
    model, tokenizer = tiny
    candidate = RopeCandidate.load(FACTORS)
    batches = MixedBatches(tokenizer, MixedData(long_ratio=0.0, short_min=100), 256, 1024, 1, seed=0)
    batch = batches(0, 0)
    positions = batch.position_ids[0]
    starts = [i for i in range(len(positions)) if positions[i] == 0] + [len(positions)]
    assert len(starts) >= 5  # several documents in one row
    with apply_candidates(model, candidate), torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=batch.input_ids[:, a:b]).logits
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-4, atol=1e-4)


def test_rows_choose_their_rope(tiny):
    """Long rows run under the long factors, packed short rows under the short ones."""
    model, tokenizer = tiny
    candidate = RopeCandidate.load(FACTORS)
    batch = MixedBatches(tokenizer, MixedData(long_ratio=0.5), 256, 1024, 8, seed=1)(3, 0)
    long_rows = batch.position_ids.max(dim=1).values == 1023
    assert 0 < long_rows.sum() < 8
    with apply_candidates(model, candidate) as handle:
        cos, _ = handle.rotary(torch.zeros(1), batch.position_ids)
    expected_long = candidate.inv_freq(long=True)[1] * 5
    expected_short = candidate.inv_freq(long=False)[1] * 5
    for row in range(8):
        where = (batch.position_ids[row] == 5).nonzero()[0, 0]
        angle = expected_long if long_rows[row] else expected_short
        assert cos[row, where, 1].item() == pytest.approx(
            torch.cos(angle).item() * candidate.attention_factor, rel=1e-5
        )


def test_batches_are_a_pure_function_of_the_step(tiny):
    _, tokenizer = tiny
    make = lambda: MixedBatches(tokenizer, MixedData(), 256, 1024, 4, seed=7)  # noqa: E731
    a, b = make()(11, 0), make()(11, 0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    assert not torch.equal(make()(12, 0).input_ids, a.input_ids)


def small_config(tmp_path, steps=12):
    config = yaml.safe_load((REPO / "configs" / "train-tiny.yaml").read_text())
    config["factors"] = str(FACTORS)
    config["model"]["threads"] = 1
    config["train"].update(steps=steps, batch_size=2, checkpoint_every=4, warmup=2)
    config["evaluation"] = {"needles": {"documents": 2, "seed": 5}, "short_windows": 4}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(out: Path) -> list[tuple[int, str]]:
    with (out / "metrics.csv").open() as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip


@pytest.mark.slow
def test_kill_and_resume_gives_the_identical_loss_curve(tmp_path):
    config = small_config(tmp_path)
    reference = tmp_path / "reference"
    assert run_cli("train", str(config), "--out", str(reference)).wait(timeout=600) == 0
    crashed = tmp_path / "crashed"
    process = run_cli("train", str(config), "--out", str(crashed))
    deadline = time.time() + 300
    while not list((crashed / "checkpoints").glob("step_0000008.pt")):  # past the second checkpoint
        assert time.time() < deadline and process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_cli("train", str(config), "--out", str(crashed))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    assert losses(crashed) == losses(reference)
    assert len(losses(reference)) == 12
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert (crashed / "model" / "config.json").exists() and (crashed / "evaluation.json").exists()


@pytest.mark.filterwarnings("ignore:vLLM ignore")  # the committed factors carry a searched attention factor
def test_trained_model_loads_in_plain_transformers_with_both_factor_sets(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from mixed_window_train.finetune import finetune, load_finetune_config

    config, candidate = load_finetune_config(small_config(tmp_path, steps=2))
    finetune(config, candidate, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["rope_scaling"]["long_factor"] == list(candidate.long_factors)
    assert saved["rope_scaling"]["short_factor"] == [1.0] * 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 1024)))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, candidate.inv_freq(long=True))


def test_chunked_loss_equals_full_logits_loss(tiny):
    from mixed_window_train.trainer import Batch, chunked_loss, weighted_lm_loss

    model, _ = tiny
    generator = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(0, 2000, (2, 300), generator=generator), torch.rand(2, 300, generator=generator))
    full = weighted_lm_loss(model(input_ids=batch.input_ids).logits, batch)
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked = chunked_loss(model, batch, None, chunk=64)
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    model.zero_grad()
