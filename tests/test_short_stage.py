"""The short-factor stage (issue: LongRoPE's readjustment of the original window), on the bundled model."""

import json

import pytest
import yaml
from optuna.trial import TrialState

from fitness.baselines import baseline, deployed_baseline
from fitness.factor_files import candidate_from, load_factor_file
from fitness.factors import RopeCandidate
from fitness.general_text import PARTS, general_windows
from fitness.geometry import geometry_from_config
from fitness.models import load_config
from fitness.needles import NeedleSettings, build_needle_set
from fitness.scoring import score_candidates
from search import cli, runs, short_stage
from search.guard import VIOLATION, violation
from search.slots import slot_of
from search.trial_keys import BASELINES
from search.space import ShortSpace, ShortSpaceSettings
from tests.search_helpers import history, launch, write_config

# the text the bundled model knows (its training text, pydoc; on English it scores noise), 3 seeds + 2 CMA-ES
# generations of 4, in-window needles of 2 documents per length as the guard
SHORT = {"windows": 2, "evaluations": 11, "population": 4, "report_windows": 4, "report_documents": 4,
         "seeds": [0.0, 0.25, 0.5], "text": ["pydoc"], "needles": {"documents": 2}}


def given_long(tiny, path, method: str = "yarn") -> RopeCandidate:
    """YaRN at 4x with a sharper attention factor than its own: the cost short factors have to win back."""
    model, _ = tiny
    long = baseline(method, geometry_from_config(model.config), 1024)
    long = long.model_copy(update={"attention_factor": 1.2, "short_factors": None, "params": {"needle_ppl": 1.0}})
    long.save(path)
    return long


def short_config(tmp, long_path, **short) -> "runs.SearchConfig":
    path = write_config(tmp, long_factors=str(long_path), short_search={**SHORT, **short})
    data = yaml.safe_load(path.read_text())
    del data["scale"]  # the target comes from the given factors
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def short_run(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short")
    long = given_long(tiny, tmp / "long.json")
    config = runs.load_search_config(short_config(tmp, tmp / "long.json"))
    run_dir = runs.create(config, tmp / "runs")
    summary = runs.run(run_dir, stop_after=4, quiet=True)  # stopped as a crash would stop it
    return long, config, run_dir, summary


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The same stage run once, start to end, with Ray: what every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("short-reference")
    given_long(tiny, tmp / "long.json")
    path = short_config(tmp, tmp / "long.json")
    config = runs.load_search_config(path)
    config = config.model_copy(update={"workers": config.workers.model_copy(update={"backend": "ray"})})
    run_dir = runs.create(config, tmp / "runs")
    runs.run(run_dir, quiet=True)
    return short_history(run_dir), run_dir


def short_history(run_dir) -> list[dict]:
    config = runs.load(run_dir)
    return history(short_stage.open_context(run_dir, config, read_only=True).study)


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


def test_resume_finishes_the_budget_and_wins_back_the_short_cost(short_run, uninterrupted):
    long, config, run_dir, summary = short_run
    assert summary["short"]["evaluated"] == 4 and "report" not in summary["short"]
    assert (run_dir / short_stage.BEST_FILE).exists()  # kept while it ran
    resumed = runs.run(run_dir, quiet=True)
    ctx = short_stage.open_context(run_dir, config, read_only=True)
    trials = ctx.study.get_trials(states=(TrialState.COMPLETE,))
    assert resumed["short"]["evaluated"] == SHORT["evaluations"] - 4 and len(trials) == SHORT["evaluations"]
    seeds = [t for t in trials if slot_of(t)[0] == 0]
    assert len(seeds) == len(SHORT["seeds"])  # generation 0 once, not again by the resume
    best = load_factor_file(run_dir / short_stage.BEST_FILE)
    assert best.long_factors == long.long_factors and best.attention_factor == long.attention_factor
    assert best.params["text_ppl"] == min(t.value for t in trials if violation(t) == 0)
    assert short_history(run_dir) == uninterrupted[0]  # stopped, resumed, in-process: Ray's history exactly
    assert all("text_ppl" in row for row in ctx.study.user_attrs["baselines"].values())
    assert ctx.study.metric_names == ["text_ppl"]
    report = json.loads((run_dir / "short_report.json").read_text())
    assert list(report["methods"]) == ["ones", "long^0.25", "long^0.5", "searched"]
    assert list(report["general_english"]) == list(report["methods"])  # beside the text the model knows
    for length in ("64", "256"):  # on text the search never read
        assert report["methods"]["ones"][length]["cost"] > 0.01  # the attention factor's cost is there to win back
    needles = report["window_needles"]["methods"]
    assert list(needles) == ["none (the model's own)", *report["methods"]]
    assert all(set(rows) == {"128", "256"} for rows in needles.values())


def test_a_run_folder_exports_its_short_factors(short_run, tmp_path):
    long, _, run_dir, _ = short_run
    taken = candidate_from(run_dir)
    assert taken.short_factors == load_factor_file(run_dir / short_stage.BEST_FILE).short_factors
    assert taken.short_factors != (1.0,) * long.geometry.pairs
    assert cli.main(["export", str(run_dir), "--to", "hf", "--config-only", "--model", "tiny",
                     "--out", str(tmp_path / "hf")]) == 0
    scaling = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]
    assert scaling["short_factor"] == list(taken.short_factors)
    assert scaling["long_factor"] == list(long.long_factors)


