"""Run and resume a search: a study in Optuna storage, generations of ask -> score -> tell.

Everything a run knows is in its study: each evaluation is committed (tell) before it counts, so a
driver killed at any point resumes from storage alone. Trials left RUNNING by a dead driver are
marked failed as "interrupted" and their slots are asked again.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from fitness.factors import RopeCandidate, baseline
from fitness.geometry import RopeGeometry, geometry_from_config
from fitness.models import load_config
from search.config import SearchConfig
from search.evolution import DUPLICATE, ERROR, INTERRUPTED, NO_SLOT, SLOT, EvolutionarySampler
from search.space import RopeSpace
from search.storage import open_storage
from search.workers import Job, make_pool

DRIVER = "ropesearch:driver"
HEARTBEAT_GRACE_S = 120.0


@dataclass
class SearchContext:
    """What a driver derives from a run's config: geometry, target, space, sampler, study."""

    run_dir: Path
    config: SearchConfig
    geometry: RopeGeometry
    target: int
    space: RopeSpace
    sampler: optuna.samplers.BaseSampler
    study: optuna.Study
    driver_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}")
    last_heartbeat: float = 0.0

    @property
    def evolutionary(self) -> bool:
        return isinstance(self.sampler, EvolutionarySampler)

    def candidate(self, params: dict) -> RopeCandidate:
        return self.space.decode(params)


def make_sampler(config: SearchConfig, space: RopeSpace) -> optuna.samplers.BaseSampler:
    settings = config.sampler
    if settings.name == "evolution":
        return EvolutionarySampler(space, settings.evolution, seed=settings.seed)
    if settings.name == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    if settings.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=settings.seed)
    return optuna.samplers.RandomSampler(seed=settings.seed)


def open_context(run_dir: Path, config: SearchConfig) -> SearchContext:
    geometry = geometry_from_config(load_config(config.model.name))
    target = config.target(geometry.original_window)
    space = RopeSpace(geometry, target, config.space)
    sampler = make_sampler(config, space)
    storage = open_storage(config.storage, run_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=config.name, direction="minimize", sampler=sampler, load_if_exists=True
    )
    return SearchContext(run_dir, config, geometry, target, space, sampler, study)


