"""RULER's synthetic tasks (Hsieh et al., 2024), written here from the paper's definitions: one small
function per task, found by name in `RULER_TASKS`, as needle formats are in `fitness.needle_formats`.

A task draws its keys, values and words from a seeded `random.Random` and returns a `TaskSample`: the
words around the context (instruction, question, the start of the answer), the expected answers,
and a context that fills exactly the tokens the rest leaves (`fitness.ruler.documents` builds the
token-exact prompt). The essay haystack is the project's own text (`fitness.haystacks`), where RULER
reads Paul Graham's essays; the noise haystack is RULER's repeated sentences.

Left out: RULER's two QA tasks (SQuAD, HotpotQA), for want of an offline copy of either dataset, and
the one-shot examples RULER puts before variable tracking and common words.

To add a task: a generator returning a `TaskSample`, registered in `RULER_TASKS` with its metric and
answer budget; `ruler.tasks: [name]` runs it.
"""

from __future__ import annotations

import itertools
import random
import string
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fitness.errors import RopeSearchError
from fitness.haystacks import Haystack, encode, fill
from fitness.needles import insert_at_depths

NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class TaskInputs:
    """What every task draws from, tokenized once per tokenizer and haystack."""

    tokenizer: Any
    essay: Haystack
    noise: list[list[int]]
    words: list[str]  # English words of the essay haystack: keys, common words
    numbers: list[list[int]] = field(default_factory=list)  # " 1.", " 2.", ... as far as asked for
    word_pieces: dict[str, list[int]] = field(default_factory=dict)  # " word" of each of `words`

    @classmethod
    def create(cls, tokenizer, haystack: list[str]) -> TaskInputs:
        essay = Haystack(tokenizer, haystack)
        noise = encode(tokenizer, [" " + s.strip() + "." for s in NOISE.split(".") if s.strip()])
        return cls(tokenizer, essay, noise, list(essay.words))

    def numbered(self, count: int) -> list[list[int]]:
        """The tokens of list numbers " 1." to f" {count}."."""
        if count > len(self.numbers):
            self.numbers += encode(self.tokenizer, [f" {i}." for i in range(len(self.numbers) + 1, count + 1)])
        return self.numbers[:count]

    def pieces_of(self, words: tuple[str, ...]) -> list[list[int]]:
        """The tokens of " word" for each of `words` (all from `self.words`), tokenized once."""
        if not self.word_pieces:
            self.word_pieces = dict(zip(self.words, encode(self.tokenizer, [" " + w for w in self.words])))
        return [self.word_pieces[w] for w in words]


class Context:
    """The middle of a prompt: `tokens(inputs, budget)` gives pieces of exactly `budget` tokens."""

    def tokens(self, inputs: TaskInputs, budget: int) -> list[list[int]]:
        raise NotImplementedError


Background = Callable[[TaskInputs, int], list[list[int]]]


@dataclass(frozen=True)
class Inserted(Context):
    """Sentences (needles, assignments) at depths of a background that fills the rest; without
    `inserts`, the background alone (a document with its needle dropped)."""

    background: Background
    inserts: tuple[str, ...]
    depths: tuple[float, ...]

    def tokens(self, inputs: TaskInputs, budget: int) -> list[list[int]]:
        inserted = encode(inputs.tokenizer, [" " + text for text in self.inserts]) if self.inserts else []
        room = budget - sum(map(len, inserted))
        if room < 0:
            raise RopeSearchError(f"the inserted sentences alone take {budget - room} of {budget} tokens")
        pieces = self.background(inputs, room)
        insert_at_depths(pieces, inserted, list(self.depths))
        return pieces


@dataclass(frozen=True)
class TaskSample:
    instruction: str  # before the context
    question: str  # after the context
    answer_prefix: str  # the start of the answer (the assistant's turn under a chat template)
    answers: tuple[str, ...]  # RULER's references: each one found in the output counts
    context: Context
    meta: dict = field(default_factory=dict)


TaskGenerator = Callable[[random.Random, TaskInputs], TaskSample]


@dataclass(frozen=True)
class Task:
    name: str
    generate: TaskGenerator
    metric: str  # "all" (RULER's string_match_all) or "part" (string_match_part), see fitness.ruler.suite
    max_new_tokens: int  # RULER's answer budget for the task
    category: str


RULER_TASKS: dict[str, Task] = {}


def register_task(name: str, metric: str, max_new_tokens: int, category: str):
    def decorate(fn: TaskGenerator) -> TaskGenerator:
        RULER_TASKS[name] = Task(name, fn, metric, max_new_tokens, category)
        return fn

    return decorate


# ---------------------------------------------------------------- backgrounds
def essay(start: int) -> Background:
    return lambda inputs, budget: inputs.essay.take(start, budget)


def noise(start: int) -> Background:
    return lambda inputs, budget: fill(itertools.islice(itertools.cycle(inputs.noise), start, None), budget)


def needle_haystack(seed: int, keys: str, values: str, taken: frozenset[str]) -> Background:
    """A haystack made only of distractor needles, drawn from their own seed (so the same context
    comes out each time) with keys and values the document's own needles do not use."""

    def pieces(inputs: TaskInputs, budget: int) -> Iterator[list[int]]:
        draw = Draw(random.Random(seed), inputs, taken)
        batch = min(256, budget // 16 + 1)  # a batch at a time: one tokenizer call per needle is slow at 128k
        while True:
            sentences = [NEEDLE.format(kind=values, key=draw.key(keys), value=draw.value(values)) for _ in range(batch)]
            yield from encode(inputs.tokenizer, [" " + sentence for sentence in sentences])

    return lambda inputs, budget: fill(pieces(inputs, budget), budget)


# ---------------------------------------------------------------- needles in a haystack
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)


