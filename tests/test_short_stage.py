"""The short-factor stage (issue: LongRoPE's readjustment of the original window), on the bundled model."""

import json

import pytest
import yaml
from optuna.trial import TrialState

from fitness.factors import RopeCandidate, baseline
from fitness.general_text import PARTS, general_windows
from fitness.geometry import geometry_from_config
from fitness.needles import NeedleSettings, build_needle_set
from fitness.scoring import score_candidates
from search import cli, runs, short_stage
from search.space import ShortSpace, ShortSpaceSettings
from tests.search_helpers import write_config

SHORT = {"windows": 2, "evaluations": 10, "report_windows": 4, "seeds": [0.0, 0.25, 0.5]}


def given_long(tiny, path) -> RopeCandidate:
    """YaRN at 4x with a sharper attention factor than its own: the cost short factors have to win back."""
    model, _ = tiny
    long = baseline("yarn", geometry_from_config(model.config), 1024)
    long = long.model_copy(update={"attention_factor": 1.2, "short_factors": None, "params": {"needle_ppl": 1.0}})
    long.save(path)
    return long


@pytest.fixture(scope="module")
def short_run(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short")
    long = given_long(tiny, tmp / "long.json")
    path = write_config(tmp, long_factors=str(tmp / "long.json"), short_search=SHORT)
    data = yaml.safe_load(path.read_text())
    del data["scale"]  # the target comes from the given factors
    path.write_text(yaml.safe_dump(data))
    config = runs.load_search_config(path)
    run_dir = runs.create(config, tmp / "runs")
    summary = runs.run(run_dir, stop_after=4, quiet=True)  # stopped as a crash would stop it
    return long, config, run_dir, summary


def test_inputs_beyond_the_window_never_use_short_factors(tiny):
    """Short factors change nothing past the window: needle NLLs at 4x are bit-identical."""
    model, tokenizer = tiny
    long = baseline("critical_ntk", geometry_from_config(model.config), 1024)
    odd = long.model_copy(update={"short_factors": tuple(0.5 + i / 7 for i in range(long.geometry.pairs))})
    needles = build_needle_set(tokenizer, NeedleSettings(documents=2, seed=4), 1024)
    plain, with_short = score_candidates(model, needles, [long, odd])
    assert plain.document_nll == with_short.document_nll
    short_ids = general_windows(tokenizer, 128, 1)[:, :100]  # inside the window they do differ
    from fitness.general_text import candidate_perplexities

    a, b = candidate_perplexities(model, short_ids, [long, odd])
    assert abs(a - b) > 1e-3 * a


def test_the_search_text_and_the_evaluation_text_never_overlap(tiny):
    _, tokenizer = tiny
    search = {tuple(row.tolist()) for row in general_windows(tokenizer, 256, 64, part="search")}
    evaluation = general_windows(tokenizer, 256, 4096, part="evaluation")
    assert not search & {tuple(row.tolist()) for row in evaluation}
    assert PARTS["search"][1] <= PARTS["evaluation"][0]


def test_space_seeds_and_monotone_repair(tiny):
    model, _ = tiny
    long = baseline("yarn", geometry_from_config(model.config), 1024)
    space = ShortSpace(long, ShortSpaceSettings())
    assert space.seed(0).factors(long=False) == (1.0,) * long.geometry.pairs
    assert space.seed(1).factors(long=False) == pytest.approx(long.long_factors)
    shuffled = space.decode({f"s{i}": 1 + ((7 * i) % 5) / 4 for i in range(long.geometry.pairs)})
    assert list(shuffled.factors(long=False)) == sorted(shuffled.factors(long=False))
    assert shuffled.long_factors == long.long_factors and shuffled.attention_factor == long.attention_factor
    free = ShortSpace(long, ShortSpaceSettings(mode="free", low=0.5, high=3.0))
    point = free.decode({f"s{i}": 9.0 if i == 0 else 0.1 for i in range(long.geometry.pairs)})
    assert point.factors(long=False)[:2] == (3.0, 0.5)


def test_resume_finishes_the_budget_and_wins_back_the_short_cost(short_run):
    long, config, run_dir, summary = short_run
    assert summary["short"]["evaluated"] == 4 and "report" not in summary["short"]
    assert (run_dir / short_stage.BEST_FILE).exists()  # kept while it ran
    resumed = runs.run(run_dir, quiet=True)
    ctx = short_stage.open_context(run_dir, config, read_only=True)
    trials = ctx.study.get_trials(states=(TrialState.COMPLETE,))
    assert resumed["short"]["evaluated"] == SHORT["evaluations"] - 4 and len(trials) == SHORT["evaluations"]
    seeds = [t for t in trials if t.system_attrs.get("fixed_params")]
    assert len(seeds) == len(SHORT["seeds"])  # enqueued once, not again by the resume
    best = RopeCandidate.load(run_dir / short_stage.BEST_FILE)
    assert best.long_factors == long.long_factors and best.attention_factor == long.attention_factor
    assert best.params["text_ppl"] == min(t.value for t in trials)
    assert all("text_ppl" in row for row in ctx.study.user_attrs["baselines"].values())
    assert ctx.study.metric_names == ["text_ppl"]
    report = json.loads((run_dir / "short_report.json").read_text())
    ones, searched = report["methods"]["ones"], report["methods"]["searched"]
    for length in ("64", "256"):  # on text the search never read
        assert searched[length]["cost"] < ones[length]["cost"]
        assert ones[length]["cost"] > 0.01  # the attention factor's cost is there to win back


def test_a_run_folder_exports_its_short_factors(short_run, tmp_path):
    long, _, run_dir, _ = short_run
    taken = RopeCandidate.from_source(run_dir)
    assert taken.short_factors == RopeCandidate.load(run_dir / short_stage.BEST_FILE).short_factors
    assert taken.short_factors != (1.0,) * long.geometry.pairs
    assert cli.main(["export", str(run_dir), "--to", "hf", "--config-only", "--model", "tiny",
                     "--out", str(tmp_path / "hf")]) == 0  # fmt: skip
    scaling = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]
    assert scaling["short_factor"] == list(taken.short_factors)
    assert scaling["long_factor"] == list(long.long_factors)


