"""The short-factor stage: LongRoPE's readjustment of the original window.

transformers and llama.cpp apply the exported attention factor at every length, so inputs inside the
original window pay for it (measured on SmolLM2: +3 to +7 % perplexity on general text). This stage
takes the long stage's winner as fixed (long factors and attention factor) and searches the short
factors, the ones engines use inside the window, for the lowest perplexity on general text at
lengths inside the window. It never changes what inputs beyond the window get.

Its own Optuna study (`<name>-short`) in the run's storage, scored by `TextWorker`s through the same
driver loop as the long stage, so it resumes, and is inspected, the same way. The text is the search
part of the general-text corpus; every report is on its evaluation part (fitness/general_text.py).
Seeds: short = long^p for each p in `seeds` (p = 0: ones, what the long stage alone exports), enqueued
as the first trials and scored once as the stage's baselines.

    best_short_factors.json  the long winner with its searched short factors: what export and training
                             take from the run folder
    short_report.json        general-text PPL inside the window (evaluation part): the model's own,
                             each seed, searched
    short_factors.png        long, seeds and searched short factors
    short_fitness.png        the told value (text PPL, or its worst ratio) over evaluations
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitness.config_checks import MAX_SEED
from fitness.errors import RopeSearchError
from fitness.evaluation import fixed_method, short_text_costs
from fitness.factors import RopeCandidate
from fitness.general_text import general_windows
from fitness.models import load_model, machine_name
from search import driver, report
from search.objective import LABELS, TEXT_PPL, TEXT_PPL_RATIO, objective_value
from search.slots import NoSlots
from search.space import ShortSpace, ShortSpaceSettings
from search.storage import open_storage
from search.workers import TextSetup

BEST_FILE = "best_short_factors.json"
LONG_ATTR = "ropesearch:long_candidate"  # the long candidate the study searches short factors for


WindowCount = Annotated[int, Field(gt=0, le=256)]


class ShortSearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lengths: list[int] | None = Field(default=None, min_length=1)  # None: a quarter of the window and the window
    # per length (one count for all, or one per length), from the search part of the text
    windows: WindowCount | list[WindowCount] = 4
    # ppl: the text PPL over all windows; worst_ratio: the largest ratio of a length's PPL to the model's
    # own there, so a long length cannot buy its gain with a short one's loss (engines' bars are per length)
    objective: Literal["ppl", "worst_ratio"] = "ppl"
    space: ShortSpaceSettings = Field(default_factory=ShortSpaceSettings)
    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    sigma: float = Field(default=0.1, gt=0)  # CMA-ES's first step, in factor units
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    seeds: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5], min_length=1)  # exponents p: long^p
    evaluations: int = Field(default=96, gt=0)
    minutes: float | None = Field(default=None, gt=0)
    report_windows: int = Field(default=8, gt=0, le=4096)  # per length, evaluation part, for short_report.json

    @field_validator("seeds")
    @classmethod
    def _exponents(cls, value):
        if any(not 0 <= p <= 1 for p in value):
            raise ValueError("exponents p of long^p must lie in [0, 1] (0: ones, 1: the long factors)")
        return value


def study_name(config) -> str:
    return f"{config.name}-short"


def seed_name(exponent: float) -> str:
    return "ones" if exponent == 0 else f"long^{exponent:g}"


def lengths(config, original_window: int) -> list[int]:
    return config.short_search.lengths or [original_window // 4, original_window]


def window_counts(config, original_window: int) -> tuple[int, ...]:
    windows = config.short_search.windows
    return tuple(windows) if isinstance(windows, list) else (windows,) * len(lengths(config, original_window))


def check_lengths(config, original_window: int, source: str) -> None:
    """One window count per length (or one for all); every length inside the window, since short
    factors only ever apply there: a longer length would score the long ones."""
    windows = config.short_search.windows
    if isinstance(windows, list) and len(windows) != len(lengths(config, original_window)):
        raise RopeSearchError(f"{source}: short_search.windows: {len(windows)} counts for "
                              f"{len(lengths(config, original_window))} lengths; give one per length or one for all")  # fmt: skip
    for length in lengths(config, original_window):
        if not 8 < length <= original_window:
            raise RopeSearchError(f"{source}: short_search.lengths: {length} must lie in (8, {original_window}], "
                                  "inside the model's window where short factors apply")  # fmt: skip


def make_sampler(settings: ShortSearchSettings, space: ShortSpace) -> optuna.samplers.BaseSampler:
    if settings.sampler == "cmaes":  # from the middle seed; the seeds themselves are the first trials
        middle = sorted(settings.seeds)[len(settings.seeds) // 2]
        with warnings.catch_warnings():
            # Optuna 4.9 deprecates x0/sigma0 (removal planned for 6.0) and offers nothing else that
            # starts CMA-ES near a known point; the space's centre (factors ~ s/2) is far from it
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(x0=space.encode(space.seed(middle)), sigma0=settings.sigma,
                                                seed=settings.seed, warn_independent_sampling=False)  # fmt: skip
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=settings.seed)


def long_candidate(run_dir: Path) -> RopeCandidate:
    """The long stage's winner, its provenance kept under "long_stage"."""
    long = RopeCandidate.load(Path(run_dir) / "best_factors.json")
    return long.model_copy(update={"short_factors": None, "params": {"long_stage": long.params}})


