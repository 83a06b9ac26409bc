"""Needle documents: real haystack text, a "special magic number" needle at a depth, and the question
restated at the end, ending right before the answer. Token-exact: every document has exactly the
target length, and the labels are the answer tokens as they stand in the document.

A document is assembled from separately tokenized pieces that each begin at a whitespace boundary
(haystack sentences, needles, the question), so the token sequence is the one the tokenizer gives
each piece. The question and its answer are tokenized together, and the answer's tokens are found by
character offsets in that piece, never by tokenizing the answer alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fitness.errors import RopeSearchError

SENTENCE_END = re.compile(r"(?<=[.!?:;])(?=\s)|(?=\n)")
WORD = re.compile(r"\b[a-z]{4,10}\b")
CACHE_VERSION = 2


class NeedleSettings(BaseModel):
    """How needle documents are made; every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid")

    haystack: list[str] = Field(default_factory=lambda: ["pydoc"])
    documents: int = Field(default=16, gt=0)
    depths: list[float] = Field(default_factory=lambda: [i / 9 for i in range(10)])
    needles_per_document: int = Field(default=1, gt=0)
    seed: int = 0
    needle_template: str = "One of the special magic numbers for {key} is: {value}."
    question_template: str = (
        "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is: {value}"
    )
    digits: int = Field(default=7, ge=1, le=18)

    @field_validator("haystack", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("depths")
    @classmethod
    def _depths_in_range(cls, depths):
        if not depths or any(not 0 <= d <= 1 for d in depths):
            raise ValueError("depths must be a non-empty list of fractions in [0, 1]")
        return depths

    @model_validator(mode="after")
    def _templates_have_slots(self) -> "NeedleSettings":
        for name in ("needle_template", "question_template"):
            template = getattr(self, name)
            if "{key}" not in template or "{value}" not in template:
                raise ValueError(f"{name} needs both a {{key}} and a {{value}} (answer) slot")
        if not self.question_template.rstrip().endswith("{value}"):
            raise ValueError("question_template must end with the {value} answer slot")
        return self


@dataclass
class NeedleSet:
    """Tokenized needle documents of one length. `answers[j]` are the positions of document j's answer
    tokens; the logits that predict them sit one position earlier."""

    input_ids: torch.Tensor  # [documents, length], int64
    answers: list[torch.Tensor]  # per document, int64 positions
    meta: list[dict] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, indices) -> "NeedleSet":
        indices = list(indices)
        return NeedleSet(self.input_ids[indices], [self.answers[i] for i in indices], [self.meta[i] for i in indices])

    def answer_ids(self, j: int) -> torch.Tensor:
        return self.input_ids[j, self.answers[j]]


# ---------------------------------------------------------------- haystack sources
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
    ]  # fmt: skip
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


BUILTIN_HAYSTACKS = {"pydoc": _pydoc_texts, "docstrings": _docstring_texts}


def _file_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        if not files:
            raise RopeSearchError(f"haystack folder {path} has no .txt, .md or .jsonl files")
        return [text for f in files for text in _file_texts(f)]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RopeSearchError(f"{path}:{number}: each line must be a JSON object with a 'text' field") from None
        return texts
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise RopeSearchError(f"haystack file {path} is not UTF-8 text") from None


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
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RopeSearchError(f"haystack {sources} is empty")
    return texts


