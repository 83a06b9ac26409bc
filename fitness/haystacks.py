"""Haystacks: real text from built-in sources (Python's pydoc topics, standard-library docstrings, IDLE's
help and news) or from files, cut into sentences that each begin at a whitespace boundary, tokenized
once, and read as one long cycle."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

from fitness.config_io import read_text
from fitness.errors import RopeSearchError

SENTENCE_END = re.compile(r"(?<=[.!?:;])(?=\s)|(?=\n)")
WORD = re.compile(r"\b[a-z]{4,10}\b")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pydoc_texts() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]


def _docstring_texts() -> list[str]:
    """Docstrings of standard-library modules, read from their source files (not from imported
    objects, whose set depends on what else the process imported): real English, another source
    than the pydoc topics."""
    import ast
    import importlib.util

    names = [
        "argparse", "asyncio.tasks", "asyncio.events", "collections", "csv", "datetime", "decimal", "email.message",
        "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib",
        "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
        "threading", "typing", "unittest.case", "urllib.parse", "uuid", "zipfile", "textwrap", "difflib",
        "calendar", "contextlib",
    ]
    texts = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    texts.append(doc)
    return texts


class _TextOfHtml(HTMLParser):
    """The text of an HTML page, a line break at every block element."""

    BLOCKS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "pre", "div", "section", "tr", "br"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)

    def text(self) -> str:
        text = "".join(self.parts).replace("\u00b6", "")  # the pilcrow after every heading
        return re.sub(r"[ \t]*\n\s*\n+", "\n\n", text).strip()


def _idle_texts() -> list[str]:
    """IDLE's help page (the Sphinx body of idlelib/help.html, without navigation), its README, and its
    NEWS, HISTORY and ChangeLog: English prose that ships with every CPython and is neither the pydoc
    topics nor the docstrings (about 89k tokens of the bundled model's tokenizer)."""
    try:
        import idlelib
    except ImportError:  # some distributions package IDLE apart (Debian: idle-python3.x)
        raise RopeSearchError("haystack 'idle' needs Python's idlelib, which this Python lacks "
                              "(Debian: apt-get install idle); choose another haystack") from None

    folder = Path(idlelib.__file__).parent
    texts = []
    page = folder / "help.html"
    if page.is_file():
        html = page.read_text(encoding="utf-8")
        body = html[html.find('<div class="body"') : html.find('<div class="sphinxsidebar"')] or html
        parser = _TextOfHtml()
        parser.feed(body)
        texts.append(parser.text())
    for name in ("README.txt", "NEWS.txt", "NEWS2x.txt", "HISTORY.txt", "ChangeLog"):
        if (folder / name).is_file():
            texts.append((folder / name).read_text(encoding="utf-8", errors="replace"))
    return texts


BUILTIN_HAYSTACKS = {"pydoc": _pydoc_texts, "docstrings": _docstring_texts, "idle": _idle_texts}


MAX_HAYSTACK_BYTES = 2**30  # 1 GiB of text: far more than any search or training here reads


def _file_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        if not files:
            raise RopeSearchError(f"haystack folder {path} has no .txt, .md or .jsonl files")
        return [text for f in files for text in _file_texts(f)]
    try:  # a device such as /dev/zero, or a pipe, is refused: it never ends
        text = read_text(path, "haystack file", MAX_HAYSTACK_BYTES)
    except RopeSearchError as err:
        raise RopeSearchError(f"haystack file {err}") from None
    if path.suffix != ".jsonl":
        return [text]
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RopeSearchError(f"{path}:{number}: each line must be a JSON object with a 'text' field") from None
    return texts


def haystack_texts(sources: list[str]) -> list[str]:
    texts = []
    for source in sources:
        if source in BUILTIN_HAYSTACKS:
            texts += BUILTIN_HAYSTACKS[source]()
        elif Path(source).expanduser().exists():
            texts += _file_texts(Path(source).expanduser())
        else:
            raise RopeSearchError(
                f"haystack {source!r}: no such file or folder (built in: {', '.join(BUILTIN_HAYSTACKS)})"
            )
        if sum(map(len, texts)) > MAX_HAYSTACK_BYTES:
            raise RopeSearchError(f"haystack {sources}: more than {MAX_HAYSTACK_BYTES} characters; name fewer files")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RopeSearchError(f"haystack {sources} is empty")
    return texts


def sentences(text: str) -> list[str]:
    """Pieces that each start at a whitespace boundary and end a sentence or a line."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    pieces = [p for p in SENTENCE_END.split(text) if p.strip()]
    return [p if p[0].isspace() else " " + p for p in pieces]


class Haystack:
    """The haystack as one long cycle of tokenized sentences."""

    def __init__(self, tokenizer, sources: list[str]):
        texts = haystack_texts(sources)
        pieces = [s for text in texts for s in sentences(text)]
        self.fingerprint = hashlib.sha256("\x00".join(pieces).encode()).hexdigest()[:16]
        self.pieces = [ids for ids in encode(tokenizer, pieces) if ids]
        if not self.pieces:
            raise RopeSearchError(f"haystack {sources} has no text the tokenizer keeps")
        words = sorted({w for text in texts for w in WORD.findall(text.lower())})
        self.words = words if len(words) >= 20 else [f"item{i}" for i in range(100)]

    def take(self, start: int, budget: int) -> list[list[int]]:
        """Whole sentences from `start` on (cycling) until `budget` tokens; the last one cut to fit."""
        return fill(itertools.islice(itertools.cycle(self.pieces), start % len(self.pieces), None), budget)


def fill(pieces: Iterable[list[int]], budget: int) -> list[list[int]]:
    """Token pieces in order until exactly `budget` tokens, the last one cut to fit: how every
    token-exact document fills the room its fixed parts leave."""
    taken, total = [], 0
    for piece in pieces:
        if total >= budget:
            break
        taken.append(piece[: budget - total])
        total += len(taken[-1])
    return taken
