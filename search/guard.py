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

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

CONSTRAINTS = "constraints"
SHORT_COST = "short_cost"


class ShortGuardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_cost: float | None = Field(default=None, ge=0, le=10)  # e.g. 0.02: at most +2 % perplexity; None: off
    length: int | None = Field(default=None, gt=8, le=131072)  # None: the model's original window
    windows: int = Field(default=4, gt=0, le=256)

    @property
    def enabled(self) -> bool:
        return self.max_cost is not None


def record_cost(storage, trial_id: int, short_cost: float | None, settings: ShortGuardSettings) -> None:
    if short_cost is None:
        return
    storage.set_trial_user_attr(trial_id, SHORT_COST, short_cost)
    if settings.enabled:
        storage.set_trial_system_attr(trial_id, CONSTRAINTS, [short_cost - settings.max_cost])


def violation(trial: FrozenTrial) -> float:
    return max([0.0, *trial.system_attrs.get(CONSTRAINTS, [])])


def rank(trial: FrozenTrial) -> tuple[float, float]:
    """Sort key: feasible first (violation 0), then the lower needle PPL."""
    return violation(trial), trial.value


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: (*rank(t), t.number)) if complete else None