def test_short_factors_of_other_long_factors_are_refused(short_run, tmp_path):
    _, _, run_dir, _ = short_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("best_factors.json", short_stage.BEST_FILE):
        (copy / name).write_text((run_dir / name).read_text())
    best = RopeCandidate.load(copy / "best_factors.json")
    best.model_copy(update={"long_factors": tuple(f * 1.01 for f in best.long_factors)}).save(copy / "best_factors.json")
    with pytest.raises(Exception, match="other long factors"):
        RopeCandidate.from_source(copy)


def test_one_command_runs_both_stages(tmp_path):
    path = write_config(tmp_path, **{"budget.evaluations": 4, "short_search": {**SHORT, "evaluations": 4}})
    run_dir = runs.create(runs.load_search_config(path), tmp_path / "runs")
    summary = runs.run(run_dir, quiet=True)
    assert summary["evaluated"] == 4 and summary["short"]["evaluated"] == 4
    for name in ("report.json", "best_factors.json", "best_short_factors.json", "short_report.json"):
        assert (run_dir / name).exists(), name
    status = runs.status(run_dir)
    assert "study small-short: 4 evaluations of 4" in status and "short factors: general-text PPL" in status


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"short_search": {"lengths": [512]}}, "inside the model's window"),
        ({"short_search": {"seeds": [1.5]}}, "exponents"),
        ({"short_search": {"space": {"low": 2.0, "high": 1.0}}}, "at least low"),
        ({"short_search": {"sampler": "grid"}}, "short_search.sampler"),
        ({"short_search": {"lengths": [64, 256], "windows": [2, 2, 2]}}, "one per length"),
        ({"short_search": {"objective": "mean"}}, "short_search.objective"),
    ],
)
def test_bad_short_search_configs_exit_2(tmp_path, capsys, changes, message):
    path = write_config(tmp_path, **changes)
    assert cli.main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_given_long_factors_need_a_short_stage_and_the_right_target(tiny, tmp_path, capsys):
    given_long(tiny, tmp_path / "long.json")
    path = write_config(tmp_path, long_factors=str(tmp_path / "long.json"))
    assert cli.main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "add a short_search section" in capsys.readouterr().err
    path = write_config(tmp_path, long_factors=str(tmp_path / "long.json"), scale=2, short_search=SHORT)
    assert cli.main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "were made for 1024 tokens" in capsys.readouterr().err


