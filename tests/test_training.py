"""Mixed-window training: packed short documents attend only to themselves under the original RoPE,
long ones get the searched factors; a killed run resumes onto the identical loss curve."""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from fitness.factor_files import load_factor_file
from fitness.patch import apply_candidates
from mixed_window_train.data import MixedBatches, MixedData
from tests.search_helpers import launch

REPO = Path(__file__).resolve().parents[1]
FACTORS = REPO / "configs" / "factors" / "tiny-4x.json"


def test_packed_short_documents_equal_separate_forwards(tiny):
    model, tokenizer = tiny
    candidate = load_factor_file(FACTORS)
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


@pytest.mark.parametrize("factors", ["searched", "yarn deployed"])
def test_rows_choose_their_rope(tiny, factors):
    """Long rows run under the long factors, packed short rows under the short ones (a deployed method's
    short factors are its long ones: YaRN's rotation at every length)."""
    from fitness.baselines import deployed_baseline

    model, tokenizer = tiny
    candidate = load_factor_file(FACTORS)
    if factors == "yarn deployed":
        candidate = deployed_baseline("yarn", candidate.geometry, 1024)
        assert candidate.inv_freq(long=False).tolist() == candidate.inv_freq(long=True).tolist()
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


def run_cli(*args, **kwargs):
    return launch(list(args), **kwargs)


@pytest.mark.slow
def test_kill_and_resume_gives_the_identical_loss_curve(tmp_path):
    config = small_config(tmp_path)
    reference = tmp_path / "reference"
    first = run_cli("train", str(config), "--out", str(reference), stdout=subprocess.PIPE)
    assert first.wait(timeout=600) == 0
    # the same command on a finished folder (a timeout that struck at exit) gives its result again, as is
    evaluated = (reference / "evaluation.json").stat().st_mtime_ns
    again = run_cli("train", str(config), "--out", str(reference), stdout=subprocess.PIPE)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-2000:]
    assert again.stdout.read() == first.stdout.read()
    assert (reference / "evaluation.json").stat().st_mtime_ns == evaluated and len(losses(reference)) == 12
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

    # Ctrl-C: the step in flight finishes and is checkpointed, so the resume repeats none
    interrupted = tmp_path / "interrupted"
    process = run_cli("train", str(config), "--out", str(interrupted))
    metrics, deadline = interrupted / "metrics.csv", time.time() + 300
    while not metrics.exists() or metrics.read_text().count("\n") < 6:  # header and 5 steps
        assert time.time() < deadline and process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=300) == 130
    last = losses(interrupted)[-1][0]
    assert 5 <= last < 12 and (interrupted / "checkpoints" / f"step_{last:07d}.pt").exists()
    assert process.stderr.read().decode().strip().splitlines()[-1].endswith(f"--out {interrupted}` continues it")
    assert run_cli("train", str(config), "--out", str(interrupted)).wait(timeout=600) == 0
    assert losses(interrupted) == losses(reference)


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


def tiny_training(out: Path, stop_after=None) -> list[tuple[int, str]]:
    """Six steps of the mixed-window loop on the bundled model (a fresh copy), checkpoints every second
    step, stopped after `stop_after` as a kill would; the loss curve logged so far."""
    from fitness.models import ModelSettings, load_model
    from mixed_window_train.trainer import TrainSettings, train

    model, tokenizer = load_model(ModelSettings(name="tiny", device="cpu", threads=1))
    batches = MixedBatches(tokenizer, MixedData(), 256, 1024, 2, seed=0)
    settings = TrainSettings(steps=6, batch_size=2, warmup=1, lr=1e-3, checkpoint_every=2)
    with apply_candidates(model, load_factor_file(FACTORS)):
        train(model, batches, settings, out, stop_after=stop_after)
    return losses(out)


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory):
    return tiny_training(tmp_path_factory.mktemp("reference"))


