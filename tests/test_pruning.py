"""Multi-fidelity: candidates pruned on the first documents, with decisions that survive a crash."""

import math
import signal

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import long_stage, report, runs
from search.guard import CONSTRAINTS, best_trial, violation
from search.pruning import PruningSettings, make_pruner
from search.slots import slot_of
from search.trial_keys import SLOT
from tests.search_helpers import completed_in, history_of, launch, write_config

FIRST = 2  # of the small config's 4 documents
PRUNING = {
    "pruning.name": "earlier_trials",
    "pruning.documents": FIRST,
    "pruning.keep_percentile": 50,
    "pruning.min_reference": 4,
    "sampler.evolution.generations": 6,
}
SETTLED = 8 + 5 * 4


def new_run(tmp_path, **changes):
    return runs.create(runs.load_search_config(write_config(tmp_path, **PRUNING, **changes)), tmp_path / "runs")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pruned")
    run_dir = new_run(tmp)
    summary = runs.run(run_dir, quiet=True)
    return run_dir, summary


def settled_trials(run_dir):
    ctx = long_stage.open_context(run_dir, runs.load(run_dir))
    return ctx, ctx.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_pruned_candidates_stop_after_the_first_documents(pruned_run):
    run_dir, summary = pruned_run
    ctx, trials = settled_trials(run_dir)
    assert len(trials) == summary["completed"] == SETTLED
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    for trial in pruned:
        assert len(trial.user_attrs["document_nll"]) == FIRST
        assert trial.value == trial.intermediate_values[FIRST]
    for trial in complete:
        nll = trial.user_attrs["document_nll"]
        assert len(nll) == 4
        assert trial.value == pytest.approx(math.exp(sum(nll) / 4), rel=1e-12)
        assert trial.intermediate_values[FIRST] == pytest.approx(math.exp(sum(nll[:FIRST]) / FIRST), rel=1e-12)
    assert summary["pruning"]["pruned"] == len(pruned)
    assert summary["pruning"]["scorings_saved"] == len(pruned) * (4 - FIRST)
    assert f"{len(pruned)} of {SETTLED} candidates pruned" in runs.status(run_dir)


def test_each_decision_follows_the_earlier_generations(pruned_run):
    """Pruned exactly when the first-stage PPL is worse than the median of earlier generations' (>= 4 of them)."""
    run_dir, _ = pruned_run
    ctx, trials = settled_trials(run_dir)
    slot = slot_of
    for trial in trials:
        earlier = [t.intermediate_values[FIRST] for t in trials if slot(t)[0] < slot(trial)[0]]
        worse = len(earlier) >= 4 and trial.intermediate_values[FIRST] > np.percentile(earlier, 50)
        assert (trial.state == TrialState.PRUNED) == worse, trial.number
    assert not any(t.state == TrialState.PRUNED for t in trials if slot(t)[0] == 0)  # nothing to compare with yet


def test_no_candidate_is_scored_twice(pruned_run):
    run_dir, _ = pruned_run
    ctx, trials = settled_trials(run_dir)
    keys = [ctx.space.key(t.params) for t in trials]
    assert len(set(keys)) == len(keys)