class Draw:
    """Distinct keys and values from one rng: no two needles of a document share a key."""

    def __init__(self, rng: random.Random, inputs: TaskInputs, taken: frozenset[str] = frozenset()):
        self.rng, self.words, self.used = rng, inputs.words, set(taken)

    def _distinct(self, make: Callable[[], str]) -> str:
        while (item := make()) in self.used:
            pass
        self.used.add(item)
        return item

    def key(self, kind: str) -> str:
        if kind == "words":
            return self._distinct(lambda: f"{self.rng.choice(self.words)}-{self.rng.choice(self.words)}")
        return self.uuid()

    def value(self, kind: str) -> str:
        return self._distinct(lambda: str(self.rng.randint(10**6, 10**7 - 1))) if kind == "numbers" else self.uuid()

    def uuid(self) -> str:
        return self._distinct(lambda: str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah(
    rng: random.Random,
    inputs: TaskInputs,
    haystack: str,
    keys: str,
    values: str,
    needles: int = 1,
    values_per_key: int = 1,
    queries: int = 1,
) -> TaskSample:
    """RULER's needle-in-a-haystack family: `needles` keys with `values_per_key` values each, the first
    `queries` keys asked; the haystack is `essay`, `noise` or `needles` (distractor needles only)."""
    draw = Draw(rng, inputs)
    key_list = [draw.key(keys) for _ in range(needles)]
    value_of = {key: [draw.value(values) for _ in range(values_per_key)] for key in key_list}
    sentences = [NEEDLE.format(kind=values, key=key, value=value) for key in key_list for value in value_of[key]]
    asked = key_list[:queries]
    answers = tuple(value for key in asked for value in value_of[key])
    one = values.removesuffix("s")
    if len(answers) == 1:
        question = f"What is the special magic {one} for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic {one} for {asked[0]} mentioned in the provided text is:"
    else:
        question = f"What are all the special magic {values} for {_listed(asked)} mentioned in the provided text?"
        prefix = f"The special magic {values} for {_listed(asked)} mentioned in the provided text are:"
    if haystack == "needles":
        background = needle_haystack(rng.getrandbits(64), keys, values, frozenset(draw.used))
    elif haystack == "noise":
        background = noise(rng.randrange(len(inputs.noise)))
    else:
        background = essay(rng.randrange(len(inputs.essay.pieces)))
    depths = tuple(rng.random() for _ in sentences)
    return TaskSample(
        NIAH_INSTRUCTION.format(kind=values),
        question,
        prefix,
        answers,
        Inserted(background, tuple(sentences), depths),
        {"keys": key_list, "values": value_of, "asked": asked},
    )


RETRIEVAL = "retrieval"


@register_task("niah_single_1", "all", 128, RETRIEVAL)
def niah_single_1(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A number under a word key in RULER's noise sentences."""
    return niah(rng, inputs, "noise", "words", "numbers")


@register_task("niah_single_2", "all", 128, RETRIEVAL)
def niah_single_2(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A number under a word key in real text."""
    return niah(rng, inputs, "essay", "words", "numbers")


@register_task("niah_single_3", "all", 128, RETRIEVAL)
def niah_single_3(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A UUID under a word key in real text."""
    return niah(rng, inputs, "essay", "words", "uuids")


@register_task("niah_multikey_1", "all", 128, RETRIEVAL)
def niah_multikey_1(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """Four needles in real text, one asked: three distractors under other keys."""
    return niah(rng, inputs, "essay", "words", "numbers", needles=4)


@register_task("niah_multikey_2", "all", 128, RETRIEVAL)
def niah_multikey_2(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A haystack made only of needles, one of them asked."""
    return niah(rng, inputs, "needles", "words", "numbers")


@register_task("niah_multikey_3", "all", 128, RETRIEVAL)
def niah_multikey_3(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A haystack made only of needles with UUID keys and UUID values."""
    return niah(rng, inputs, "needles", "uuids", "uuids")


@register_task("niah_multivalue", "all", 128, RETRIEVAL)
def niah_multivalue(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """One key with four values, all of which must be returned."""
    return niah(rng, inputs, "essay", "words", "numbers", values_per_key=4)


@register_task("niah_multiquery", "all", 128, RETRIEVAL)
def niah_multiquery(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """Four keys asked at once, each with its value."""
    return niah(rng, inputs, "essay", "words", "numbers", needles=4, queries=4)


# ---------------------------------------------------------------- multi-hop tracing
VT_HOPS = 4


@register_task("vt", "all", 30, "multi-hop tracing")
def variable_tracking(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """A chain `VAR A = 12345`, `VAR B = VAR A`, ... (four hops) in the noise sentences, in order;
    every name bound to the value is the answer."""
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    depths = tuple(sorted(rng.random() for _ in statements))  # the chain reads in order
    return TaskSample(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
        f"are assigned the value {value}, they are:",
        tuple(names),
        Inserted(noise(rng.randrange(len(inputs.noise))), tuple(statements), depths),
        {"value": value},
    )