def test_a_run_in_pieces_counts_the_training_seconds_of_every_piece(tmp_path):
    from mixed_window_train.trainer import load_checkpoint

    tiny_training(tmp_path, stop_after=4)  # the first piece: 4 steps, checkpointed
    first = load_checkpoint(tmp_path / "checkpoints" / "step_0000004.pt")["seconds"]
    started = time.perf_counter()
    tiny_training(tmp_path)  # the second: 2 steps
    second = time.perf_counter() - started
    total = load_checkpoint(tmp_path / "checkpoints" / "step_0000006.pt")["seconds"]
    assert first < total < first + second


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, reference_curve, caplog):
    tiny_training(tmp_path, stop_after=4)  # checkpoints at steps 2 and 4
    newest = tmp_path / "checkpoints" / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a failing disk
    with caplog.at_level("WARNING", logger="ropesearch"):
        assert tiny_training(tmp_path) == reference_curve
    assert any("step_0000004.pt does not load" in r.getMessage() for r in caplog.records)
    assert len(reference_curve) == 6


@pytest.mark.parametrize("damage", ["emptied", "header lost, last row torn"])
def test_a_damaged_metrics_file_is_mended_on_resume(tmp_path, reference_curve, damage):
    """Each step once under one header, whatever a kill or a disk left of metrics.csv."""
    tiny_training(tmp_path, stop_after=5)  # checkpoints at 2 and 4, rows 1 to 5: row 5 is logged again
    metrics = tmp_path / "metrics.csv"
    lines = metrics.read_text().splitlines()
    # a row torn inside its step number ("1" of "12,...") is what a kill during an append leaves
    metrics.write_text("" if damage == "emptied" else "\n".join(lines[1:]) + "\n1")
    assert tiny_training(tmp_path) == (reference_curve[4:] if damage == "emptied" else reference_curve)
    assert metrics.read_text().splitlines()[0] == "step,loss,lr,grad_norm,tokens_per_s"