def test_short_factors_of_other_long_factors_are_refused(short_run, tmp_path):
    _, _, run_dir, _ = short_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("best_factors.json", short_stage.BEST_FILE):
        (copy / name).write_text((run_dir / name).read_text())
    best = load_factor_file(copy / "best_factors.json")
    best.model_copy(update={"long_factors": tuple(f * 1.01 for f in best.long_factors)}).save(copy / "best_factors.json")
    with pytest.raises(Exception, match="other long factors"):
        candidate_from(copy)


def test_one_command_runs_both_stages(tmp_path):
    path = write_config(tmp_path, **{"budget.evaluations": 4, "short_search": {**SHORT, "evaluations": 4}})
    run_dir = runs.create(runs.load_search_config(path), tmp_path / "runs")
    summary = runs.run(run_dir, quiet=True)
    assert summary["evaluated"] == 4 and summary["short"]["evaluated"] == 4
    for name in ("report.json", "best_factors.json", "best_short_factors.json", "short_report.json"):
        assert (run_dir / name).exists(), name
    status = runs.status(run_dir)
    assert "study small-short: 4 evaluations of 4" in status and "short factors: text PPL inside the window" in status


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
    assert candidates["searched"].short_factors == load_factor_file(run_dir / short_stage.BEST_FILE).short_factors


def test_eval_builds_a_named_method_for_its_target_window(tmp_path):
    """Static YaRN x4 as a model card deploys it, evaluated inside the window only: built for target_window,
    not for the longest evaluated length (which would make it YaRN x1, the model itself)."""
    from search.evaluate import load_eval_config

    config = yaml.safe_load(open("configs/eval-tiny.yaml"))
    config.update(multiples=[1], factors={"yarn-x4": "yarn"}, target_window=1024)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    _, candidates = load_eval_config(path)
    expected = deployed_baseline("yarn", geometry_from_config(load_config("tiny")), 1024)
    assert candidates["yarn-x4"].long_factors == expected.long_factors and max(expected.long_factors) == 4.0
    assert candidates["yarn-x4"].short_factors == expected.long_factors  # static: the same inside the window


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
    assert score.value == pytest.approx(max(ratios), rel=1e-5)
    assert score.short_cost == pytest.approx(max(ratios) - 1, rel=1e-4)
    [plain] = TextWorker(TextSetup(setup.model, setup.lengths, setup.windows)).score(Batch((long,)))
    assert plain.value == pytest.approx(math.exp(sum(score.document_nll) / 4), rel=1e-5)  # text PPL


