"""Checks of any config's raw data and named inputs, before anything is written: finite numbers,
bounded sizes, seeds in range, model files that load, haystacks that read. Shared by the search,
`ropesearch eval`, the fine-tune and pretraining, so each check is written once; each raises one
line naming the file and the key."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from fitness.errors import RopeSearchError
from fitness.models import ModelSettings, load_tokenizer, resolve

MAX_SEED = 2**32 - 1  # what numpy's and torch's generators accept
MAX_SCALE = 1024.0
MAX_TARGET_WINDOW = 2**21  # 2M tokens: LongRoPE's reach; beyond it documents cannot even be built
MAX_NAME = 100  # a run folder's name must stay a legal file name with its timestamp
# a run's name becomes a folder's: a letter or digit first, so never ".", ".." or a hidden folder
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
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


def check_short_lengths(lengths: list[int] | None, window: int, source: str, key: str) -> None:
    """General-text lengths measure what an extension costs inside the original window: beyond it they
    would measure the long factors, and take minutes each."""
    for length in lengths or []:  # the fields bound them below
        if length > window:
            raise RopeSearchError(f"{source}: {key}: {length} is beyond the model's window of {window} tokens")


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
