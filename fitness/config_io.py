"""Config and factor files read with bounds, validated into typed settings, with one-line errors that
name the file and the key.

Every file a user hands over is read the same way: a regular file of bounded size, UTF-8, then
parsed with duplicate keys refused and YAML aliases bounded (a "billion laughs" file composes in a
few kilobytes but expands to gigabytes in any walk over it), nesting bounded before any recursion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fitness.errors import RopeSearchError

Settings = TypeVar("Settings", bound=BaseModel)

MAX_FILE_BYTES = 4 * 2**20  # configs and factor files are a few KiB; a 128k model's search config a few more
MAX_NODES = 100_000  # values in a file once aliases are expanded
MAX_DEPTH = 64  # nesting of mappings and lists
# What pydantic puts into an error's location for the member of a union it tried ("literal['first','all']",
# "list[int]", "function-after[...]"): not a key a user wrote
_TYPE_NAMES = {"int", "float", "str", "bool", "none", "list", "dict", "tuple"}


def _union_member(part) -> bool:
    return isinstance(part, str) and ("[" in part or "(" in part or part in _TYPE_NAMES)


def _where(loc: tuple) -> str:
    parts = [part for part in loc if not _union_member(part)]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top level)"


def _inside(key: str, where: str) -> bool:
    return key == where or key.startswith((f"{where}.", f"{where}["))


def validation_message(err: ValidationError) -> str:
    """`key.path: message` on one line. Of the errors at the first key, the deepest: where a value may take
    several forms, the form it came closest to says most."""
    errors = err.errors()
    where = _where(errors[0]["loc"])
    same_key = [e for e in errors if _inside(_where(e["loc"]), where)]
    first = max(same_key, key=lambda e: len(_where(e["loc"])))
    message = first["msg"].replace("\n", " ").removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    others = {_where(e["loc"]) for e in errors} - {_where(e["loc"]) for e in same_key}
    more = f" (and {len(others)} more)" if others else ""
    return f"{_where(first['loc'])}: {message}{more}"


def read_text(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """A regular file's text, at most `limit` bytes, UTF-8: a device (/dev/zero), a pipe or a huge file
    is refused before it is read."""
    path = Path(path)
    try:
        if not path.is_file():
            raise RopeSearchError(f"{path}: no such {what}" if not path.exists() else f"{path}: not a regular file")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # never more, whatever the file claims or becomes meanwhile
    except OSError as err:
        raise RopeSearchError(f"{path}: cannot read this {what} ({err.strerror})") from None
    if len(data) > limit:
        raise RopeSearchError(f"{path}: more than {limit} bytes, more than a {what} can be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RopeSearchError(f"{path}: not UTF-8 text (byte {err.start})") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and nesting deeper than MAX_DEPTH while composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """The node count with every alias expanded, without expanding any (a walk with memory over the
    composed graph, iterative); an alias inside what it names is refused, as no walk over it ends."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_NODES:
                raise yaml.YAMLError(f"more than {MAX_NODES} values once its aliases are expanded")
            continue
        if id(node) in sizes:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise yaml.YAMLError(f"an alias refers to itself (line {child.start_mark.line + 1})")
            if id(child) not in sizes:
                stack.append((child, False))


def parse_yaml(text: str):
    """YAML text as data, bounded: raises yaml.YAMLError for duplicate keys, deep nesting, self-reference
    and alias expansion past MAX_NODES."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _no_duplicates(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _check_depth(data) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((item, depth + 1) for item in items)


def parse_json(text: str):
    """JSON text as data; raises ValueError for duplicate keys and nesting deeper than MAX_DEPTH."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    _check_depth(data)
    return data


def read_data(path: str | Path, what: str = "file", as_json: bool | None = None):
    """A bounded JSON or YAML file as data (JSON if `as_json`, by default for a .json name); one-line
    errors naming the file."""
    path = Path(path)
    as_json = path.suffix == ".json" if as_json is None else as_json
    text = read_text(path, what)
    try:
        return parse_json(text) if as_json else parse_yaml(text)
    except (ValueError, yaml.YAMLError) as err:
        raise RopeSearchError(f"{path}: not valid {'JSON' if as_json else 'YAML'} "
                              f"({' '.join(str(err).split())[:300]})") from None


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping (bounded, duplicate keys refused)."""
    path = Path(path)
    data = read_data(path, "config file")
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


def load_yaml(path: str | Path, schema: type[Settings], overrides: dict | None = None,
              prepare: Callable[[dict, str], None] | None = None) -> Settings:
    """The one loader of every command's config: a bounded read, finite numbers, the schema (every bound lives
    on its field). `prepare(data, source)` fills in what the data implies before validation; `overrides`
    (dotted keys the command line sets) are validated again on top."""
    source = str(path)
    data = read_yaml(path)
    check_finite(data, source)
    if prepare is not None:
        prepare(data, source)
    config = validate(data, schema, source)
    if overrides:
        data = config.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        config = validate(data, schema, f"{source} with the command line's options")
    return config
