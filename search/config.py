"""The search config: one YAML file, validated into these types before anything is written.

The checks shared by every command that reads a config (search, resume, eval, train, pretrain) live
here too: finite numbers, sizes a run can finish, and a model whose files are all there.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fitness.baselines import BASELINES, COMPARED
from fitness.config_checks import MAX_SCALE, MAX_SEED, MAX_TARGET_WINDOW, RunName
from fitness.factor_files import candidate_from
from fitness.models import ModelSettings, upgrade_model_section
from fitness.needles import NeedleSettings
from search.evolution import EvolutionSettings
from search.guard import ShortGuardSettings
from search.pruning import PruningSettings
from search.short_stage import ShortSearchSettings
from search.space import SpaceSettings
from search.workers import WorkerSettings

# Keys a resumed run may change: where and how fast it runs, never what it searches
RESUMABLE_CHANGES = ("workers.backend", "workers.count", "workers.address", "workers.cpus_per_worker",
                     "workers.gpus_per_worker", "workers.max_restarts", "workers.in_flight", "model.threads",
                     "budget.minutes", "short_search.minutes")


def changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs' data."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [k for key in keys for k in changed_keys(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def unresumable_changes(saved: dict, current: dict) -> list[str]:
    if isinstance(saved, dict) and "model" in saved:  # a study created before model.attention was renamed
        saved = {**saved, "model": upgrade_model_section(saved["model"])}
    return [key for key in changed_keys(_with_defaults(saved), current) if not key.startswith(RESUMABLE_CHANGES)]


def _with_defaults(saved: dict) -> dict:
    """A study's config as this version reads it: a key added since the study began (with the default that
    keeps the old behaviour) is not an edit. The 64k search begun before `short_guard.bound_attention`
    existed could not resume without this. Left as it is where this version cannot read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SearchConfig.model_validate(saved).model_dump(mode="json")
    except (ValidationError, ValueError, TypeError, OSError, RuntimeError):
        return saved


class SamplerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["evolution", "tpe", "cmaes", "random"] = "evolution"  # Optuna's: asked one job of trials at a time
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    evolution: EvolutionSettings = Field(default_factory=EvolutionSettings)


class BudgetSettings(BaseModel):
    """Stop at whichever comes first. Only an evaluation/generation budget gives a reproducible history."""

    model_config = ConfigDict(extra="forbid")

    evaluations: int | None = Field(default=None, gt=0, le=10_000_000)
    minutes: float | None = Field(default=None, gt=0, le=60 * 24 * 366)


def _holdout_default(data: dict) -> NeedleSettings:
    """Without a `holdout` section: needle formats and a built-in haystack the search documents never
    used (all the other formats, every wording), other seed and depths, so the report says whether the
    factors generalise beyond what they were searched on. A model that knows only some formats (the
    bundled one knows magic numbers) names its held-out set instead, as configs/default.yaml does.
    `data`: the fields validated so far (pydantic passes them; `needles` comes before `holdout`)."""
    from fitness.needles import BUILTIN_HAYSTACKS, NEEDLE_FORMATS

    searched = data.get("needles") or NeedleSettings()
    formats = [name for name in NEEDLE_FORMATS if name not in searched.formats] or list(searched.formats)
    unused = [name for name in BUILTIN_HAYSTACKS if name not in searched.haystack]  # the last: IDLE's text
    return NeedleSettings(haystack=unused[-1:] or ["docstrings"], formats=formats, wordings="all", seed=1000,
                          documents=32, depths=[0.05 + 0.1 * i for i in range(10)])


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: RunName = "search"
    model: ModelSettings = Field(default_factory=ModelSettings)
    scale: float | None = Field(default=None, gt=1, le=MAX_SCALE)
    target_window: int | None = Field(default=None, gt=0, le=MAX_TARGET_WINDOW)
    needles: NeedleSettings = Field(default_factory=NeedleSettings)
    holdout: NeedleSettings = Field(default_factory=_holdout_default)
    space: SpaceSettings = Field(default_factory=SpaceSettings)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    pruning: PruningSettings = Field(default_factory=PruningSettings)
    short_guard: ShortGuardSettings = Field(default_factory=ShortGuardSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    # an Optuna RDB URL or a journal file; None: SQLite in the run folder
    storage: str | None = Field(default=None, min_length=1)
    baselines: list[str] = Field(default_factory=lambda: list(COMPARED))
    # the second stage: short factors for the long winner (search/short_stage.py); None: ones are exported
    short_search: ShortSearchSettings | None = None
    # a factor file (or run folder) whose long factors are taken as they are: no long stage is run
    long_factors: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_target(self) -> SearchConfig:
        if self.scale is not None and self.target_window is not None:
            raise ValueError("give exactly one of scale and target_window")
        if self.scale is None and self.target_window is None and self.long_factors is None:
            raise ValueError("give exactly one of scale and target_window (or long_factors, whose target is taken)")
        if self.long_factors is not None and self.short_search is None:
            raise ValueError("long_factors skips the long stage; add a short_search section to search short factors")
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {list(BASELINES)}")
        if self.short_guard.bound_attention and (self.short_guard.max_cost is None or self.sampler.name != "evolution"
                                                 or not self.space.search_attention):
            raise ValueError("short_guard.bound_attention needs short_guard.max_cost, sampler evolution and "
                             "space.search_attention")
        if self.pruning.name != "none" and self.pruning.documents >= self.needles.documents:
            raise ValueError(f"pruning.documents ({self.pruning.documents}) must be fewer than needles.documents "
                             f"({self.needles.documents}): they are the first stage of those")
        return self

    def target(self, original_window: int) -> int:
        if self.scale is None and self.target_window is None:  # the given long factors' own target
            return candidate_from(self.long_factors).target_window
        return self.target_window or int(round(original_window * self.scale))
