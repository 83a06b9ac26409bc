"""The search config: one YAML file, validated into these types before anything is written.

The checks shared by every command that reads a config (search, resume, eval, train, pretrain) live
here too: finite numbers, sizes a run can finish, and a model whose files are all there.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitness.errors import RopeSearchError
from fitness.factors import BASELINES
from fitness.models import ModelSettings, load_tokenizer, resolve
from fitness.needles import NeedleSettings
from search.evolution import EvolutionSettings
from search.guard import ShortGuardSettings
from search.pruning import PruningSettings
from search.space import SpaceSettings
from search.workers import WorkerSettings

DEFAULT_BASELINES = ["none", "pi", "ntk", "dynamic_ntk", "yarn", "critical_ntk"]
MAX_SEED = 2**32 - 1  # what numpy's and torch's generators accept
MAX_SCALE = 1024.0
MAX_TARGET_WINDOW = 2**21  # 2M tokens: LongRoPE's reach; beyond it documents cannot even be built
MAX_NAME = 100  # a run folder's name must stay a legal file name with its timestamp
# Sizes beyond these would not finish on any machine; refused up front rather than left to hang.
# Keys are dotted paths in a config's data; a key a config does not have is skipped.
LIMITS = {
    "needles.documents": 10_000,
    "holdout.documents": 10_000,
    "evaluation.needles.documents": 10_000,
    "needles.needles_per_document": 64,
    "holdout.needles_per_document": 64,
    "needles.depths": 1_000,
    "holdout.depths": 1_000,
    "sampler.evolution.population": 10_000,
    "sampler.evolution.parents": 10_000,
    "sampler.evolution.mutations": 10_000,
    "sampler.evolution.crossovers": 10_000,
    "sampler.evolution.generations": 100_000,
    "sampler.evolution.max_attempts": 100,
    "budget.evaluations": 10_000_000,
    "budget.minutes": 60 * 24 * 366,
    "pruning.min_reference": 100_000,
    "workers.count": 1_024,
    "workers.cpus_per_worker": 1_024,
    "workers.gpus_per_worker": 64,
    "workers.candidates_per_forward": 1_024,
    "workers.documents_per_forward": 1_024,
    "workers.in_flight": 64,
    "workers.max_restarts": 100,
    "model.threads": 1_024,
    "multiples": 512,
    "candidates_per_forward": 1_024,
    "documents_per_forward": 1_024,
    "train.steps": 10_000_000,
    "train.batch_size": 4_096,
    "train.grad_accum": 1_024,
    "train.warmup": 10_000_000,
    "train.loss_chunk": 2**21,
    "train.checkpoint_every": 10_000_000,
    "train.eval_every": 10_000_000,
    "evaluation.short_windows": 100_000,
    "stop.documents": 10_000,
    "stop.patience": 10_000,
}
# Keys a resumed run may change: where and how fast it runs, never what it searches
RESUMABLE_CHANGES = ("workers.backend", "workers.count", "workers.address", "workers.cpus_per_worker",
                     "workers.gpus_per_worker", "workers.max_restarts", "workers.in_flight", "model.threads",
                     "budget.minutes")  # fmt: skip


def non_finite_key(data, prefix: str = "") -> str | None:
    """The dotted key of the first NaN or infinite number in raw config data, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return prefix or "(top level)"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = non_finite_key(value, f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip("."))
        if found:
            return found
    return None


def check_finite(data: dict, source: str) -> None:
    key = non_finite_key(data)
    if key:
        raise RopeSearchError(f"{source}: {key}: must be a finite number (not NaN or infinity)")


def _at(data: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def check_limits(data: dict, source: str) -> None:
    """Every size in LIMITS within bounds, and seeds in the generators' range (validated data)."""
    for key, most in LIMITS.items():
        value = _at(data, key)
        numbers = [len(value), *value] if isinstance(value, list) else [value]  # a list: its length and items
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and number > most:
                raise RopeSearchError(f"{source}: {key}: {number} is more than a run can finish (at most {most:g})")
    for key in ("sampler.seed", "train.seed"):
        seed = _at(data, key)
        if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
            raise RopeSearchError(f"{source}: {key}: must be an integer in [0, {MAX_SEED}], got {seed}")


def changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs' data."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [k for key in keys for k in changed_keys(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def unresumable_changes(saved: dict, current: dict) -> list[str]:
    return [key for key in changed_keys(saved, current) if not key.startswith(RESUMABLE_CHANGES)]


@contextmanager
def naming(source: str, key: str):
    """A RopeSearchError raised inside names the config file and key it came from."""
    try:
        yield
    except RopeSearchError as err:
        raise RopeSearchError(f"{source}: {key}: {err}") from None


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_model_files(directory: Path) -> None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise RopeSearchError(f"{directory} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if not any((directory / name).is_file() for name in WEIGHTS):
        raise RopeSearchError(f"{directory} has no weights ({', '.join(WEIGHTS)})")
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass  # the header is read and checked against the file's length: a torn copy fails here
        except (SafetensorError, OSError) as err:
            raise RopeSearchError(f"{path} is damaged or truncated ({' '.join(str(err).split())})") from None


def check_model(settings: ModelSettings, source: str, key: str = "model") -> None:
    """The model named by a config loads: its files are all there and its tokenizer reads."""
    if not settings.name.strip():
        raise RopeSearchError(f"{source}: {key}.name: empty; name a model (tiny, an HF folder or a .gguf file)")
    if settings.threads is not None and settings.threads < 1:
        raise RopeSearchError(f"{source}: {key}.threads: must be at least 1 (or left out), got {settings.threads}")
    with naming(source, f"{key}.name"):
        directory, gguf_file = resolve(settings.name)
        if gguf_file is None:
            _check_model_files(directory)
        load_tokenizer(settings.name)


def check_haystacks(sources: list, source: str, key: str) -> None:
    from fitness.needles import haystack_texts

    if not sources:
        raise RopeSearchError(f"{source}: {key}: empty; name a haystack (pydoc, docstrings, a file or folder)")
    with naming(source, key):
        haystack_texts(sources)


class SamplerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["evolution", "tpe", "cmaes", "random"] = "evolution"  # Optuna's: asked one job of trials at a time
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    evolution: EvolutionSettings = Field(default_factory=EvolutionSettings)


class BudgetSettings(BaseModel):
    """Stop at whichever comes first. Only an evaluation/generation budget gives a reproducible history."""

    model_config = ConfigDict(extra="forbid")

    evaluations: int | None = Field(default=None, gt=0)
    minutes: float | None = Field(default=None, gt=0)


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
                          documents=32, depths=[0.05 + 0.1 * i for i in range(10)])  # fmt: skip


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="search", pattern=r"^[A-Za-z0-9_.-]+$", max_length=MAX_NAME)
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
    baselines: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINES))

    @model_validator(mode="after")
    def _one_target(self) -> "SearchConfig":
        if (self.scale is None) == (self.target_window is None):
            raise ValueError("give exactly one of scale and target_window")
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {list(BASELINES)}")
        if self.pruning.name != "none" and self.pruning.documents >= self.needles.documents:
            raise ValueError(f"pruning.documents ({self.pruning.documents}) must be fewer than needles.documents "
                             f"({self.needles.documents}): they are the first stage of those")  # fmt: skip
        return self

    def target(self, original_window: int) -> int:
        return self.target_window or int(round(original_window * self.scale))