def test_two_trainings_on_one_folder(tmp_path):
    """The second `train --out X` is refused at once; the first logs each step once."""
    config = small_config(tmp_path, steps=8)
    out = tmp_path / "out"
    first = run_cli("train", str(config), "--out", str(out), "--stop-after", "4")  # no evaluation: seconds
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists():  # the first is training
        assert time.time() < deadline and first.poll() is None, first.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # held in the middle of its steps, whatever the machine's speed
    try:
        second = run_cli("train", str(config), "--out", str(out))
        assert second.wait(timeout=120) == 1
    finally:
        os.kill(first.pid, signal.SIGCONT)
    err = second.stderr.read().decode()
    assert err.count("\n") == 1 and "in use by another training" in err, err
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-2000:]
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_a_method_name_fine_tunes_as_the_method_is_deployed(tmp_path):
    """`factors: yarn` with a target: training, the exported config and plain transformers all run YaRN as
    transformers' own `rope_type: yarn` does, the same factors and attention factor at every length; the
    evaluation reports every model per needle format at the target and at the window."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mixed_window_train.finetune import finetune, load_finetune_config
    from tests.conftest import llama_config

    path = small_config(tmp_path, steps=2)
    data = yaml.safe_load(path.read_text())
    data.update(factors="yarn", scale=4)
    data["evaluation"]["needles"].update(formats=["magic_number", "pass_key"], documents=2)
    path.write_text(yaml.safe_dump(data))
    config, candidate = load_finetune_config(path)
    assert candidate.method == "yarn" and candidate.short_factors == candidate.long_factors
    finetune(config, candidate, tmp_path / "out")

    yarn = llama_config(window=256, scale=4, head_dim=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    yarn_inv_freq, yarn_attention = ROPE_INIT_FUNCTIONS["yarn"](yarn, None)
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["rope_scaling"]
    assert saved["long_factor"] == saved["short_factor"] == list(candidate.long_factors)
    assert saved["attention_factor"] == pytest.approx(yarn_attention, rel=1e-12)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    for length in (200, 1024):  # inside the window and beyond it
        with torch.no_grad():
            model(torch.randint(0, 100, (1, length)))
        torch.testing.assert_close(model.model.rotary_emb.inv_freq.float(), yarn_inv_freq.float(), rtol=1e-6, atol=0)
        assert model.model.rotary_emb.attention_scaling == pytest.approx(yarn_attention, rel=1e-7)
    rows = json.loads((tmp_path / "out" / "evaluation.json").read_text())["evaluation"]
    for row in rows.values():
        for key in ("formats", "formats_in_window"):
            assert set(row[key]) == {"magic_number", "pass_key"} and all(f["documents"] == 1 for f in row[key].values())


def test_eval_scores_a_method_named_under_factors_as_deployed_for_the_longest_length(tmp_path):
    """`factors: {yarn-static: yarn}` is YaRN built once for the longest length and used at every length
    (what a fine-tune with `factors: yarn` ships); `methods: [yarn]` is rebuilt for each length."""
    import json

    from search.cli import main

    config = {"name": "e", "model": {"name": "tiny", "device": "cpu", "threads": 1}, "multiples": [1, 4],
              "needles": {"documents": 2, "haystack": ["docstrings"], "seed": 4}, "methods": ["yarn"],
              "factors": {"yarn-static": "yarn"}, "short_windows": 0}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
    assert results["yarn-static"]["1024"] == results["yarn"]["1024"]  # the same YaRN at the longest length
    assert results["yarn-static"]["256"]["needle_ppl"] != results["yarn"]["256"]["needle_ppl"]  # not rebuilt at 1x


def test_ctrl_c_in_a_training_says_how_to_resume_it(tmp_path, monkeypatch, capsys):
    import mixed_window_train.finetune as finetune_module
    from search.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "finetune", interrupted)
    out = tmp_path / "run"
    assert main(["train", "configs/train-tiny.yaml", "--out", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"ropesearch: interrupted; `ropesearch train configs/train-tiny.yaml --out {out}` continues it"


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_an_adapter_fine_tune_travels_in_a_small_checkpoint_and_ends_where_an_unbroken_one_does(tmp_path):
    """With `adapter` only the LoRA weights and the norms are trained: the checkpoint holds those alone
    (a fine-tune of a 135M model at 128k outlasts one GPU machine, and 1.5 GB cannot travel to the next),
    the latest checkpoint alone, carried to a fresh folder, finishes the run on the same loss curve, and
    the exported model is the base with the adapters merged."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from fitness.models import load_model
    from mixed_window_train.finetune import finetune, load_finetune_config
    from mixed_window_train.trainer import load_checkpoint

    path = small_config(tmp_path, steps=6)
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(checkpoint_every=2, lr=3e-3, gradient_checkpointing=True)  # as on the GPU
    raw["adapter"] = {"rank": 4, "alpha": 8, "norms": True}
    path.write_text(yaml.safe_dump(raw))
    config, candidate = load_finetune_config(path)

    unbroken = tmp_path / "unbroken"
    finetune(config, candidate, unbroken)
    first = tmp_path / "first-machine"
    finetune(config, candidate, first, stop_after=4)
    state = load_checkpoint(first / "checkpoints" / "step_0000004.pt")
    assert state["model"] and all("lora_" in name or "norm" in name for name in state["model"])
    base, _ = load_model("tiny")
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert (first / "checkpoints" / "step_0000004.pt").stat().st_size < 0.2 * base_bytes

    second = tmp_path / "second-machine"  # what travels: the metrics and the latest checkpoint
    (second / "checkpoints").mkdir(parents=True)
    shutil.copy(first / "metrics.csv", second / "metrics.csv")
    shutil.copy(first / "checkpoints" / "step_0000004.pt", second / "checkpoints")
    finetune(config, candidate, second)
    assert losses(second) == losses(unbroken) and len(losses(unbroken)) == 6
    assert json.loads((second / "evaluation.json").read_text())["step"] == 6

    exported = AutoModelForCausalLM.from_pretrained(second / "model").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(unbroken / "model").state_dict()
    assert set(exported) <= set(base.state_dict())  # a plain model: no adapter left in it
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(exported[name], reference[name])
        moved = not torch.equal(exported[name], tensor)
        assert moved == any(part in name for part in ("q_proj", "k_proj", "v_proj", "o_proj", "norm")), name