def test_a_worst_ratio_stage_stores_its_own_key(tiny, tmp_path):
    given_long(tiny, tmp_path / "long.json")
    path = short_config(tmp_path, tmp_path / "long.json", evaluations=4, lengths=[64, 256], windows=[2, 1],
                        objective="worst_ratio", text=["kjv"])
    config = runs.load_search_config(path)
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    ctx = short_stage.open_context(run_dir, config, read_only=True)
    assert ctx.study.metric_names == ["text_ppl_ratio"]
    best = load_factor_file(run_dir / short_stage.BEST_FILE)
    feasible = [t.value for t in ctx.study.get_trials(states=(TrialState.COMPLETE,)) if violation(t) == 0]
    assert best.params["text_ppl_ratio"] == min(feasible)
    assert all(row["text_ppl_ratio"] >= 1 + row["short_cost"] - 1e-9 for row in ctx.study.user_attrs["baselines"].values())
    report = json.loads((run_dir / "short_report.json").read_text())
    assert report["search_text"]["objective"] == "text_ppl_ratio"


def test_the_trials_are_cma_es_own_by_generation(uninterrupted):
    """Generation 0 is the seeds; generation g is CMA-ES's population from the best seed, told the ranks of
    generation g-1 (replayed here with cmaes itself). Every trial is asked before any of its generation is
    told, and none falls back to independent sampling."""
    import numpy as np
    from cmaes import CMA

    rows, run_dir = uninterrupted
    config = runs.load(run_dir)
    ctx = short_stage.open_context(run_dir, config, read_only=True)
    space, names = ctx.space, list(ctx.space.distributions())
    by_generation: dict[int, list] = {}
    for row in rows:
        by_generation.setdefault(row["slot"][0], []).append(row)
    assert [len(by_generation[g]) for g in sorted(by_generation)] == [3, 4, 4]
    seeds = by_generation[0]
    assert [r["params"] for r in seeds] == [space.encode(c) for c in ctx.seeds.values()]
    trials = {slot_of(t): t for t in ctx.study.get_trials(states=(TrialState.COMPLETE,))}
    ranked = lambda g: sorted(range(len(by_generation[g])), key=lambda i: (violation(trials[(g, i)]), trials[(g, i)].value, i))  # noqa: E731
    best_seed = seeds[ranked(0)[0]]["params"]
    cma = CMA(mean=np.array([best_seed[n] for n in names]), sigma=SHORT.get("sigma", 0.1),
              bounds=np.array([[space.low, space.high]] * len(names)), seed=config.short_search.seed, population_size=4)
    for generation in (1, 2):  # each generation's random numbers from (seed, generation)
        cma.reseed_rng(np.random.SeedSequence([config.short_search.seed, generation]).generate_state(1)[0])
        asked = [cma.ask() for _ in range(4)]
        assert [r["params"] for r in by_generation[generation]] == [space.repair(dict(zip(names, map(float, x))))
                                                                      for x in asked]
        order = ranked(generation)
        cma.tell([(x, float(order.index(i))) for i, x in enumerate(asked)])
    assert all("fixed_params" not in t.system_attrs for t in trials.values())  # nothing enqueued, nothing random


def test_the_searched_short_factors_beat_the_best_seed_and_follow_the_long_ones(tiny, tmp_path, uninterrupted):
    """On the stage's own search text the searched vector is better than every seed; other long factors
    (critical-dim NTK instead of YaRN) end with other short factors, never a shared random draw."""
    rows, run_dir = uninterrupted
    study = short_stage.open_context(run_dir, runs.load(run_dir), read_only=True).study
    seeds = study.user_attrs["baselines"]
    best = load_factor_file(run_dir / short_stage.BEST_FILE)
    assert best.params["constraint_violation"] == 0
    assert best.params["text_ppl"] < min(row["text_ppl"] for row in seeds.values())
    given_long(tiny, tmp_path / "long.json", method="critical_ntk")
    config = runs.load_search_config(short_config(tmp_path, tmp_path / "long.json", evaluations=7))
    other = runs.create(config, tmp_path / "runs")
    runs.run(other, quiet=True)
    assert load_factor_file(other / short_stage.BEST_FILE).short_factors != best.short_factors


