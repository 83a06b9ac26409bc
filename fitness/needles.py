"""Needle documents: real haystack text, needles of one or several formats at a depth, and the question
restated at the end, ending right before the answer. Token-exact: every document has exactly the
target length, and the labels are the answer tokens as they stand in the document.

A document is assembled from separately tokenized pieces that each begin at a whitespace boundary
(haystack sentences, needles, the question), so the token sequence is the one the tokenizer gives
each piece. The question and its answer are tokenized together, and the answer's tokens are found by
character offsets in that piece, never by tokenizing the answer alone.

Needle formats live in `fitness.needle_formats` (a registry of small functions), haystacks in
`fitness.haystacks`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fitness.errors import RopeSearchError
from fitness.haystacks import (  # noqa: F401  (re-exported: many modules import them from here)
    BUILTIN_HAYSTACKS,
    Haystack,
    encode,
    haystack_texts,
    sentences,
)
from fitness.needle_formats import NEEDLE_FORMATS, WORDINGS, FormatInputs, Wording

CACHE_VERSION = 2


class NeedleSettings(BaseModel):
    """How needle documents are made; every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid")

    haystack: list[str] = Field(default_factory=lambda: ["pydoc"])
    documents: int = Field(default=16, gt=0, le=10_000)
    depths: list[float] = Field(default_factory=lambda: [i / 9 for i in range(10)], max_length=1_000)
    needles_per_document: int = Field(default=1, gt=0, le=64)
    seed: int = 0
    # Documents take their format in turn from a shuffled cycle of these (so a set of n x len(formats)
    # documents holds n of each), decorrelated from the depths; see NEEDLE_FORMATS for the names.
    formats: list[str] = Field(default_factory=lambda: ["magic_number"])
    # Which wordings of each format: "first" (the default; the bundled model knows only the first
    # magic-number wording), "all", or {format: [wording indices]} (a format not named: all).
    wordings: Literal["first", "all"] | dict[str, list[int]] = "first"
    # Wording 0 of magic_number: kept as fields so that older configs and the bundled model's recipe
    # keep working.
    needle_template: str = "One of the special magic numbers for {key} is: {value}."
    question_template: str = (
        "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is: {value}"
    )
    digits: int = Field(default=7, ge=1, le=18)

    @field_validator("haystack", "formats", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("depths")
    @classmethod
    def _depths_in_range(cls, depths):
        if not depths or any(not 0 <= d <= 1 for d in depths):
            raise ValueError("depths must be a non-empty list of fractions in [0, 1]")
        return depths

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats):
        unknown = [name for name in formats if name not in NEEDLE_FORMATS]
        if unknown or not formats:
            raise ValueError(f"unknown needle format(s) {unknown}; known: {', '.join(NEEDLE_FORMATS)}")
        return formats

    @model_validator(mode="after")
    def _templates_have_slots(self) -> NeedleSettings:
        for name in ("needle_template", "question_template"):
            template = getattr(self, name)
            try:
                slots = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
            except ValueError as err:
                raise ValueError(f"{name}: {err} (write a literal brace as {{{{ or }}}})") from None
            if slots - {"key", "value"}:
                raise ValueError(f"{name} has slots {sorted(slots - {'key', 'value'})}; only {{key}} and {{value}} "
                                 f"are filled (write a literal brace as {{{{ or }}}})")
            if "{key}" not in template or "{value}" not in template:
                raise ValueError(f"{name} needs both a {{key}} and a {{value}} (answer) slot")
        if not self.question_template.rstrip().endswith("{value}"):
            raise ValueError("question_template must end with the {value} answer slot")
        return self

    @model_validator(mode="after")
    def _wordings_exist(self) -> NeedleSettings:
        if isinstance(self.wordings, dict):
            for name, indices in self.wordings.items():
                if name not in self.formats:
                    raise ValueError(f"wordings names {name!r}, which is not in formats {self.formats}")
                known = len(WORDINGS[name])
                if not indices or any(not 0 <= i < known for i in indices):
                    raise ValueError(f"wordings of {name!r} must be indices in 0..{known - 1}")
        return self

    def wording_indices(self, format_name: str) -> list[int]:
        if self.wordings == "first":
            return [0]
        if isinstance(self.wordings, dict) and format_name in self.wordings:
            return list(self.wordings[format_name])
        return list(range(len(WORDINGS[format_name])))

    def wording(self, format_name: str, index: int) -> Wording:
        if format_name == "magic_number" and index == 0:
            return Wording(self.needle_template, self.question_template)
        return WORDINGS[format_name][index]