def open_context(run_dir: Path, config, storage=None, read_only: bool = False) -> driver.SearchContext | None:
    """The short stage of a run whose long stage is done; None (read_only) if it has not begun."""
    settings = config.short_search
    long = long_candidate(run_dir)
    space = ShortSpace(long, settings.space)
    sampler = make_sampler(settings, space)
    storage = storage or open_storage(config.storage, run_dir, read_only=read_only)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, seeds = study_name(config), {seed_name(p): space.seed(p) for p in settings.seeds}
    if read_only:
        try:
            study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        except KeyError:
            return None
    else:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                    load_if_exists=True)  # fmt: skip
        _same_long(study, long, run_dir, space, seeds)
    window = long.geometry.original_window
    worst_ratio = settings.objective == "worst_ratio"
    setup = TextSetup(config.model, tuple(lengths(config, window)), window_counts(config, window), worst_ratio)
    return driver.SearchContext(run_dir, config, long.geometry, long.target_window, space, sampler, NoSlots(),
                                study, setup, seeds, settings.evaluations, settings.minutes,
                                best_file=BEST_FILE, objective=TEXT_PPL_RATIO if worst_ratio else TEXT_PPL)  # fmt: skip


def _same_long(study: optuna.Study, long: RopeCandidate, run_dir: Path, space: ShortSpace, seeds: dict) -> None:
    """A new study records its long candidate and starts from the seeds; an old one must be for the
    same long candidate, or its short factors would belong to other long factors."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    mine = {"long_factors": list(long.long_factors), "attention_factor": long.attention_factor}
    if LONG_ATTR not in attrs:
        study._storage.set_study_system_attr(study._study_id, LONG_ATTR, mine)
        for candidate in seeds.values():
            study.enqueue_trial(space.encode(candidate), skip_if_exists=True)
    elif attrs[LONG_ATTR] != mine:
        raise RopeSearchError(f"{run_dir}: the short stage's study was begun for other long factors than "
                              f"{run_dir / 'best_factors.json'} holds now; start a new run")  # fmt: skip


def finish(ctx: driver.SearchContext) -> dict | None:
    """best_short_factors.json, plots, and the report on text the stage never read."""
    candidate = driver.write_best(ctx)
    if candidate is None:
        return None
    baselines = ctx.study.user_attrs.get("baselines", {})
    report.plot_short_factors(candidate, ctx.seeds, ctx.run_dir / "short_factors.png")
    report.plot_fitness(ctx.study, baselines, ctx.run_dir / "short_fitness.png", what=LABELS[ctx.objective])
    settings = ctx.config.short_search
    model, tokenizer = load_model(ctx.config.model)
    windows = {n: general_windows(tokenizer, n, settings.report_windows) for n in ctx.setup.lengths}
    methods = {name: fixed_method(c) for name, c in ctx.seeds.items()}
    methods["searched"] = fixed_method(candidate)
    costs = short_text_costs(model, methods, ctx.target, windows, ctx.config.workers.candidates_per_forward)
    result = {
        "machine": machine_name(next(model.parameters()).device),
        "original_window": ctx.geometry.original_window,
        "attention_factor": candidate.attention_factor,
        "text": "general text, evaluation part (never read by the search)",
        "windows": settings.report_windows,
        "methods": costs,
        "search_text": {"windows": settings.windows, "objective": ctx.objective, "seeds": baselines,
                        "searched": objective_value(candidate.params)},  # fmt: skip
    }
    (ctx.run_dir / "short_report.json").write_text(json.dumps(result, indent=2))
    return result


def run(run_dir: Path, config, stop_after: int | None = None, quiet: bool = False) -> dict:
    ctx = open_context(run_dir, config)
    summary = driver.search(ctx, stop_after=stop_after, quiet=quiet)
    if stop_after is None or driver.completed(ctx) >= (driver.total_budget(ctx) or 0):
        summary["report"] = finish(ctx)
    else:
        driver.write_best(ctx)
    return summary
