"""The short-window guard: each candidate's perplexity cost on plain text inside the original window
is measured by the worker and constrains the search (feasible first, then the lower needle PPL)."""

import pytest
from optuna.trial import TrialState

from fitness.factor_files import load_factor_file
from fitness.general_text import candidate_perplexities, haystack_windows, perplexity
from fitness.models import load_model
from search import long_stage, runs
from search.guard import CONSTRAINTS, SHORT_COST, best_trial, violation
from tests.search_helpers import write_config

LIMIT = 0.002


def _run(tmp_path, **changes):
    tmp_path.mkdir()
    changes = {"space.search_attention": True, "space.attention": "none", "short_guard.windows": 2, **changes}
    config = runs.load_search_config(write_config(tmp_path, **changes))
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    return run_dir, long_stage.open_context(run_dir, runs.load(run_dir)).study


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_guard_keeps_the_winner_within_its_short_window_budget(tmp_path):
    _, free = _run(tmp_path / "free")
    guarded_dir, guarded = _run(tmp_path / "guarded", **{"short_guard.max_cost": LIMIT})
    assert best_trial(free).user_attrs[SHORT_COST] > LIMIT  # unguarded, the search spends short context

    winner = best_trial(guarded)
    assert winner.user_attrs[SHORT_COST] <= LIMIT
    complete = guarded.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.system_attrs[CONSTRAINTS] == [t.user_attrs[SHORT_COST] - LIMIT] for t in complete)
    assert any(t.value < winner.value for t in complete)  # the guard did bind: a lower PPL was refused
    saved = load_factor_file(guarded_dir / "best_factors.json")
    assert saved.params[SHORT_COST] == winner.user_attrs[SHORT_COST]

    model, tokenizer = load_model("tiny")  # the cost as measured independently of the worker
    windows = haystack_windows(tokenizer, ["pydoc"], 256, 2)
    (ppl,) = candidate_perplexities(model, windows, [saved])
    assert ppl / perplexity(model, windows) - 1 == pytest.approx(winner.user_attrs[SHORT_COST], rel=1e-4, abs=1e-6)


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_in_the_long_stage_the_guards_cost_is_the_attention_factors_alone(tmp_path):
    """Inside the window a long-stage candidate has no short factors, so the guard's cost depends on its
    attention factor only (benchmarks/guard_costs.py groups a run by it): a group never spans two costs,
    and every evaluation at a factor over the limit was spent on a candidate that could not win."""
    from benchmarks.guard_costs import guard_costs

    _, study = _run(tmp_path / "guarded", **{"short_guard.max_cost": LIMIT})
    costs = guard_costs(study, LIMIT)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    groups = costs["by_attention_factor"]
    assert sum(g["evaluations"] for g in groups) == costs["evaluations"] == len(complete)
    assert any(g["evaluations"] > 1 for g in groups)  # candidates with other long factors share a factor
    assert len({round(t.params["critical_dim"]) for t in complete}) > 1
    for group in groups:
        assert group["short_cost_max"] - group["short_cost_min"] <= 1e-6 * max(1.0, group["short_cost_max"])
        assert (group["within_guard"] == group["evaluations"]) == (group["short_cost_max"] <= LIMIT)
    assert costs["within_guard"] == sum(violation(t) <= 0 for t in complete)
    over = sum(g["evaluations"] for g in groups if g["short_cost_max"] > LIMIT)
    assert costs["spent_over_the_limit"] == pytest.approx(over / len(complete))


@pytest.mark.filterwarnings("ignore:vLLM ignore")
def test_a_bounded_attention_factor_spends_no_child_over_the_guard(tmp_path):
    """With bound_attention the evolution holds each child's attention factor at or below the guard's edge,
    interpolated from the earlier generations' costs; without it, children over the edge are scored for
    nothing."""
    from search.evolution import attention_edge
    from search.slots import finished_history, slot_of

    def children_over(study):
        return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if slot_of(t)[0] >= 1 and violation(t) > 0]

    _, free = _run(tmp_path / "free", **{"short_guard.max_cost": LIMIT})
    _, bounded = _run(tmp_path / "bounded", **{"short_guard.max_cost": LIMIT, "short_guard.bound_attention": True})
    assert children_over(free)
    assert not children_over(bounded)
    children = [t for t in bounded.get_trials(states=(TrialState.COMPLETE,)) if slot_of(t)[0] >= 1]
    assert children
    for child in children:
        history = finished_history(bounded, slot_of(child)[0])
        edge = attention_edge(history, LIMIT)
        over = [t.params["attention_factor"] for t in history if t.user_attrs[SHORT_COST] > LIMIT
                and t.params["attention_factor"] > 1]
        assert edge is not None and 1.0 <= edge < min(over)
        assert child.params["attention_factor"] <= edge
    assert violation(best_trial(bounded)) == 0