@pytest.mark.slow
def test_a_short_stage_killed_then_resumed_reproduces_its_history(tiny, tmp_path, uninterrupted):
    """SIGKILL in the middle of the second generation's evaluations, then resume: the uninterrupted history."""
    from tests.test_faults import finish

    given_long(tiny, tmp_path / "long.json")
    run_dir = runs.create(runs.load_search_config(short_config(tmp_path, tmp_path / "long.json")), tmp_path / "runs")
    crashed = launch(["fitness.general_text:candidate_window_nll", "14", "--", "resume", str(run_dir)],
                     module="tests.die_at")
    assert crashed.wait(timeout=600) == -9, crashed.stderr.read().decode()[-2000:]
    assert 0 < len(short_history(run_dir)) < SHORT["evaluations"]
    finish(run_dir)
    assert short_history(run_dir) == uninterrupted[0]


def test_in_window_needles_keep_a_candidate_that_buys_text_with_needles_from_winning(tiny, tmp_path):
    """The guard's violation is the worst (length, format) group's excess over ones, computed here
    independently; a stage on general English, which the bundled model scores as noise, finds candidates
    with better text and worse needles, and none of them wins."""
    from fitness.models import ModelSettings
    from search.guard import WindowNeedleSettings
    from search.workers import Batch, TextSetup, TextWorker

    model, tokenizer = tiny
    long = given_long(tiny, tmp_path / "long.json").model_copy(update={"params": {}})
    odd = long.model_copy(update={"short_factors": tuple(1 + 3 * (i / 31) ** 0.5 for i in range(32))})
    needles = NeedleSettings(documents=4, seed=500)
    guard = WindowNeedleSettings(documents=4, max_ppl_increase=0.01)
    setup = TextSetup(ModelSettings(name="tiny", device="cpu"), (64,), (1,), text=("pydoc",), needles=needles,
                      needle_lengths=(128, 256), reference=long, guard=guard)
    [ones, scored] = TextWorker(setup).score(Batch((long, odd)))
    excess = []
    for length in (128, 256):
        documents = build_needle_set(tokenizer, needles, length)
        ref, mine = score_candidates(model, documents, [long, odd])
        excess += [mine.fitness / ref.fitness - 1 - 0.01, ref.retrieval - mine.retrieval]
    assert scored.window_violation == pytest.approx(max(excess), rel=1e-6, abs=1e-9)
    assert ones.window_violation == 0.0  # the reference itself: on the boundary of retrieval, inside on PPL

    path = short_config(tmp_path, tmp_path / "long.json", text=["kjv"], needles={"documents": 4})
    config = runs.load_search_config(path)
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    trials = short_stage.open_context(run_dir, config, read_only=True).study.get_trials(states=(TrialState.COMPLETE,))
    best = load_factor_file(run_dir / short_stage.BEST_FILE)
    assert any(violation(t) > 0 and t.value < best.params["text_ppl"] for t in trials)  # the guard decided
    assert best.params["constraint_violation"] == 0
    report = json.loads((run_dir / "short_report.json").read_text())["window_needles"]["methods"]
    for length in ("128", "256"):  # the held-out needles (another haystack and seed) agree
        assert report["searched"][length]["retrieval"] >= report["ones"][length]["retrieval"]

    # status says how many the guard let through, and which seeds it rules out (a seed that scores
    # better than the winner must not look like one the search merely failed to beat)
    status = runs.status(run_dir)
    assert f"within the guards: {sum(violation(t) <= 0 for t in trials)} of {len(trials)} evaluations" in status
    seeds = short_stage.open_context(run_dir, config, read_only=True).study.user_attrs[BASELINES]
    by_params = {tuple(sorted(t.params.items())): violation(t) for t in trials}
    space = ShortSpace(long, config.short_search.space)
    outside = 0
    for name, (candidate, _) in short_stage.seed_candidates(long, config.short_search).items():
        expected = by_params[tuple(sorted(space.encode(candidate).items()))]
        assert seeds[name].get(VIOLATION, 0.0) == pytest.approx(expected, abs=1e-9)
        marked = f"outside the guards (by {expected:.3g})" in next(line for line in status.splitlines()
                                                                    if line.strip().startswith(name + " "))
        assert marked == (expected > 0)
        outside += expected > 0
    assert outside  # this run has one: the assertions above were tested both ways