@dataclass
class NeedleSet:
    """Tokenized needle documents of one length. `answers[j]` are the positions of document j's answer
    tokens; the logits that predict them sit one position earlier. `meta[j]["format"]` names the
    document's needle format (and `meta[j]["wording"]` which of its wordings)."""

    input_ids: torch.Tensor  # [documents, length], int64
    answers: list[torch.Tensor]  # per document, int64 positions
    meta: list[dict] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, indices) -> NeedleSet:
        indices = list(indices)
        return NeedleSet(self.input_ids[indices], [self.answers[i] for i in indices], [self.meta[i] for i in indices])

    def answer_ids(self, j: int) -> torch.Tensor:
        return self.input_ids[j, self.answers[j]]

    def document_formats(self) -> list[str]:
        """Each document's needle format (a set built before formats were recorded: magic_number)."""
        return [meta.get("format", "magic_number") for meta in self.meta]

    def formats(self) -> dict[str, list[int]]:
        """Document indices by needle format, in first-seen order."""
        groups: dict[str, list[int]] = {}
        for j, name in enumerate(self.document_formats()):
            groups.setdefault(name, []).append(j)
        return groups


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
def document_plan(settings: NeedleSettings, documents: int) -> list[tuple[str, int]]:
    """(format, wording index) of each document. Drawn from its own rng, so that a single format with
    a single wording leaves the document rng, and so the documents, exactly as they were before
    formats existed; the same plan at every length."""
    rng = random.Random(f"needle-formats:{settings.seed}")
    order: list[str] = []
    while len(order) < documents:
        block = list(settings.formats)
        rng.shuffle(block)
        order += block
    return [(name, rng.choice(settings.wording_indices(name))) for name in order[:documents]]


def insert_at_depths(pieces: list[list[int]], inserts: list[list[int]], depths: list[float]) -> None:
    """Put `inserts[n]` between whole pieces, at the piece boundary nearest `depths[n]` of the pieces'
    tokens, so that no sentence is split by a needle."""
    budget = sum(map(len, pieces))
    boundaries = [0]
    for piece in pieces:
        boundaries.append(boundaries[-1] + len(piece))
    # insert deepest first so earlier insertion points keep their piece index
    nearest = [min(range(len(pieces) + 1), key=lambda b: abs(boundaries[b] - d * budget)) for d in depths]
    for slot, n in sorted(zip(nearest, range(len(depths))), reverse=True):
        pieces.insert(slot, inserts[n])


def build_document(
    tokenizer,
    haystack: Haystack,
    settings: NeedleSettings,
    length: int,
    rng: random.Random,
    depth: float,
    format_name: str | None = None,
    wording: int | None = None,
):
    """One document of exactly `length` tokens: (ids, answer positions, meta). Without `format_name`
    and `wording` they are drawn from `rng` (training data), or fixed where there is only one choice."""
    if format_name is None:
        format_name = settings.formats[0] if len(settings.formats) == 1 else rng.choice(settings.formats)
    if format_name not in NEEDLE_FORMATS:
        raise RopeSearchError(f"unknown needle format {format_name!r}; known: {', '.join(NEEDLE_FORMATS)}")
    if wording is None:
        choices = settings.wording_indices(format_name)
        wording = choices[0] if len(choices) == 1 else rng.choice(choices)
    inputs = FormatInputs(haystack.words, settings.needles_per_document, settings.digits)
    needle = NEEDLE_FORMATS[format_name](rng, settings.wording(format_name, wording), inputs)
    depths = [rng.random() for _ in needle.needles[1:]]
    depths.insert(needle.asked, depth)  # the asked needle sits at the document's depth

    prefix = special_prefix(tokenizer)
    needles = encode(tokenizer, [" " + text for text in needle.needles])
    tail, answer_in_tail = encode_with_answer(tokenizer, "\n" + needle.question, needle.answer)
    budget = length - len(prefix) - len(tail) - sum(map(len, needles))
    if budget < 1:
        raise RopeSearchError(
            f"length {length} is too short: the needle(s), question and answer alone take {length - budget} tokens"
        )
    pieces = haystack.take(rng.randrange(len(haystack.pieces)), budget)
    insert_at_depths(pieces, needles, depths)
    ids = prefix + [t for piece in pieces for t in piece] + tail
    answer_positions = [len(ids) - len(tail) + i for i in answer_in_tail]
    assert len(ids) == length, (len(ids), length)
    meta = {"keys": needle.keys, "values": needle.values, "asked": needle.asked, "depths": depths,
            "format": format_name, "wording": wording}
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
    for j, (format_name, wording) in enumerate(document_plan(settings, settings.documents)):
        depth = settings.depths[j % len(settings.depths)]
        ids, answer, meta = build_document(tokenizer, haystack, settings, length, rng, depth, format_name, wording)
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
