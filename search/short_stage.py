"""The short-factor stage: LongRoPE's readjustment of the original window.

transformers and llama.cpp apply the exported attention factor at every length, so inputs inside the
original window pay for it (measured on SmolLM2: +3 to +7 % perplexity on general text). This stage
takes the long stage's winner as fixed (long factors and attention factor) and searches the short
factors, the ones engines use inside the window, for the lowest perplexity on text at lengths inside
the window (`text`: general English, or the text the model was trained on). It never changes what
inputs beyond the window get.

What short inputs are for is more than text: in-window needle documents (the search's own formats and
haystack, another seed) are a constraint (search.guard.WindowNeedleSettings). No candidate whose needle
PPL rises, or whose retrieval falls, against ones (what the long stage alone exports) beyond the stated
tolerances can win, whatever it does for text.

Its own Optuna study (`<name>-short`) in the run's storage, scored by `TextWorker`s through the same
driver loop as the long stage, so it resumes, and is inspected, the same way. CMA-ES runs by
generations (search/cma.py): generation 0 is the seeds short = long^p (p = 0: ones), each later one a
population whose proposals are a pure function of the seed and the earlier generations, so a resumed or
re-distributed stage reproduces its history. The text is the search part of the corpus; every report is
on its evaluation part (fitness/general_text.py), and its needles are the run's held-out set.

    best_short_factors.json  the long winner with its searched short factors: what export and training
                             take from the run folder
    short_report.json        inside the window, evaluation part: text PPL (the stage's text, and general
                             English) and held-out needle PPL / retrieval for the model's own RoPE, ones,
                             each seed and searched
    short_factors.png        long, seeds and searched short factors
    short_fitness.png        the told value (text PPL, or its worst ratio) over evaluations
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitness.baselines import no_scaling
from fitness.config_checks import MAX_SEED, naming
from fitness.errors import RopeSearchError
from fitness.evaluation import evaluate_methods, fixed_method, short_text_costs
from fitness.factor_files import load_factor_file
from fitness.factors import RopeCandidate
from fitness.general_text import GENERAL_ENGLISH, default_short_lengths, text_windows
from fitness.models import load_model, load_tokenizer, machine_name
from fitness.needles import BUILTIN_HAYSTACKS, NeedleSettings, build_needle_set
from search import driver, report
from search import trial_keys as keys
from search.cma import GenerationalCmaEs, default_population, generations_for
from search.guard import WindowNeedleSettings
from search.objective import LABELS, TEXT_PPL, TEXT_PPL_RATIO, objective_value
from search.slots import NoSlots
from search.space import ShortSpace, ShortSpaceSettings
from search.storage import open_storage
from search.trial_keys import BASELINES
from search.trial_keys import LONG_CANDIDATE as LONG_ATTR
from search.workers import TextSetup

BEST_FILE = "best_short_factors.json"
REPORT = "short_report.json"
ONES = "ones"  # the reference: short factors of 1 (what the long stage alone exports)
OWN = "none (the model's own)"  # no scaling at all: the model as it was trained


WindowCount = Annotated[int, Field(gt=0, le=256)]


class ShortSearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lengths: list[int] | None = Field(default=None, min_length=1, max_length=16)  # None: window/4 and window
    # per length (one count for all, or one per length), from the search part of the text
    windows: WindowCount | list[WindowCount] = 4
    # ppl: the text PPL over all windows; worst_ratio: the largest ratio of a length's PPL to the model's
    # own there, so a long length cannot buy its gain with a short one's loss (engines' bars are per length)
    objective: Literal["ppl", "worst_ratio"] = "ppl"
    # the text searched on: `kjv` (general English, which nothing trains on) and/or haystack sources; a
    # model scores text it cannot model as noise, so give the text it knows (the bundled model: pydoc)
    text: list[str] = Field(default_factory=lambda: [GENERAL_ENGLISH], min_length=1, max_length=8)
    # in-window needles as a constraint (search.guard.WindowNeedleSettings); null: text alone decides
    needles: WindowNeedleSettings | None = Field(default_factory=WindowNeedleSettings)
    space: ShortSpaceSettings = Field(default_factory=ShortSpaceSettings)
    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    sigma: float = Field(default=0.1, gt=0, le=100)  # CMA-ES's first step, in factor units
    population: int | None = Field(default=None, gt=1, le=1024)  # CMA-ES's; None: 4 + 3 ln(pairs)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    seeds: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5], min_length=1, max_length=64)  # p: long^p
    evaluations: int = Field(default=96, gt=0, le=1_000_000)
    minutes: float | None = Field(default=None, gt=0, le=60 * 24 * 366)
    report_windows: int = Field(default=8, gt=0, le=4096)  # per length, evaluation part, for short_report.json
    report_documents: int = Field(default=16, gt=0, le=1024)  # held-out needles per length, for short_report.json

    @field_validator("seeds")
    @classmethod
    def _exponents(cls, value):
        if any(not 0 <= p <= 1 for p in value):
            raise ValueError("exponents p of long^p must lie in [0, 1] (0: ones, 1: the long factors)")
        if len(set(value)) != len(value):
            raise ValueError("each exponent once")
        return value

    @field_validator("text")
    @classmethod
    def _known_text(cls, value):
        unknown = [name for name in value if name != GENERAL_ENGLISH and name not in BUILTIN_HAYSTACKS
                   and not Path(name).is_file()]
        if unknown:
            raise ValueError(f"unknown text sources {unknown}: give {GENERAL_ENGLISH}, {', '.join(BUILTIN_HAYSTACKS)} "
                             "or a text file")
        return value


def study_name(config) -> str:
    return f"{config.name}-short"


def seed_name(exponent: float) -> str:
    return ONES if exponent == 0 else f"long^{exponent:g}"


def lengths(config, original_window: int) -> list[int]:
    return config.short_search.lengths or default_short_lengths(original_window)


def needle_lengths(config, original_window: int) -> list[int]:
    """The in-window needle lengths: as given, else half the window and the window (a needle document needs
    room for its haystack: a quarter of a small window may hold little more than the question)."""
    needles = config.short_search.needles
    return (needles.lengths if needles is not None and needles.lengths else None) or [original_window // 2,
                                                                                        original_window]


def window_counts(config, original_window: int) -> tuple[int, ...]:
    windows = config.short_search.windows
    return tuple(windows) if isinstance(windows, list) else (windows,) * len(lengths(config, original_window))


def guard_needles(config) -> NeedleSettings:
    """The guard's documents: the long stage's own formats, wordings and haystack, the guard's seed and count."""
    settings = config.short_search.needles
    return config.needles.model_copy(update={"documents": settings.documents, "seed": settings.seed})


