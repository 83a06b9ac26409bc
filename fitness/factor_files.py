"""Factor files and run folders: the one reader of what a `factors:` / `long_factors:` entry or an
export's source names.

A factor file is a candidate as JSON (or YAML by its name: .yaml, .yml), read with bounds; a run folder
gives its best factors, with the short stage's short factors where that stage has run and its search
config as provenance; a method name (`yarn`, `pi`, ...) is that baseline as engines deploy it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from fitness.baselines import BASELINES, deployed_baseline
from fitness.config_io import read_data, validation_message
from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate, check_geometry
from fitness.geometry import RopeGeometry


def load_factor_file(path: str | Path) -> RopeCandidate:
    """A factor file: JSON, or YAML by its name (.yaml, .yml), read with bounds; numbers must be numbers."""
    path = Path(path)
    if not path.exists():
        raise RopeSearchError(f"{path}: no such factor file")
    data = read_data(path, "factor file", as_json=path.suffix not in (".yaml", ".yml"))
    _numbers_only(data, path)
    try:
        return RopeCandidate.model_validate(data)
    except ValidationError as err:
        raise RopeSearchError(f"{path}: {validation_message(err)}") from None


def candidate_from(source: str | Path) -> RopeCandidate:
    """A run folder (its best factors, with the short stage's short factors where it has run, and its
    search config as provenance) or a factor file (JSON or YAML): what export and training take,
    checked before anything is written."""
    source = Path(source)
    if source.is_dir():
        factors = source / "best_factors.json"
        if not factors.is_file():
            raise RopeSearchError(f"{source}: no best_factors.json (has the search finished a round?)")
        candidate = _extends(load_factor_file(factors), factors)
        short = source / "best_short_factors.json"  # the short-factor stage's, for these long factors
        if short.is_file():
            with_short = load_factor_file(short)
            if with_short.long_factors != candidate.long_factors:
                raise RopeSearchError(f"{short}: searched for other long factors than {factors} holds")
            candidate = _extends(with_short, short)
        if (source / "config.yaml").exists():  # provenance: the search config travels with the factors
            config = read_data(source / "config.yaml", "run config")
            candidate = candidate.model_copy(update={"params": {**candidate.params, "search_config": config}})
        return candidate
    return _extends(load_factor_file(source), source)


NUMERIC_KEYS = ("target_window", "long_factors", "short_factors", "attention_factor", "geometry")


def _numbers_only(data, source: Path) -> None:
    """Factors written as strings ("1.5") would be coerced silently by the candidate type: a file that
    quotes its numbers was not written by this tool, so it is refused rather than guessed at."""
    if not isinstance(data, dict):
        return  # the candidate type reports what the top level should be
    for key in NUMERIC_KEYS:
        value = data.get(key)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for where, item in [(None, value), *items]:
            if isinstance(item, (str, bool)):
                at = key if where is None else f"{key}.{where}" if isinstance(where, str) else f"{key}[{where}]"
                raise RopeSearchError(f"{source}: {at} = {item!r}: numbers must be written as numbers")


def _extends(candidate: RopeCandidate, source: Path) -> RopeCandidate:
    g = candidate.geometry
    if candidate.target_window < g.original_window:
        raise RopeSearchError(
            f"{source}: target_window {candidate.target_window} is below the model's window {g.original_window} "
            "(factors extend a window; they cannot shrink it)"
        )
    return candidate


def factors_from(value: str, geometry: RopeGeometry, target_window: int | None) -> RopeCandidate:
    """What a config's `factors:` names: a method (`yarn`, `pi`, ...; a name wins over a file of that name,
    write ./yarn for the file), deployed for `target_window`, or a factor file or run folder, which must
    be for `geometry` (and, where `target_window` is given, for that target)."""
    if value in BASELINES:
        if target_window is None:
            raise RopeSearchError(f"the method {value!r} needs a target: give scale or target_window")
        return deployed_baseline(value, geometry, target_window)
    candidate = candidate_from(value)
    check_geometry(candidate, geometry, source=value)
    if target_window is not None and candidate.target_window != target_window:
        raise RopeSearchError(f"{value} was made for {candidate.target_window} tokens, not the target "
                              f"{target_window}; leave scale and target_window out, or give its own")
    return candidate
