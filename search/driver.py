"""The loop both stages run: ask -> score -> tell, from a study in Optuna storage.

A stage (search/long_stage.py, search/short_stage.py) sets up a `SearchContext`: its space, sampler,
study, what its workers are built from, its seeds and budget; `run_stage` runs the loop and, once the
stage's budget is spent, the stage's own ending (best factors, plots, report). This module knows no
config: what it reads of one is the `workers` section and, under pruning, the number of documents.

Everything a run knows is in its study: each evaluation is committed (tell) before it counts, so a
driver killed at any point resumes from storage alone. Trials left RUNNING by a dead driver are
marked failed as "interrupted" and their slots are asked again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from fitness.factor_files import load_factor_file
from fitness.factors import RopeCandidate
from fitness.geometry import RopeGeometry
from search import interrupts
from search import trial_keys as keys
from search.guard import (SHORT_COST, VIOLATION, WINDOW_NEEDLES, ShortGuardSettings, best_trial, constraint_values,
                          record_cost, violation)
from search.liveness import Heartbeat, fail_interrupted
from search.objective import NEEDLE_PPL, objective_value
from search.slots import GenerationSlots, Slots, step_back_if_duplicate
from search.space import RopeSpace, ShortSpace
from search.trial_keys import BASELINES, DRIVER, ERROR, STOPPED
from search.workers import CandidateScore, Job, TextSetup, WorkerSetup, make_pool


@dataclass
class SearchContext:
    """What a driver derives from a run's config for one stage: geometry, target, space, sampler, study,
    what its workers are built from, the seeds it scores once, its budget and its best-factors file."""

    run_dir: Path
    config: Any  # the run's SearchConfig (search/config.py imports the stages, which import this module)
    geometry: RopeGeometry
    target: int
    space: RopeSpace | ShortSpace
    sampler: optuna.samplers.BaseSampler  # called by the study only
    slots: Slots  # what the driver asks: which trials to score next, how many in all
    study: optuna.Study
    setup: WorkerSetup | TextSetup
    seeds: dict[str, RopeCandidate]  # scored once per study, kept as its "baselines"
    evaluations: int | None = None  # budget
    minutes: float | None = None  # budget
    first_stage: list[int] | None = None  # under pruning: the documents of the first stage
    guard: ShortGuardSettings = field(default_factory=ShortGuardSettings)
    best_file: str = "best_factors.json"
    objective: str = NEEDLE_PPL  # the key its told value is stored under (search.objective)
    driver_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}")

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def candidate(self, params: dict) -> RopeCandidate:
        return self.space.decode(params)


# ---------------------------------------------------------------- asking
@dataclass
class Asked:
    trial: optuna.Trial | None  # None: a slot already settled, scored again only to keep the batch identical
    candidate: RopeCandidate
    goes_on: bool = True  # under pruning: this row is also in the group's second stage
    first_stage: CandidateScore | None = None  # under pruning: its score on the first-stage documents


def _ask(ctx: SearchContext) -> optuna.Trial:
    trial = ctx.study.ask(ctx.space.distributions())
    keys.set_trial_system_attr(ctx.study, trial, DRIVER, ctx.driver_id)
    return trial


def next_jobs(ctx: SearchContext, limit: int) -> list[Job] | None:
    """Ask up to `limit` trials, in jobs of `candidates_per_forward`, as the slot book hands them out.
    None: nothing can be asked now (the search is finished, or its generation is being finished here or
    by another driver)."""
    k = ctx.config.workers.candidates_per_forward
    groups = ctx.slots.take(ctx.study, lambda: _ask(ctx), limit, k, pruning=ctx.first_stage is not None)
    if groups is None:
        return None
    jobs = []
    for group in groups:
        asked = [Asked(t.trial, ctx.candidate(t.params), goes_on=t.goes_on) for t in group]
        jobs.append(Job(asked, [a.candidate for a in asked], ctx.first_stage))
    return jobs


# ---------------------------------------------------------------- telling
def record(ctx: SearchContext, asked: Asked, score: CandidateScore | None, error: str | None) -> bool:
    """Commit one evaluation to storage. True if it counts as a completed evaluation."""
    if asked.trial is None:
        return False
    study, trial = ctx.study, asked.trial
    if error is None and asked.first_stage is not None:
        score = asked.first_stage.then(score)
    if error is None and math.isnan(score.value):  # a NaN told value is a failed evaluation
        error = "fitness is NaN"
    if error is not None:
        keys.set_trial_system_attr(study, trial, ERROR, error[:500])
        ctx.study.tell(asked.trial, state=TrialState.FAIL)
        return False
    if step_back_if_duplicate(study, trial):
        return False
    _keep_scores(ctx, trial, score)
    record_cost(study, trial, score.short_cost, ctx.guard, score.window_violation)  # before tell: samplers read it
    ctx.study.tell(asked.trial, score.value)
    return True


def _keep_scores(ctx: SearchContext, trial, score: CandidateScore) -> None:
    def keep(key: str, value) -> None:
        keys.set_trial_user_attr(ctx.study, trial, key, value)

    for key in ("retrieval", "seconds", "document_nll"):
        keep(key, getattr(score, key))
    for name, part in score.by_format().items():  # plain numbers: a column each in optuna-dashboard's table
        keep(f"ppl:{name}", part.fitness)
        keep(f"retrieval:{name}", part.retrieval)
    if score.window_needles is not None:
        keep(WINDOW_NEEDLES, score.window_needles)


def after_first_stage(ctx: SearchContext, outcome) -> tuple[int, Job | None]:
    """Report each candidate's first-stage PPL and prune the clearly bad; the others go on to the rest of
    the documents. Returns (trials pruned, the second-stage job or None)."""
    if outcome.error is not None:
        return sum(record(ctx, asked, None, outcome.error) for asked in outcome.job.tag), None
    pruned = 0
    for asked, score in zip(outcome.job.tag, outcome.scores):
        asked.first_stage = score
        if asked.trial is None or math.isnan(score.value):
            continue
        if step_back_if_duplicate(ctx.study, asked.trial):
            asked.trial = None  # still scored with its group (the batch stays the same), never told
            continue
        # the guard's cost is measured with the first stage: the pruner ranks feasible candidates first
        record_cost(ctx.study, asked.trial, score.short_cost, ctx.guard, score.window_violation)
        asked.trial.report(score.value, step=len(outcome.job.documents))
        if asked.trial.should_prune():
            _keep_scores(ctx, asked.trial, score)
            ctx.study.tell(asked.trial, state=TrialState.PRUNED)
            asked.goes_on, pruned = False, pruned + 1
    going_on = [a for a in outcome.job.tag if a.goes_on]
    if not any(a.trial is not None for a in going_on):
        return pruned, None
    rest = list(range(len(outcome.job.documents), ctx.config.needles.documents))
    return pruned, Job(going_on, [a.candidate for a in going_on], rest)


def settle(ctx: SearchContext, outcome) -> tuple[int, Job | None]:
    """Tell the study what a job's outcome means. Returns (evaluations settled, a follow-up job or None)."""
    first_stage = ctx.first_stage
    if first_stage is not None and outcome.job.documents == first_stage:
        return after_first_stage(ctx, outcome)
    scores = outcome.scores or [None] * len(outcome.job.tag)
    return sum(record(ctx, asked, score, outcome.error) for asked, score in zip(outcome.job.tag, scores)), None