def report_needles(config) -> NeedleSettings:
    """The report's documents: the run's held-out needle set (other formats, haystack and seed)."""
    return config.holdout.model_copy(update={"documents": config.short_search.report_documents})


def check(config, original_window: int, source: str, long: RopeCandidate | None = None) -> None:
    """What can be checked before a run folder exists: one window count per length (or one for all); every
    length inside the window, since short factors only ever apply there; needle documents that fit those
    lengths; seeds inside the space (all of them when the long factors are given, else ones)."""
    settings = config.short_search
    windows = settings.windows
    if isinstance(windows, list) and len(windows) != len(lengths(config, original_window)):
        raise RopeSearchError(f"{source}: short_search.windows: {len(windows)} counts for "
                              f"{len(lengths(config, original_window))} lengths; give one per length or one for all")
    for key, values in (("lengths", lengths(config, original_window)),
                        ("needles.lengths", needle_lengths(config, original_window))):
        for length in values:
            if not 8 < length <= original_window:
                raise RopeSearchError(f"{source}: short_search.{key}: {length} must lie in (8, {original_window}], "
                                      "inside the model's window where short factors apply")
    if settings.needles is not None:
        tokenizer = load_tokenizer(config.model.name)
        for key, needles in (("needles", guard_needles(config)), ("report_documents", report_needles(config))):
            with naming(source, f"short_search.{key} (documents of {min(needle_lengths(config, original_window))} tokens)"):
                build_needle_set(tokenizer, needles.model_copy(update={"documents": 1}),
                                 min(needle_lengths(config, original_window)), cache=False)
    space = settings.space
    if 0 in settings.seeds and space.low > 1:
        raise RopeSearchError(f"{source}: short_search.seeds: p = 0 (ones) lies below short_search.space.low "
                              f"{space.low:g}; leave 0 out or lower `low` to 1")
    if long is not None:
        outside = [name.split(' ')[0] for name, (_, clamped) in seed_candidates(long, settings).items() if clamped]
        if outside:
            bounds = ShortSpace(long, space)
            raise RopeSearchError(f"{source}: short_search.seeds: {', '.join(outside)} of the given long factors: "
                                  f"outside short_search.space [{bounds.low:g}, {bounds.high:g}]; leave "
                                  f"{'it' if len(outside) == 1 else 'them'} out or widen the space")