def test_eval_takes_a_run_folder_with_its_short_factors(short_run, tmp_path):
    """The GPU session's eval step names run folders; it once took only factor files."""
    from search.evaluate import load_eval_config

    _, _, run_dir, _ = short_run
    config = yaml.safe_load(open("configs/eval-tiny.yaml"))
    config["factors"] = {"searched": str(run_dir)}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    _, candidates = load_eval_config(path)
    assert candidates["searched"].short_factors == RopeCandidate.load(run_dir / short_stage.BEST_FILE).short_factors


def test_worst_ratio_tells_the_worst_lengths_ratio_to_the_models_own(tiny):
    """objective: worst_ratio scores each length against the model's own PPL there and tells the largest
    ratio, so a gain at one length cannot pay for a loss at another; windows may differ per length."""
    import math

    from fitness.general_text import candidate_window_nll, window_nll
    from fitness.models import ModelSettings
    from search.workers import Batch, TextSetup, TextWorker

    model, tokenizer = tiny
    long = baseline("yarn", geometry_from_config(model.config), 1024).model_copy(update={"attention_factor": 1.2})
    setup = TextSetup(ModelSettings(name="tiny", device="cpu"), (64, 256), (3, 1), worst_ratio=True)
    [score] = TextWorker(setup).score(Batch((long,)))
    ratios = []
    for length, count in zip(setup.lengths, setup.windows):
        windows = general_windows(tokenizer, length, count, part="search")
        own = math.exp(window_nll(model, windows).mean().item())
        ratios.append(math.exp(candidate_window_nll(model, windows, [long])[0].mean().item()) / own)
    assert len(score.document_nll) == 3 + 1
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)  # the lengths disagree: taking the max matters
    assert score.fitness == pytest.approx(max(ratios), rel=1e-5)
    assert score.short_cost == pytest.approx(max(ratios) - 1, rel=1e-4)
    [plain] = TextWorker(TextSetup(setup.model, setup.lengths, setup.windows)).score(Batch((long,)))
    assert plain.fitness == pytest.approx(math.exp(sum(score.document_nll) / 4), rel=1e-5)  # text PPL


def test_a_worst_ratio_stage_stores_its_own_key(tiny, tmp_path):
    given_long(tiny, tmp_path / "long.json")
    short = {**SHORT, "evaluations": 4, "lengths": [64, 256], "windows": [2, 1], "objective": "worst_ratio"}
    path = write_config(tmp_path, long_factors=str(tmp_path / "long.json"), short_search=short)
    data = yaml.safe_load(path.read_text())
    del data["scale"]
    path.write_text(yaml.safe_dump(data))
    config = runs.load_search_config(path)
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    ctx = short_stage.open_context(run_dir, config, read_only=True)
    assert ctx.study.metric_names == ["text_ppl_ratio"]
    best = RopeCandidate.load(run_dir / short_stage.BEST_FILE)
    assert best.params["text_ppl_ratio"] == min(t.value for t in ctx.study.get_trials(states=(TrialState.COMPLETE,)))
    assert all(row["text_ppl_ratio"] >= 1 + row["short_cost"] - 1e-9 for row in ctx.study.user_attrs["baselines"].values())
    report = json.loads((run_dir / "short_report.json").read_text())
    assert report["search_text"]["objective"] == "text_ppl_ratio"