# ---------------------------------------------------------------- the whole run
def completed(ctx: SearchContext) -> int:
    """Settled evaluations: complete, or pruned after their first stage."""
    return len(ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def total_budget(ctx: SearchContext) -> int | None:
    budgets = [b for b in (ctx.evaluations, ctx.slots.total) if b is not None]
    return min(budgets) if budgets else None


def best_candidate(ctx: SearchContext) -> tuple[RopeCandidate, optuna.trial.FrozenTrial] | None:
    best = best_trial(ctx.study)
    if best is None:
        return None
    candidate = ctx.candidate(best.params)
    provenance = {
        **candidate.params,
        ctx.objective: best.value,
        "retrieval": best.user_attrs.get("retrieval"),
        SHORT_COST: best.user_attrs.get(SHORT_COST),
        VIOLATION: violation(best),
        "trial": best.number,
        "study": ctx.study_name,
        "run": ctx.run_dir.name,
        "model": ctx.config.model.name,
    }
    return candidate.model_copy(update={"params": provenance}), best


def score_baselines(ctx: SearchContext, pool) -> dict:
    """Baselines (the stage's seeds) on the search documents, once per study (kept in its user attributes)."""
    stored = ctx.study.user_attrs.get(BASELINES)
    if stored is not None and set(stored) >= set(ctx.seeds):
        return stored
    results = {}
    for outcome in pool.run(deque(Job(name, [c]) for name, c in ctx.seeds.items())):
        if outcome.error is None:
            score = outcome.scores[0]
            results[outcome.job.tag] = {ctx.objective: score.value, "retrieval": score.retrieval}
            if score.short_cost is not None:  # measured wherever the worker has the guard's text
                results[outcome.job.tag][SHORT_COST] = score.short_cost
            if score.window_needles is not None:
                results[outcome.job.tag][WINDOW_NEEDLES] = score.window_needles
            constraints = constraint_values(score.short_cost, ctx.guard, score.window_violation)
            if constraints:  # so status can say which seeds no guard lets win
                results[outcome.job.tag][VIOLATION] = max(0.0, *constraints)
    ctx.study.set_user_attr(BASELINES, results)
    return results


def name_objective(ctx: SearchContext) -> None:
    """The study's metric name is its objective's key: optuna-dashboard labels the told value with it."""
    if ctx.study.metric_names != [ctx.objective]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and the only way to name it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ctx.study.set_metric_names([ctx.objective])


def search(ctx: SearchContext, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run until the budget is spent. `stop_after` evaluations end it early (tests, benchmarks).

    Every worker is kept `in_flight` jobs deep: each job that comes back is told, and new trials are
    asked in its place, so the workers never wait for a round to drain, and a driver holds only the
    slots its workers can score, leaving the rest of a generation to other drivers of the same study."""
    config = ctx.config
    fail_interrupted(ctx.study, ctx.driver_id)
    heartbeat = Heartbeat(ctx.study, ctx.driver_id)
    heartbeat()
    name_objective(ctx)
    pool = make_pool(config.workers, ctx.setup)
    started, evaluated = time.time(), 0
    budget = total_budget(ctx)
    k, capacity = config.workers.candidates_per_forward, config.workers.count * config.workers.in_flight
    progress = tqdm(total=budget, initial=completed(ctx), desc="search", unit="eval", disable=quiet,
                    dynamic_ncols=True, mininterval=1.0)
    open_trials: set[int] = set()  # asked here, not settled yet
    outstanding = 0  # jobs queued or running
    out_of_time = False

    def room() -> int:
        """How many more trials may be asked now: the budgets, the clock and `stop_after` allowing."""
        nonlocal out_of_time
        if ctx.minutes is not None and time.time() - started > ctx.minutes * 60:
            out_of_time = True
            return 0
        limits = [k]
        if budget is not None:
            limits.append(budget - completed(ctx) - len(open_trials))
        if stop_after is not None:
            limits.append(stop_after - evaluated - len(open_trials))
        return max(0, min(limits))

    def ask(jobs: deque) -> None:
        nonlocal outstanding
        while outstanding < capacity and (limit := room()) > 0:
            new = next_jobs(ctx, limit)
            if new is None:
                return
            jobs.extend(new)
            outstanding += len(new)
            for job in new:
                open_trials.update(_trial_ids(job))

    try:
        score_baselines(ctx, pool)
        loop_started = last_written = last_checked = time.time()
        while True:
            jobs: deque = deque()
            ask(jobs)
            if not jobs:
                if room() == 0 or ctx.slots.finished(ctx.study):
                    break
                time.sleep(1.0)  # another driver is finishing this generation
                interrupts.check()
                heartbeat()
                if time.time() - last_checked > 10:  # or died doing it
                    fail_interrupted(ctx.study, ctx.driver_id)
                    last_checked = time.time()
                continue
            for outcome in pool.run(jobs):
                interrupts.check()  # before settling: a batch cut by Ctrl-C is no failed evaluation
                outstanding -= 1
                open_trials.difference_update(_trial_ids(outcome.job))  # before settle, which may drop a duplicate
                settled, follow_up = settle(ctx, outcome)
                if follow_up is not None:
                    jobs.appendleft(follow_up)  # first in line: its trials are the oldest open ones
                    outstanding += 1
                    open_trials.update(_trial_ids(follow_up))
                evaluated += settled
                progress.update(settled)
                progress.set_postfix(
                    best=f"{best_value(ctx):.4g}", eval_s=f"{evaluated / (time.time() - loop_started):.2f}"
                )
                heartbeat()
                if time.time() - last_written > 10:
                    write_best(ctx)
                    last_written = time.time()
                ask(jobs)
            write_best(ctx)
    finally:
        progress.close()  # ends the bar's line: a failure message then stands on a line of its own
        pool.close()
    ended = time.time()
    return {"evaluated": evaluated, "seconds": ended - started, "loop_seconds": ended - loop_started,
            "completed": completed(ctx), "out_of_time": out_of_time}


def stage_done(ctx: SearchContext) -> bool:
    """The stage's evaluations are spent (or, by generations, every slot is settled or given up). A stage
    with no count of evaluations ends by the clock alone, and is done whenever it stops."""
    budget = total_budget(ctx)
    if budget is None:
        return True
    return completed(ctx) >= budget or (isinstance(ctx.slots, GenerationSlots) and ctx.slots.finished(ctx.study))


def run_stage(ctx: SearchContext, finish: Callable[[SearchContext], dict | None], stop_after: int | None = None,
              quiet: bool = False) -> dict:
    """The loop until the budget is spent, then the stage's ending (`finish`: best factors, plots, report).
    Stopped sooner, by `stop_after` or by the clock (`minutes`, per call), it keeps its best factors so far
    and no report: `ropesearch resume` goes on where it stopped, and a stop by the clock is recorded in the
    study, for the last line and for `status`."""
    summary = search(ctx, stop_after=stop_after, quiet=quiet)
    if stage_done(ctx):
        if ctx.study.user_attrs.get(STOPPED):
            ctx.study.set_user_attr(STOPPED, None)
        summary["report"] = finish(ctx)
        return summary
    write_best(ctx)
    if summary["out_of_time"]:
        stop = {"by": "minutes", "minutes": ctx.minutes, "completed": completed(ctx), "budget": total_budget(ctx)}
        ctx.study.set_user_attr(STOPPED, stop)
        summary["stopped"] = stop
    return summary


def stop_line(stop: dict, resume: str) -> str:
    """What a stop by the clock says: where it stopped, and the command that goes on."""
    return (f"stopped by its time budget ({stop['minutes']:g} minutes a call) after {stop['completed']} of "
            f"{stop['budget']} evaluations; `{resume}` goes on for as long again (raise the minutes in its "
            f"config.yaml for more)")


def stopped_note(ctx: SearchContext, resume: str) -> str | None:
    """The stop line when the last call of an unfinished stage was stopped by its clock."""
    stop = ctx.study.user_attrs.get(STOPPED)
    return None if not stop or stage_done(ctx) else stop_line(stop, resume)


def write_json(path: Path, data) -> None:
    """A results file, whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _trial_ids(job: Job[list[Asked]]) -> set[int]:
    return {keys.trial_id(a.trial) for a in job.tag if a.trial is not None}


def best_value(ctx: SearchContext) -> float:
    best = best_trial(ctx.study)
    return float("nan") if best is None else best.value  # nan: nothing complete yet


def _kept_best(path: Path) -> RopeCandidate | None:
    """The candidate already in best_factors.json, if it is readable and has a told value."""
    try:
        kept = load_factor_file(path)
    except (OSError, ValueError):
        return None
    value = objective_value(kept.params)
    return kept if isinstance(value, (int, float)) and not math.isnan(value) else None


def _guarded_rank(ctx: SearchContext, candidate: RopeCandidate) -> tuple[float, float]:
    """(constraint violation, told value): the order best_trial uses, for a saved candidate. Files written
    before the violation was stored give the long stage's guard violation from their short-window cost."""
    if VIOLATION in candidate.params:
        return candidate.params[VIOLATION], objective_value(candidate.params)
    cost, limit = candidate.params.get(SHORT_COST), ctx.guard.max_cost
    excess = max(0.0, cost - limit) if cost is not None and limit is not None else 0.0
    return excess, objective_value(candidate.params)


def write_best(ctx: SearchContext) -> RopeCandidate | None:
    """best_factors.json: replaced only by a better candidate (lower PPL), never by a worse one,
    even if the study it came from was lost and searched again. Returns the candidate it holds."""
    path = ctx.run_dir / ctx.best_file
    found = best_candidate(ctx)
    kept = _kept_best(path)
    if found is None:
        return kept
    candidate, _ = found
    if kept is not None and _guarded_rank(ctx, kept) <= _guarded_rank(ctx, candidate):
        return kept
    tmp = path.with_name(path.name + ".tmp")
    candidate.save(tmp)
    os.replace(tmp, path)
    return candidate