def sentences(text: str) -> list[str]:
    """Pieces that each start at a whitespace boundary and end a sentence or a line."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    pieces = [p for p in SENTENCE_END.split(text) if p.strip()]
    return [p if p[0].isspace() else " " + p for p in pieces]


# ---------------------------------------------------------------- tokenizer helpers
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (a BOS, or nothing)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_with_answer(tokenizer, text: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the indices of the tokens that cover the last occurrence of `answer`."""
    start = text.rindex(answer)
    end = start + len(answer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    covering = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    if not covering:
        raise RopeSearchError("the answer is not covered by any token of the question")
    return encoded["input_ids"], covering


# ---------------------------------------------------------------- building documents
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
        taken, total, i = [], 0, start
        while total < budget:
            piece = self.pieces[i % len(self.pieces)]
            taken.append(piece[: budget - total])
            total += len(taken[-1])
            i += 1
        return taken


def build_document(
    tokenizer, haystack: Haystack, settings: NeedleSettings, length: int, rng: random.Random, depth: float
):
    keys = []
    while len(keys) < settings.needles_per_document:
        key = f"{rng.choice(haystack.words)}-{rng.choice(haystack.words)}"
        if key not in keys:
            keys.append(key)
    values = [str(rng.randint(10 ** (settings.digits - 1), 10**settings.digits - 1)) for _ in keys]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    asked = 0

    prefix = special_prefix(tokenizer)
    needles = encode(tokenizer, [" " + settings.needle_template.format(key=k, value=v) for k, v in zip(keys, values)])
    question = "\n" + settings.question_template.format(key=keys[asked], value=values[asked]).rstrip()
    tail, answer_in_tail = encode_with_answer(tokenizer, question, values[asked])
    budget = length - len(prefix) - len(tail) - sum(map(len, needles))
    if budget < 1:
        raise RopeSearchError(
            f"length {length} is too short: the needle(s), question and answer alone take {length - budget} tokens"
        )
    pieces = haystack.take(rng.randrange(len(haystack.pieces)), budget)
    boundaries = [0]
    for piece in pieces:
        boundaries.append(boundaries[-1] + len(piece))
    # insert deepest first so earlier insertion points keep their piece index
    slots = sorted(((min(range(len(pieces) + 1), key=lambda b: abs(boundaries[b] - d * budget)), n)
                    for n, d in enumerate(depths)), reverse=True)  # fmt: skip
    for slot, n in slots:
        pieces.insert(slot, needles[n])
    ids = prefix + [t for piece in pieces for t in piece] + tail
    answer_positions = [len(ids) - len(tail) + i for i in answer_in_tail]
    assert len(ids) == length, (len(ids), length)
    meta = {"keys": keys, "values": values, "asked": asked, "depths": depths}
    return ids, answer_positions, meta


def cache_dir() -> Path:
    return Path(os.environ.get("ROPESEARCH_CACHE", Path.home() / ".cache" / "ropesearch")) / "needles"


def build_needle_set(tokenizer, settings: NeedleSettings, length: int, cache: bool = True) -> NeedleSet:
    """`settings.documents` needle documents of exactly `length` tokens, deterministic from the seed,
    cached on disk by tokenizer, haystack and settings."""
    haystack = Haystack(tokenizer, settings.haystack)
    key = json.dumps(
        [CACHE_VERSION, tokenizer_fingerprint(tokenizer), haystack.fingerprint, settings.model_dump(), length],
        sort_keys=True,
    )
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if cache and path.exists():
        try:
            stored = torch.load(path, weights_only=True)
            return NeedleSet(stored["input_ids"], list(stored["answers"]), json.loads(stored["meta"]))
        except Exception:  # a torn cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    rng = random.Random(f"needles:{settings.seed}:{length}")
    rows, answers, metas = [], [], []
    for j in range(settings.documents):
        ids, answer, meta = build_document(
            tokenizer, haystack, settings, length, rng, settings.depths[j % len(settings.depths)]
        )
        rows.append(ids)
        answers.append(torch.tensor(answer, dtype=torch.long))
        metas.append(meta)
    needle_set = NeedleSet(torch.tensor(rows, dtype=torch.long), answers, metas)
    if cache:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"input_ids": needle_set.input_ids, "answers": answers, "meta": json.dumps(metas)}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # a cache that cannot be written only costs time next run
            tmp.unlink(missing_ok=True)
            logging.getLogger("ropesearch").warning("needle cache not written (%s)", err)
    return needle_set