@pytest.mark.parametrize(
    "short, message",
    [
        ({"seeds": [0.0, 0.5], "space": {"low": 2.0}}, "p = 0 (ones) lies below short_search.space.low"),
        ({"seeds": [0.5, 1.0], "space": {"high": 1.5}}, "long^1 of the given long factors: outside"),
        ({"needles": {"lengths": [32]}}, "short_search.needles"),
        ({"text": ["nonesuch"]}, "unknown text sources"),
        ({"evaluations": 10**12}, "short_search.evaluations"),
    ],
)
def test_seeds_and_needles_the_space_cannot_hold_exit_2(tiny, tmp_path, capsys, short, message):
    given_long(tiny, tmp_path / "long.json")
    path = short_config(tmp_path, tmp_path / "long.json", **short)
    assert cli.main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_seed_the_space_clamps_is_named_for_what_it_is(tiny, tmp_path):
    """In a run whose long factors come from its own long stage, a seed outside [low, high] cannot be
    refused before the run began: it is clamped, and its name says so (no row called ones holds 2.0)."""
    long = given_long(tiny, tmp_path / "long.json")
    settings = short_stage.ShortSearchSettings(seeds=[0.0, 1.0], space={"low": 1.0, "high": 1.5})
    names = list(short_stage.seed_candidates(long, settings))
    assert names[0] == "ones" and names[1] == "long^1 (clamped to [1, 1.5])"


def test_a_search_named_like_another_runs_short_stage_is_refused(tmp_path, capsys):
    """In one shared storage the study `X-short` is run X's short stage: a search named X-short is refused
    before it writes anything, and so is X when a search X-short is already there."""
    journal = str(tmp_path / "shared.journal.log")
    short = {**SHORT, "evaluations": 4}
    first = write_config(tmp_path, name="x", storage=journal, short_search=short, **{"budget.evaluations": 2})
    run = runs.create(runs.load_search_config(first), tmp_path / "runs")
    runs.run(run, quiet=True)
    (tmp_path / "second").mkdir()
    second = write_config(tmp_path / "second", name="x-short", storage=journal)
    assert cli.main(["search", str(second), "--runs-dir", str(tmp_path / "runs2")]) == 2
    assert "is another run's short stage" in capsys.readouterr().err
    (tmp_path / "third").mkdir()
    third = write_config(tmp_path / "third", name="y-short", storage=journal, **{"budget.evaluations": 1})
    assert cli.main(["search", str(third), "--runs-dir", str(tmp_path / "runs3")]) == 0
    (tmp_path / "fourth").mkdir()
    fourth = write_config(tmp_path / "fourth", name="y", storage=journal, short_search=short)
    assert cli.main(["search", str(fourth), "--runs-dir", str(tmp_path / "runs4")]) == 2
    assert "the name of this run's short stage" in capsys.readouterr().err
    assert not (tmp_path / "runs2").exists() or not any((tmp_path / "runs2").iterdir())
    from optuna import get_all_study_names

    from search.storage import open_storage

    assert set(get_all_study_names(open_storage(journal, tmp_path))) == {"x", "x-short", "y-short"}
