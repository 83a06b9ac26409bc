"""The short-window guard: what a candidate costs inside the original window is a constraint.

transformers applies the exported attention factor at every length, so a candidate that buys needle
PPL at the target length with a larger attention factor makes every short prompt worse. Each
candidate's perplexity on plain haystack text at a short length (under exactly the RoPE the exported
config gives such inputs) is measured by the worker, relative to the model's own. A cost above
`max_cost` makes the candidate infeasible.

A constraint rather than a penalty: the told value stays the needle PPL (comparable across runs and
with the baselines), no weight has to be tuned against the PPL's scale, and the rule is the one
Optuna's constrained samplers use: feasible before infeasible, then the lower value; among
infeasible ones the smaller violation. Constraint values live in the trial's system attribute
"constraints" (Optuna's key; <= 0 is feasible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fitness.scoring import Score

from search import trial_keys as keys
from search.trial_keys import CONSTRAINTS, SHORT_COST, WINDOW_NEEDLES  # noqa: F401  (re-exported)

VIOLATION = "constraint_violation"  # a saved candidate's violation (0: feasible), so a kept file ranks as its trial did


class ShortGuardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_cost: float | None = Field(default=None, ge=0, le=10)  # e.g. 0.02: at most +2 % perplexity; None: off
    length: int | None = Field(default=None, gt=8, le=131072)  # None: the model's original window
    windows: int = Field(default=4, gt=0, le=256)
    # The evolution holds children's attention factors at or below the guard's edge, interpolated from the
    # finished generations' costs (search.evolution.attention_edge): in the long stage the cost is the
    # attention factor's alone, so a child above the edge cannot win whatever its long factors.
    bound_attention: bool = False

    @property
    def enabled(self) -> bool:
        return self.max_cost is not None


def constraint_values(short_cost: float | None, settings: ShortGuardSettings,
                      window_violation: float | None = None) -> list[float]:
    """Optuna's constraint values (<= 0: feasible): the long stage's text cost over `settings.max_cost`,
    the short stage's in-window needle violation; empty when neither applies."""
    constraints = []
    if short_cost is not None and settings.enabled:
        constraints.append(short_cost - settings.max_cost)
    if window_violation is not None:
        constraints.append(window_violation)
    return constraints


def record_cost(study, trial, short_cost: float | None, settings: ShortGuardSettings,
                window_violation: float | None = None) -> None:
    """The trial's short-window cost (a user attribute) and its constraints (a system attribute, none
    stored when no guard applies)."""
    if short_cost is not None:
        keys.set_trial_user_attr(study, trial, SHORT_COST, short_cost)
    constraints = constraint_values(short_cost, settings, window_violation)
    if constraints:
        keys.set_trial_system_attr(study, trial, CONSTRAINTS, constraints)


def violation(trial: FrozenTrial) -> float:
    return max([0.0, *trial.system_attrs.get(CONSTRAINTS, [])])


def rank(trial: FrozenTrial) -> tuple[float, float]:
    """Sort key: feasible first (violation 0), then the lower needle PPL."""
    return violation(trial), trial.value


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: (*rank(t), t.number)) if complete else None


# ---------------------------------------------------------------- in-window needles (the short stage)
class WindowNeedleSettings(BaseModel):
    """The short stage's guard: needle documents inside the window, in the search's own needle formats and
    haystack (another seed), scored for every candidate. A candidate whose needle PPL in any (length,
    format) group rises more than `max_ppl_increase` above the reference's there, or whose retrieval falls
    more than `max_retrieval_drop` below it, is infeasible. The reference is ones: what the long stage
    alone exports (its attention factor, no short factors), so the stage can only keep or improve what
    short inputs could do."""

    model_config = ConfigDict(extra="forbid")

    lengths: list[int] | None = Field(default=None, min_length=1, max_length=16)  # None: window/2 and window
    documents: int = Field(default=8, gt=0, le=1024)  # per length
    seed: int = Field(default=500, ge=0, le=2**32 - 1)
    max_ppl_increase: float = Field(default=0.02, ge=0, le=10)
    max_retrieval_drop: float = Field(default=0.0, ge=0, le=1)


def group_scores(groups_by_length: dict[int, dict[str, Score]]) -> dict[str, dict]:
    """{"LENGTH/FORMAT": {"needle_ppl", "retrieval"}}: one row per group, the form stored and reported."""
    return {f"{length}/{name}": {"needle_ppl": part.fitness, "retrieval": part.retrieval}
            for length, parts in groups_by_length.items() for name, part in parts.items()}


def window_needle_violation(scores: dict[str, dict], reference: dict[str, dict], settings: WindowNeedleSettings) -> float:
    """The largest excess over the tolerances in any group (<= 0: feasible), as Optuna's constraints read it."""
    excess = []
    for group, ref in reference.items():
        mine = scores[group]
        excess.append(mine["needle_ppl"] / ref["needle_ppl"] - 1 - settings.max_ppl_increase)
        excess.append(ref["retrieval"] - mine["retrieval"] - settings.max_retrieval_drop)
    return max(excess)
