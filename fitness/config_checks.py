"""Checks of any config's raw data and named inputs, before anything is written: finite numbers,
bounded sizes, seeds in range, model files that load, haystacks that read. Shared by the search,
`ropesearch eval`, the fine-tune and pretraining, so each check is written once; each raises one
line naming the file and the key."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fitness.errors import RopeSearchError
from fitness.geometry import RopeGeometry
from fitness.models import ModelSettings, load_tokenizer, resolve

MAX_SEED = 2**32 - 1  # what numpy's and torch's generators accept
MAX_SCALE = 1024.0
MAX_TARGET_WINDOW = 2**21  # 2M tokens: LongRoPE's reach; beyond it documents cannot even be built
MAX_NAME = 100  # a run folder's name must stay a legal file name with its timestamp
# a run's name becomes a folder's: a letter or digit first, so never ".", ".." or a hidden folder
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# the name of a search, a fine-tune or an evaluation: the one rule for what may name their folders
RunName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
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


def model_geometry(settings: ModelSettings, source: str) -> RopeGeometry:
    """A config's model, checked (files, tokenizer, weights), and its RoPE geometry: what every command
    reads first about the model it names."""
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config

    check_model(settings, source)
    with naming(source, "model.name"):
        return geometry_from_config(load_config(settings.name))