# ---------------------------------------------------------------- drivers alive and dead
def _alive(driver: str, heartbeats: dict) -> bool:
    host, pid, _ = driver.split(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
    return time.time() - heartbeats.get(driver, 0.0) < HEARTBEAT_GRACE_S


def heartbeat(ctx: SearchContext, every_s: float = 10.0) -> None:
    """Tell other drivers this one is alive (a storage write, so at most every `every_s` seconds)."""
    now = time.time()
    if now - ctx.last_heartbeat >= every_s:
        ctx.study._storage.set_study_system_attr(ctx.study._study_id, f"ropesearch:heartbeat:{ctx.driver_id}", now)
        ctx.last_heartbeat = now


def fail_interrupted(ctx: SearchContext) -> int:
    """Mark RUNNING trials whose driver is dead as failed ("interrupted"); their slots open again."""
    attrs = ctx.study._storage.get_study_system_attrs(ctx.study._study_id)
    heartbeats = {k.split("heartbeat:", 1)[1]: v for k, v in attrs.items() if k.startswith("ropesearch:heartbeat:")}
    count = 0
    for trial in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        driver = trial.system_attrs.get(DRIVER, "?:0:0")
        if driver != ctx.driver_id and not _alive(driver, heartbeats):
            ctx.study._storage.set_trial_system_attr(trial._trial_id, ERROR, INTERRUPTED)
            ctx.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            count += 1
    return count


# ---------------------------------------------------------------- one round of asks
@dataclass
class Asked:
    trial: optuna.Trial | None  # None: a slot already finished, scored again only to keep the batch identical
    candidate: RopeCandidate


def _ask(ctx: SearchContext) -> optuna.Trial:
    trial = ctx.study.ask(ctx.space.distributions())
    ctx.study._storage.set_trial_system_attr(trial._trial_id, DRIVER, ctx.driver_id)
    return trial


def next_jobs(ctx: SearchContext, limit: int | None) -> list[Job] | None:
    """Ask the next round of trials and group them into jobs of `candidates_per_forward`.

    Evolution: the open slots of the current generation, in fixed groups of slots (a group is always
    scored together, so its numbers never depend on which slots a crash left open). None: nothing can
    be asked now (the search is finished, or another driver is finishing the generation)."""
    k = ctx.config.workers.candidates_per_forward
    if not ctx.evolutionary:
        count = min(ctx.config.sampler.batch, limit) if limit is not None else ctx.config.sampler.batch
        asked = [Asked(t, ctx.candidate(t.params)) for t in (_ask(ctx) for _ in range(count))]
        return [Job(asked[i : i + k], [a.candidate for a in asked[i : i + k]]) for i in range(0, len(asked), k)]
    sampler: EvolutionarySampler = ctx.sampler
    state = sampler.state(ctx.study)
    if not state.open_slots:
        return None
    open_slots = state.open_slots if limit is None else state.open_slots[:limit]
    by_slot = {}
    for _ in open_slots:
        trial = _ask(ctx)
        slot = ctx.study._storage.get_trial_system_attrs(trial._trial_id)[SLOT]
        if slot == NO_SLOT:
            ctx.study._storage.set_trial_system_attr(trial._trial_id, ERROR, f"{DUPLICATE}: no open slot left")
            ctx.study.tell(trial, state=TrialState.FAIL)
            break
        by_slot[slot] = trial
    drop_duplicates(ctx, state.generation, by_slot)
    if not by_slot:
        return []
    proposals = sampler.proposals(ctx.study, state.generation)
    groups = sorted({slot // k for slot in by_slot})
    jobs = []
    for group in groups:
        slots = range(group * k, min((group + 1) * k, len(proposals)))
        asked = [Asked(by_slot.get(s), ctx.candidate(proposals[s])) for s in slots]
        jobs.append(Job(asked, [a.candidate for a in asked]))
    return jobs


def drop_duplicates(ctx: SearchContext, generation: int, by_slot: dict) -> None:
    """Two drivers may take the same slot at the same moment; the lower trial number keeps it."""
    for trial in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        slot = EvolutionarySampler.slot_of(trial)
        if slot and slot[0] == generation and slot[1] in by_slot and trial.number < by_slot[slot[1]].number:
            mine = by_slot.pop(slot[1])
            ctx.study._storage.set_trial_system_attr(mine._trial_id, ERROR, f"{DUPLICATE} of trial {trial.number}")
            ctx.study.tell(mine, state=TrialState.FAIL)


def record(ctx: SearchContext, asked: Asked, score: dict | None, error: str | None) -> bool:
    """Commit one evaluation to storage. True if it counts as a completed evaluation."""
    if asked.trial is None:
        return False
    storage, trial_id = ctx.study._storage, asked.trial._trial_id
    if error is None and not (score["fitness"] == score["fitness"]):  # NaN fitness is a failed evaluation
        error = "fitness is NaN"
    if error is not None:
        storage.set_trial_system_attr(trial_id, ERROR, error[:500])
        ctx.study.tell(asked.trial, state=TrialState.FAIL)
        return False
    for key in ("retrieval", "seconds"):
        storage.set_trial_user_attr(trial_id, key, score[key])
    storage.set_trial_user_attr(trial_id, "document_nll", score["document_nll"])
    ctx.study.tell(asked.trial, score["fitness"])
    return True


# ---------------------------------------------------------------- the whole run
def completed(ctx: SearchContext) -> int:
    return len(ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def total_budget(ctx: SearchContext) -> int | None:
    budgets = [ctx.config.budget.evaluations]
    if ctx.evolutionary:
        budgets.append(ctx.sampler.total_evaluations)
    budgets = [b for b in budgets if b is not None]
    return min(budgets) if budgets else None


def best_candidate(ctx: SearchContext) -> tuple[RopeCandidate, optuna.trial.FrozenTrial] | None:
    try:
        best = ctx.study.best_trial
    except ValueError:
        return None
    candidate = ctx.candidate(best.params)
    provenance = {
        **candidate.params,
        "fitness": best.value,
        "retrieval": best.user_attrs.get("retrieval"),
        "trial": best.number,
        "study": ctx.config.name,
        "run": ctx.run_dir.name,
        "model": ctx.config.model.name,
    }
    return candidate.model_copy(update={"params": provenance}), best


def score_baselines(ctx: SearchContext, pool) -> dict:
    """Baselines on the search documents, once per study (kept in its user attributes)."""
    stored = ctx.study.user_attrs.get("baselines")
    if stored is not None and set(stored) >= set(ctx.config.baselines):
        return stored
    candidates = [baseline(name, ctx.geometry, ctx.target) for name in ctx.config.baselines]
    results = {}
    for outcome in pool.run([Job(name, [c]) for name, c in zip(ctx.config.baselines, candidates)]):
        if outcome.error is None:
            results[outcome.job.tag] = {k: outcome.scores[0][k] for k in ("fitness", "retrieval")}
    ctx.study.set_user_attr("baselines", results)
    return results


def search(ctx: SearchContext, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run until the budget is spent. `stop_after` evaluations end it early (tests, benchmarks)."""
    config = ctx.config
    fail_interrupted(ctx)
    heartbeat(ctx)
    model, needles = config.model.model_dump(), config.needles.model_dump()
    pool = make_pool(config.workers, model, needles, ctx.target)
    started, evaluated = time.time(), 0
    budget = total_budget(ctx)
    progress = tqdm(total=budget, initial=completed(ctx), desc="search", unit="eval", disable=quiet,
                    dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    try:
        score_baselines(ctx, pool)
        loop_started = time.time()
        while True:
            done = completed(ctx)
            if budget is not None and done >= budget:
                break
            if config.budget.minutes is not None and time.time() - started > config.budget.minutes * 60:
                break
            limit = None if budget is None else budget - done
            if stop_after is not None:
                if evaluated >= stop_after:
                    break
                limit = stop_after - evaluated if limit is None else min(limit, stop_after - evaluated)
            jobs = next_jobs(ctx, limit)
            if jobs is None:
                if ctx.sampler.state(ctx.study).finished:
                    break
                time.sleep(1.0)  # another driver is finishing this generation
                heartbeat(ctx)
                continue
            for outcome in pool.run(jobs):
                for i, asked in enumerate(outcome.job.tag):
                    score = outcome.scores[i] if outcome.scores else None
                    if record(ctx, asked, score, outcome.error):
                        evaluated += 1
                        progress.update(1)
                heartbeat(ctx)
                best = ctx.study.best_value if completed(ctx) else float("nan")
                progress.set_postfix(best=f"{best:.4g}", eval_s=f"{evaluated / (time.time() - loop_started):.2f}")
            write_best(ctx)
    finally:
        progress.close()  # ends the bar's line: a failure message then stands on a line of its own
        pool.close()
    ended = time.time()
    return {"evaluated": evaluated, "seconds": ended - started, "loop_seconds": ended - loop_started,
            "completed": completed(ctx)}  # fmt: skip


def write_best(ctx: SearchContext) -> RopeCandidate | None:
    found = best_candidate(ctx)
    if found is None:
        return None
    candidate, _ = found
    tmp = ctx.run_dir / "best_factors.json.tmp"
    candidate.save(tmp)
    os.replace(tmp, ctx.run_dir / "best_factors.json")
    return candidate


def history(study: optuna.Study) -> list[dict]:
    """The finished evaluations in (generation, slot) order: what a resumed run must reproduce."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        slot = EvolutionarySampler.slot_of(trial)
        rows.append({"slot": list(slot) if slot else [trial.number], "params": trial.params, "value": trial.value})
    return sorted(rows, key=lambda row: row["slot"])
