"""The long stage: LongRoPE2's search of the long factors (and attention factor) for the target window.

Set-up (`open_context`): the model's geometry, the LongRoPE2 space, the evolution (or one of Optuna's
samplers), the run's study, needle documents for the workers, the baselines as seeds. End (`finish`):
best_factors.json, plots, and the held-out report (`holdout_report`: other seed, depths and haystack,
by default also other needle formats), written last, so its presence says the stage is done. The loop
between them is the driver's (search/driver.py), shared with the short stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from fitness.baselines import baseline
from fitness.evaluation import baseline_method, evaluate_methods, fixed_method
from fitness.factor_files import candidate_from
from fitness.geometry import geometry_from_config
from fitness.models import load_config, load_model, machine_name
from search import driver, report
from search.evolution import EvolutionarySampler
from search.objective import NEEDLE_PPL
from search.pruning import make_pruner, saved_scorings
from search.slots import NoSlots
from search.space import RopeSpace
from search.storage import open_storage
from search.trial_keys import BASELINES
from search.workers import WorkerSetup

REPORT = "report.json"  # written last: the stage is done once it exists


def _sampler(config, space: RopeSpace):
    """The study's sampler and the slot book the driver asks (the evolution fills slots; the others don't)."""
    settings = config.sampler
    if settings.name == "evolution":
        earlier = tuple(candidate_from(source) for source in settings.evolution.seed_factors)
        limit = config.short_guard.max_cost if config.short_guard.bound_attention else None
        sampler = EvolutionarySampler(space, settings.evolution, seed=settings.seed, earlier_winners=earlier,
                                      attention_limit=limit)
        return sampler, sampler.slots
    if settings.name == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True), NoSlots()
    if settings.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=settings.seed), NoSlots()
    return optuna.samplers.RandomSampler(seed=settings.seed), NoSlots()


def open_context(run_dir: Path, config, storage=None, read_only: bool = False) -> driver.SearchContext:
    """The long stage of a run whose study exists (`runs.create` makes it with the folder)."""
    geometry = geometry_from_config(load_config(config.model.name))
    target = config.target(geometry.original_window)
    space = RopeSpace(geometry, target, config.space)
    sampler, slots = _sampler(config, space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        storage=storage or open_storage(config.storage, run_dir, read_only=read_only),
        study_name=config.name,
        sampler=sampler,
        pruner=make_pruner(config.pruning),
    )
    setup = WorkerSetup(config.model, config.needles, target, config.workers.documents_per_forward,
                        config.short_guard)
    seeds = {name: baseline(name, geometry, target) for name in config.baselines}
    first_stage = None if config.pruning.name == "none" else list(range(config.pruning.documents))
    return driver.SearchContext(run_dir, config, geometry, target, space, sampler, slots, study, setup, seeds,
                                config.budget.evaluations, config.budget.minutes, first_stage, config.short_guard,
                                objective=NEEDLE_PPL)


def done(run_dir: Path, config) -> bool:
    """Given factors, or a finished long stage (its report is written last): the short stage may begin."""
    return config.long_factors is not None or (Path(run_dir) / REPORT).exists()


def holdout_report(ctx: driver.SearchContext, candidate) -> dict:
    """Baselines and the searched candidate on the held-out needle set, in this process."""
    config = ctx.config
    model, tokenizer = load_model(config.model)
    methods = {name: baseline_method(name, ctx.geometry) for name in config.baselines}
    methods["searched"] = fixed_method(candidate)
    k = config.workers.candidates_per_forward
    dpf = config.workers.documents_per_forward
    scored = evaluate_methods(model, tokenizer, config.holdout, [ctx.target], methods, dpf, k, show_progress=False)
    own = evaluate_methods(model, tokenizer, config.holdout, [ctx.geometry.original_window],
                           {"none": baseline_method("none", ctx.geometry)}, dpf, k, show_progress=False)
    return {
        "machine": machine_name(next(model.parameters()).device),
        "length": ctx.target,
        "original_window": ctx.geometry.original_window,
        "documents": config.holdout.documents,
        "haystack": config.holdout.haystack,
        "seed": config.holdout.seed,
        "methods": {name: rows[ctx.target] for name, rows in scored.items()},
        "in_window": own["none"][ctx.geometry.original_window]["needle_ppl"],
    }


def pruning_summary(ctx: driver.SearchContext) -> dict | None:
    """Under pruning: the candidate x document scorings it saved; None without pruning."""
    config = ctx.config
    return None if config.pruning.name == "none" else saved_scorings(ctx.study, config.pruning, config.needles.documents)


def finish(ctx: driver.SearchContext) -> dict | None:
    """best_factors.json, baselines.json, plots, and the held-out report; returns the report."""
    candidate = driver.write_best(ctx)
    baselines = ctx.study.user_attrs.get(BASELINES, {})
    driver.write_json(ctx.run_dir / "baselines.json", baselines)
    if candidate is None:
        return None
    report.plot_factors(candidate, ctx.geometry, ctx.target, ctx.run_dir / "factors.png")
    report.plot_fitness(ctx.study, baselines, ctx.run_dir / "fitness.png")
    result = holdout_report(ctx, candidate)
    result["summary"] = report.gap_closed(result)
    if (pruning := pruning_summary(ctx)) is not None:
        result["pruning"] = pruning
    driver.write_json(ctx.run_dir / REPORT, result)
    return result


def status(ctx: driver.SearchContext) -> str:
    """Progress against the baselines, pruning, and the held-out report once written."""
    study = ctx.study
    text = report.format_status(study, study.user_attrs.get(BASELINES, {}), driver.total_budget(ctx),
                                ctx.slots.state(study))
    if (pruning := pruning_summary(ctx)) is not None:
        text += "\n" + report.format_pruning(pruning)
    if (ctx.run_dir / REPORT).exists():
        text += "\n" + report.format_report(json.loads((ctx.run_dir / REPORT).read_text()))
    return text