def test_the_fitness_plot_and_report_carry_the_pruning(pruned_run):
    run_dir, summary = pruned_run
    assert (run_dir / "fitness.png").stat().st_size > 0
    assert summary["report"]["pruning"] == summary["pruning"]
    line = report.format_pruning(summary["pruning"])
    assert f"after {FIRST} of 4 documents" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, call",
    [("search.driver:after_first_stage", 7), ("search.workers:CandidateScore.then", 9)],
    ids=["before a first stage is told", "between second-stage tells"],
)
def test_killed_and_resumed_pruned_search_decides_the_same(tmp_path, pruned_run, target, call):
    run_dir = new_run(tmp_path)
    crashed = launch([target, str(call), "--", "resume", str(run_dir)], module="tests.die_at")
    assert crashed.wait(timeout=600) == -signal.SIGKILL, crashed.stderr.read().decode()[-2000:]
    assert completed_in(run_dir / "study.db") < SETTLED
    resumed = launch(["resume", str(run_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    assert history_of(run_dir) == history_of(pruned_run[0])


def _settled(generation: int, slot: int, first_stage: float, violation: float | None = None):
    constraints = {} if violation is None else {CONSTRAINTS: [violation]}
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=first_stage, intermediate_values={FIRST: first_stage},
        system_attrs={SLOT: [generation, slot], **constraints},
    )


@pytest.mark.parametrize(
    "settings, kept",
    [({"keep_best": 3, "min_reference": 1}, [1.0, 2.0, 3.0]), ({"keep_percentile": 50, "min_reference": 1}, [1.0, 2.0, 3.0]),
     ({"keep_best": 2, "min_reference": 1}, [1.0, 2.0]), ({"keep_best": 3, "min_reference": 6}, [1.0, 2.0, 3.0, 4.0, 5.0])],
)
def test_the_pruner_compares_with_earlier_generations_only(settings, kept):
    pruner = make_pruner(PruningSettings(name="earlier_trials", **settings))
    study = optuna.create_study()
    for slot, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        study.add_trial(_settled(0, slot, value))
    study.add_trial(_settled(1, 0, 0.5))  # the same generation: never a reference
    for value in [1.0, 2.0, 3.0, 4.0, 5.0]:
        trial = _settled(1, 1, value)
        assert pruner.prune(study, trial) == (value not in kept), value


@pytest.mark.parametrize("feasible_earlier, infeasible_pruned", [(3, True), (2, False)])
def test_under_the_guard_feasible_candidates_are_the_reference(feasible_earlier, infeasible_pruned):
    """Infeasible candidates with low needle PPL never raise the bar for a feasible one (it ranks before
    them whatever its PPL), and an infeasible one is pruned once enough feasible ones exist to be kept."""
    pruner = make_pruner(PruningSettings(name="earlier_trials", keep_best=3, min_reference=1))
    study = optuna.create_study()
    for slot, value in enumerate([0.1, 0.2, 0.3]):
        study.add_trial(_settled(0, slot, value, violation=0.05))  # over the guard
    for slot, value in enumerate([1.0, 2.0, 3.0][:feasible_earlier]):
        study.add_trial(_settled(0, 3 + slot, value, violation=-0.01))
    feasible = [pruner.prune(study, _settled(1, 0, value, violation=-0.01)) for value in (2.5, 3.5)]
    assert feasible == ([False, True] if feasible_earlier == 3 else [False, False])
    assert pruner.prune(study, _settled(1, 1, 0.05, violation=0.01)) == infeasible_pruned


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_a_guarded_pruned_search_keeps_each_candidates_cost_and_ranks_feasible_first(tmp_path):
    """With the short guard on, the first stage measures the cost, so every settled candidate (pruned ones
    too) carries its constraint, and each decision follows the rule over feasible earlier candidates. The
    replay benchmark, fed the same run, finds the same decisions from the stored per-document NLLs."""
    from benchmarks.pruning_replay import replay, replay_run, running_best

    run_dir = new_run(tmp_path, **{"space.search_attention": True, "space.attention": "none",
                                   "short_guard.max_cost": 0.002, "short_guard.windows": 2,
                                   "pruning.keep_best": 3})
    runs.run(run_dir, quiet=True)
    ctx, trials = settled_trials(run_dir)
    assert all(CONSTRAINTS in t.system_attrs for t in trials)
    assert {violation(t) > 0 for t in trials} == {True, False}  # the guard binds
    pruned = {t.number for t in trials if t.state == TrialState.PRUNED}
    for trial in trials:
        earlier = [t for t in trials if slot_of(t)[0] < slot_of(trial)[0] and violation(t) <= 0]
        if violation(trial) > 0:
            expected = len(earlier) >= 4
        else:
            reference = sorted(t.intermediate_values[FIRST] for t in earlier)
            expected = len(reference) >= 4 and trial.intermediate_values[FIRST] > reference[2]
        assert (trial.number in pruned) == expected, trial.number
    unguarded = []  # what the rule without the guard would have decided: the guard changed decisions here
    for trial in trials:
        reference = sorted(t.intermediate_values[FIRST] for t in trials if slot_of(t)[0] < slot_of(trial)[0])
        unguarded.append(len(reference) >= 4 and trial.intermediate_values[FIRST] > reference[2])
    assert pruned and unguarded != [t.number in pruned for t in trials]

    # replayed from the stored per-document NLLs, the same rule over the same trials decides the same
    replayed = replay(trials, FIRST, 3, 50.0, 4)
    assert replayed["pruned_trials"] == sorted(pruned) and replayed["winner"] == best_trial(ctx.study).value
    best = [row["best"] for row in running_best(trials)]
    assert len(best) == 6 and best == sorted(best, reverse=True) and best[-1] == best_trial(ctx.study).value
    from_folder = replay_run(run_dir, [FIRST], [3], 50.0, 4)  # what the command line reads: the same
    assert from_folder["evaluations"] == len(trials) and from_folder["settings"][0]["pruned_trials"] == sorted(pruned)
    assert from_folder["settings"][1]["pruner_sees_the_guard"] is False


@pytest.mark.slow
def test_two_ray_workers_prune_the_same(tmp_path, pruned_run):
    run_dir = new_run(tmp_path, **{"workers.backend": "ray", "workers.count": 2})
    runs.run(run_dir, quiet=True)
    assert history_of(run_dir) == history_of(pruned_run[0])


def test_the_throughput_benchmark_scores_every_document_of_a_pruned_config(tmp_path):
    """The loop is timed against scoring the same candidates fully in-process: it must not prune."""
    from benchmarks.search_throughput import run_search

    summary, candidates, config, _ = run_search(new_run_config(tmp_path), 6, {})
    assert config.pruning.name == "none" and not (summary.get("pruning") or {}).get("pruned")
    assert summary["evaluated"] == len(candidates) == 6


def new_run_config(tmp_path):
    return write_config(tmp_path, **{**PRUNING, "pruning.keep_percentile": 1, "pruning.min_reference": 1})