def seed_candidates(long: RopeCandidate, settings: ShortSearchSettings) -> dict[str, tuple[RopeCandidate, bool]]:
    """{name: (long^p as the space holds it, whether the space had to clamp it)}. A clamped seed is named
    for what it is, so no row called "ones" ever holds anything but ones."""
    space = ShortSpace(long, settings.space)
    seeds = {}
    for p in settings.seeds:
        candidate = space.seed(p)
        exact = [f**p for f in long.long_factors]
        clamped = any(abs(a - b) > 1e-9 * max(1.0, b) for a, b in zip(sorted(exact), candidate.factors(long=False)))
        name = seed_name(p) + (f" (clamped to [{space.low:g}, {space.high:g}])" if clamped else "")
        seeds[name] = (candidate, clamped)
    return seeds


def make_sampler(settings: ShortSearchSettings, space: ShortSpace, seeds: dict[str, RopeCandidate]):
    """The stage's sampler and the slot book the driver asks (CMA-ES by generations fills slots)."""
    if settings.sampler == "cmaes":
        population = settings.population or default_population(space.pairs)
        generations = generations_for(settings.evaluations, len(seeds), population)
        sampler = GenerationalCmaEs(space, [space.encode(c) for c in seeds.values()], settings.sigma, population,
                                    generations, seed=settings.seed)
        return sampler, sampler.slots
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True), NoSlots()
    return optuna.samplers.RandomSampler(seed=settings.seed), NoSlots()


def long_candidate(run_dir: Path) -> RopeCandidate:
    """The long stage's winner, its provenance kept under "long_stage"."""
    long = load_factor_file(Path(run_dir) / "best_factors.json")
    return long.model_copy(update={"short_factors": None, "params": {"long_stage": long.params}})


def open_context(run_dir: Path, config, storage=None, read_only: bool = False) -> driver.SearchContext | None:
    """The short stage of a run whose long stage is done; None (read_only) if it has not begun."""
    settings = config.short_search
    long = long_candidate(run_dir)
    space = ShortSpace(long, settings.space)
    seeds = {name: candidate for name, (candidate, _) in seed_candidates(long, settings).items()}
    sampler, slots = make_sampler(settings, space, seeds)
    storage = storage or open_storage(config.storage, run_dir, read_only=read_only)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(config)
    if read_only:
        try:
            study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        except KeyError:
            return None
    else:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                    load_if_exists=True)
        _same_long(study, long, run_dir, space, seeds, enqueue=isinstance(slots, NoSlots))
    window = long.geometry.original_window
    worst_ratio = settings.objective == "worst_ratio"
    guarded = settings.needles is not None
    setup = TextSetup(config.model, tuple(lengths(config, window)), window_counts(config, window), worst_ratio,
                      tuple(settings.text), guard_needles(config) if guarded else None,
                      tuple(needle_lengths(config, window)) if guarded else (), long, settings.needles)
    return driver.SearchContext(run_dir, config, long.geometry, long.target_window, space, sampler, slots,
                                study, setup, seeds, settings.evaluations, settings.minutes,
                                best_file=BEST_FILE, objective=TEXT_PPL_RATIO if worst_ratio else TEXT_PPL)


