"""YAML files validated into typed settings, with one-line errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fitness.errors import RopeSearchError

Settings = TypeVar("Settings", bound=BaseModel)


def validation_message(err: ValidationError) -> str:
    """`key.path: message` for the first error, on one line."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].replace("\n", " ").removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RopeSearchError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RopeSearchError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RopeSearchError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def validate(data: dict, schema: type[Settings], source: str) -> Settings:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RopeSearchError(f"{source}: {validation_message(err)}") from None


def load_yaml(path: str | Path, schema: type[Settings]) -> Settings:
    return validate(read_yaml(path), schema, str(path))
