"""What the long stage's short-window guard spent: a run's evaluations grouped by attention factor, with
the short-window cost each group paid and how many the guard let through.

Inside the original window the long stage's candidates have no short factors (ones), so the cost the
guard measures there depends on the attention factor alone: every evaluation at an attention factor over
the limit is spent on a candidate that cannot win, whatever its long factors.

    python -m benchmarks.guard_costs RUN_DIR --out benchmarks/results/h100/smollm2-64k-guard-costs.json
"""

from __future__ import annotations

import argparse
from itertools import groupby
from pathlib import Path

from optuna.trial import TrialState

from benchmarks.output import emit
from search import long_stage, runs
from search.evolution import attention_edge
from search.guard import SHORT_COST, violation


def guard_costs(study, max_cost: float | None) -> dict:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if SHORT_COST in t.user_attrs]
    attention = lambda t: t.params.get("attention_factor")  # noqa: E731
    groups = []
    for factor, trials in groupby(sorted(complete, key=lambda t: (attention(t) or 0.0)), key=attention):
        trials = list(trials)
        costs = [t.user_attrs[SHORT_COST] for t in trials]
        groups.append({"attention_factor": factor, "evaluations": len(trials), "short_cost_min": min(costs),
                       "short_cost_max": max(costs), "within_guard": sum(violation(t) <= 0 for t in trials)})
    feasible = [g["attention_factor"] for g in groups if g["within_guard"] and g["attention_factor"] is not None]
    over = [g for g in groups if not g["within_guard"]]
    return {
        "max_cost": max_cost,
        "evaluations": len(complete),
        "within_guard": sum(g["within_guard"] for g in groups),
        "spent_over_the_limit": sum(g["evaluations"] for g in over) / len(complete) if complete else None,
        "largest_attention_factor_within": max(feasible, default=None),
        "interpolated_edge": attention_edge(complete, max_cost) if max_cost is not None else None,
        # the guard's edge lies between the two
        "next_attention_factor_over": min((g["attention_factor"] for g in over if g["attention_factor"] is not None
                                           and g["attention_factor"] > max(feasible, default=0.0)), default=None),
        "by_attention_factor": groups,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder made by `ropesearch search` (read only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = runs.load(args.run_dir)
    study = long_stage.open_context(args.run_dir, config, read_only=True).study
    emit({"benchmark": "guard_costs", "run": args.run_dir.name, **guard_costs(study, config.short_guard.max_cost)},
         args.out)


if __name__ == "__main__":
    main()