def _same_long(study: optuna.Study, long: RopeCandidate, run_dir: Path, space: ShortSpace, seeds: dict,
               enqueue: bool) -> None:
    """A new study records its long candidate (and, for Optuna's own samplers, enqueues the seeds as its
    first trials; CMA-ES holds them as its generation 0); an old one must be for the same long candidate,
    or its short factors would belong to other long factors."""
    attrs = keys.study_system_attrs(study)
    if keys.CONFIG in attrs:  # another run's long stage, named like this run's short stage, in the same storage
        raise RopeSearchError(f"{run_dir}: its storage holds a search named {study.study_name!r}, the name of this "
                              "run's short stage; rename one of the two searches")
    mine = {"long_factors": list(long.long_factors), "attention_factor": long.attention_factor}
    if LONG_ATTR not in attrs:
        keys.set_study_system_attr(study, LONG_ATTR, mine)
        if enqueue:
            for candidate in seeds.values():
                study.enqueue_trial(space.encode(candidate), skip_if_exists=True)
    elif attrs[LONG_ATTR] != mine:
        raise RopeSearchError(f"{run_dir}: the short stage's study was begun for other long factors than "
                              f"{run_dir / 'best_factors.json'} holds now; start a new run")


def finish(ctx: driver.SearchContext) -> dict | None:
    """best_short_factors.json, plots, and the report on text and needles the stage never read."""
    candidate = driver.write_best(ctx)
    if candidate is None:
        return None
    baselines = ctx.study.user_attrs.get(BASELINES, {})
    report.plot_short_factors(candidate, ctx.seeds, ctx.run_dir / "short_factors.png")
    report.plot_fitness(ctx.study, baselines, ctx.run_dir / "short_fitness.png", what=LABELS[ctx.objective])
    config, settings = ctx.config, ctx.config.short_search
    model, tokenizer = load_model(config.model)
    k = config.workers.candidates_per_forward
    methods = {ONES: fixed_method(ctx.setup.reference or long_candidate(ctx.run_dir))}
    methods.update({name: fixed_method(c) for name, c in ctx.seeds.items() if name != ONES})
    methods["searched"] = fixed_method(candidate)
    texts = {"text": list(settings.text)}
    if settings.text != [GENERAL_ENGLISH]:
        texts["general_english"] = [GENERAL_ENGLISH]
    result = {
        "machine": machine_name(next(model.parameters()).device),
        "original_window": ctx.geometry.original_window,
        "attention_factor": candidate.attention_factor,
        "text_sources": settings.text,
        "text": "evaluation part of the text (never read by the search)",
        "windows": settings.report_windows,
    }
    for key, sources in texts.items():
        windows = {n: text_windows(tokenizer, sources, n, settings.report_windows) for n in ctx.setup.lengths}
        result["methods" if key == "text" else key] = short_text_costs(model, methods, ctx.target, windows, k)
    needles = report_needles(config)
    own = {OWN: fixed_method(no_scaling(ctx.geometry, ctx.geometry.original_window)), **methods}
    scored = evaluate_methods(model, tokenizer, needles, needle_lengths(config, ctx.geometry.original_window), own,
                              config.workers.documents_per_forward, k, show_progress=False)
    result["window_needles"] = {"formats": needles.formats, "haystack": needles.haystack, "seed": needles.seed,
                                "documents": needles.documents, "methods": scored}
    result["search_text"] = {"windows": settings.windows, "objective": ctx.objective, "seeds": baselines,
                             "searched": objective_value(candidate.params)}
    driver.write_json(ctx.run_dir / REPORT, result)
    return result


def status(ctx: driver.SearchContext) -> str:
    """Progress against the seeds, and the report once written."""
    baselines = ctx.study.user_attrs.get(BASELINES, {})
    text = report.format_status(ctx.study, baselines, driver.total_budget(ctx), ctx.slots.state(ctx.study),
                                what=LABELS[ctx.objective])
    if (ctx.run_dir / REPORT).exists():
        text += "\n" + report.format_short_report(json.loads((ctx.run_dir / REPORT).read_text()))
    return text
