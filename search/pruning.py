"""Multi-fidelity: score a candidate on the first few search documents, and stop there if it is clearly bad.

An Optuna pruner plug-in, as the evolution is a sampler plug-in. The driver reports each candidate's
needle PPL on the first `documents` documents as an intermediate value; `should_prune` asks this
pruner; a pruned candidate is told PRUNED (its first-stage PPL kept as its value), the others are
scored on the remaining documents and told as usual.

The reference is the first-stage PPL of candidates from *earlier generations* only (or, without the
evolution, earlier trial numbers): those are settled before a generation is proposed, so a decision is
the same whichever worker finishes first, and the same again after a resume. Under the short guard the
first stage measures the cost too, and the reference is the feasible candidates: blind to the guard, the
rule measured against candidates that could not win and, replayed on the 64k search, pruned its winner
(benchmarks/pruning_replay.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from optuna.pruners import BasePruner, NopPruner
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from search.guard import violation
from search.slots import is_earlier


class PruningSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["none", "earlier_trials"] = "none"
    documents: int = Field(default=8, gt=0)  # the first stage: this many of the search documents
    # go on only if the first-stage PPL is within the best `keep_best` of earlier candidates' (the evolution's
    # `parents` is the natural choice: a child worse than that would never be a parent), or else within
    # their best `keep_percentile` %
    keep_best: int | None = Field(default=None, gt=0)
    keep_percentile: float = Field(default=50.0, gt=0, le=100)
    min_reference: int = Field(default=16, gt=0, le=100_000)  # earlier first-stage scores needed before anything is pruned


class EarlierTrialsPruner(BasePruner):
    """Prune a trial whose intermediate PPL is worse than the `keep_best`-th best of earlier trials' (or,
    without `keep_best`, than their `keep_percentile`-th percentile)."""

    def __init__(self, keep_percentile: float, min_reference: int, keep_best: int | None = None):
        self.keep_percentile, self.min_reference, self.keep_best = keep_percentile, min_reference, keep_best

    def prune(self, study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        earlier = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                   if step in t.intermediate_values and is_earlier(t, trial)]
        # Under the short guard a feasible candidate ranks before every infeasible one, whatever their needle
        # PPLs: the reference is the feasible ones, and an infeasible candidate is worse than all of them
        # (without a guard every candidate is feasible and nothing changes)
        feasible = [t for t in earlier if violation(t) <= 0]
        needed = max(self.min_reference, self.keep_best or 0)
        if violation(trial) > 0:
            return len(feasible) >= needed
        reference = [t.intermediate_values[step] for t in feasible]
        if len(reference) < needed:
            return False
        if self.keep_best is not None:
            threshold = sorted(reference)[self.keep_best - 1]
        else:
            threshold = np.percentile(reference, self.keep_percentile)
        return trial.intermediate_values[step] > threshold


PRUNERS = {
    "none": lambda settings: NopPruner(),
    "earlier_trials": lambda s: EarlierTrialsPruner(s.keep_percentile, s.min_reference, s.keep_best),
}


def make_pruner(settings: PruningSettings) -> BasePruner:
    return PRUNERS[settings.name](settings)


def saved_scorings(study, settings: PruningSettings, documents: int) -> dict:
    """What pruning saved: candidate x document scorings not run, against scoring every candidate fully."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    full = len(trials) * documents
    saved = pruned * (documents - settings.documents) if settings.name != "none" else 0
    return {
        "candidates": len(trials),
        "pruned": pruned,
        "first_stage_documents": settings.documents,
        "documents": documents,
        "scorings_saved": saved,
        "saved_fraction": saved / full if full else 0.0,
    }