@pytest.mark.slow
def test_adapters_on_the_gguf_loaded_model_merge_and_save_as_a_plain_model(tmp_path):
    """SmolLM2 comes from a GGUF file, which transformers marks as quantized (the save of such a model broke
    on the GPU once): adapters train on it, merge into its weights, and the saved model is that model."""
    from transformers import AutoModelForCausalLM

    from fitness.models import ModelSettings, load_model, save_hf_model
    from mixed_window_train import adapters

    model, tokenizer = load_model(ModelSettings(name="smollm2-135m", device="cpu", dtype="float32", threads=2))
    assert model.is_quantized
    embeddings = model.get_input_embeddings().weight.detach().clone()
    wrapped = adapters.attach(model, adapters.AdapterSettings(), seed=0)
    model.train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    plain = adapters.merged(wrapped)
    save_hf_model(plain, tokenizer, tmp_path / "model")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, adapted, atol=2e-3, rtol=0)  # fp32 merge
    assert torch.equal(saved.get_input_embeddings().weight, embeddings)  # frozen


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_the_adapter_benchmark_compares_the_same_fine_tune_several_ways(tmp_path):
    import json

    from benchmarks.adapter_vs_full import main

    path = small_config(tmp_path, steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["train"]["checkpoint_every"] = 1
    path.write_text(yaml.safe_dump(raw))
    main([str(path), "--work", str(tmp_path / "work"), "--lr-scale", "1", "5", "--with-norms",
          "--out", str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    rows = result["variants"]
    assert list(rows) == ["full", "adapter-lr-x1", "adapter-lr-x1-norms", "adapter-lr-x5", "adapter-lr-x5-norms"]
    assert rows["full"]["adapter"] is None and rows["adapter-lr-x5-norms"]["adapter"]["norms"] is True
    assert rows["adapter-lr-x5-norms"]["needle_ppl"] != rows["adapter-lr-x5"]["needle_ppl"]
    assert rows["adapter-lr-x5"]["lr"] == pytest.approx(5 * rows["adapter-lr-x1"]["lr"])
    assert rows["adapter-lr-x1"]["checkpoint_bytes"] < rows["full"]["checkpoint_bytes"] / 5
    assert rows["adapter-lr-x1"]["needle_ppl"] != rows["full"]["needle_ppl"]
    assert set(result["before_fine_tune"]) == {"base (no scaling)", "base + searched factors"}

    evaluated = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/evaluation.json")}
    main([str(path), "--work", str(tmp_path / "work"), "--lr-scale", "1", "5", "--with-norms",
          "--out", str(tmp_path / "again.json")])  # finished variants are read, not trained again
    assert json.loads((tmp_path / "again.json").read_text()) == result
    assert len(evaluated) == 5 and all(p.stat().st_mtime_ns == t for p, t in evaluated.items())


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_the_paper_table_compares_two_fine_tunes_document_by_document(tmp_path):
    """Searched and YaRN, the same two-step fine-tune on the bundled model: the table's paired numbers come
    from each document's answer NLL, which the evaluation keeps; another evaluation's documents are refused."""
    import json
    import math

    from benchmarks import paper_table
    from mixed_window_train.finetune import finetune, load_finetune_config

    evaluations = {}
    for name, factors, seed in (("searched", str(FACTORS), 5), ("yarn", "yarn", 5), ("other", "yarn", 6)):
        (tmp_path / name).mkdir()
        path = small_config(tmp_path / name, steps=2)
        data = yaml.safe_load(path.read_text())
        data.update(factors=factors, scale=4)
        data["evaluation"]["needles"].update(formats=["magic_number", "pass_key"], documents=8, seed=seed)
        path.write_text(yaml.safe_dump(data))
        finetune(*load_finetune_config(path), tmp_path / name / "out")
        evaluations[name] = tmp_path / name / "out" / "evaluation.json"

    out = tmp_path / "table.json"
    argv = ["--pair", "1024", str(evaluations["searched"]), str(evaluations["yarn"]), "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["paper_table", *argv])
        assert paper_table.main() == 0
    change = json.loads(out.read_text())["lengths"][0]["searched_vs_yarn_after_fine_tune"]
    trained = {n: json.loads(f.read_text())["evaluation"]["mixed-window trained"]["formats"] for n, f in evaluations.items()}
    for fmt in ("magic_number", "pass_key"):
        searched, yarn = trained["searched"][fmt]["document_nll"], trained["yarn"][fmt]["document_nll"]
        assert len(searched) == 4 and math.exp(sum(searched) / 4) == pytest.approx(trained["searched"][fmt]["needle_ppl"])
        assert change[fmt]["documents_lower"] == sum(s < y for s, y in zip(searched, yarn))
        low, high = change[fmt]["needle_ppl_vs_yarn_90"]
        assert low <= change[fmt]["needle_ppl_vs_yarn"] <= high and low < high

    argv[2:4] = [str(evaluations["searched"]), str(evaluations["other"])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["paper_table", *argv])
        assert paper_table.main() == 2
