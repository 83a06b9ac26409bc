"""Needle formats: one small pure function per kind of needle, found by name in `NEEDLE_FORMATS`.

A format draws its keys and values from a seeded `random.Random` and fills one of its wordings. It
returns the needle sentence(s) to hide in the haystack, the question restated at the end of the
document (ending with the answer), and the answer string; `fitness.needles` turns that into a
token-exact document and finds the answer's tokens by character offsets.

Several kinds, each with several wordings, so that factors searched on one are not tuned to one
phrasing: a single format in the fitness overfits the factors to it (REFERENCE.md, "Another needle
format").

To add one: a function of (rng, wording, FormatInputs) returning a `Needle`, under
`@register_format("name", WORDINGS)`; `needles.formats: [name]` and the held-out sets then use it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fitness.errors import RopeSearchError


@dataclass(frozen=True)
class Wording:
    """A needle sentence and its question, with `{key}` and `{value}` slots; the question ends with
    `{value}`, the answer. `choices`: the words a word-answer format draws its value from."""

    needle: str
    question: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Needle:
    """What a format returns: `needles[asked]` holds the answer, the others are distractors."""

    needles: list[str]
    question: str  # ends with `answer`
    answer: str
    keys: list[str]
    values: list[str]
    asked: int = 0


@dataclass(frozen=True)
class FormatInputs:
    """What a format may draw from besides the rng: words of the haystack (for readable keys), how
    many needles the settings ask for, and the digits of a number answer."""

    words: Sequence[str]
    needles: int = 1
    digits: int = 7


NeedleFormat = Callable[[random.Random, Wording, FormatInputs], Needle]
NEEDLE_FORMATS: dict[str, NeedleFormat] = {}
WORDINGS: dict[str, tuple[Wording, ...]] = {}


def register_format(name: str, wordings: Sequence[Wording]):
    def decorate(fn: NeedleFormat) -> NeedleFormat:
        NEEDLE_FORMATS[name] = fn
        WORDINGS[name] = tuple(wordings)
        return fn

    return decorate


def check_format(name: str) -> None:
    if name not in NEEDLE_FORMATS:
        raise RopeSearchError(f"unknown needle format {name!r}; known: {', '.join(NEEDLE_FORMATS)}")


def _fill(wording: Wording, keys: list[str], values: list[str], asked: int) -> Needle:
    return Needle(
        needles=[wording.needle.format(key=k, value=v) for k, v in zip(keys, values)],
        question=wording.question.format(key=keys[asked], value=values[asked]).rstrip(),
        answer=values[asked],
        keys=keys,
        values=values,
        asked=asked,
    )


def _word_keys(rng: random.Random, words: Sequence[str], count: int) -> list[str]:
    """`count` distinct "word-word" keys. The draw order is the one the first version used, so the
    magic-number documents (and the bundled model's search history) stay byte-identical."""
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in keys:
            keys.append(key)
    return keys


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


# ---------------------------------------------------------------- the formats
MAGIC_NUMBER = (
    Wording(  # wording 0 is NeedleSettings' needle_template / question_template (the default)
        "One of the special magic numbers for {key} is: {value}.",
        "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is: {value}",
    ),
    Wording("The special magic number of {key} is {value}.",
            "What is the special magic number of {key}? The special magic number of {key} is {value}"),
    Wording("Remember this magic number for {key}: {value}.",
            "Which magic number was given for {key}? The magic number for {key} is {value}"),
    Wording("Note: the magic number that belongs to {key} is {value}.",
            "Recall the magic number that belongs to {key}. It is {value}"),
)


@register_format("magic_number", MAGIC_NUMBER)
def magic_number(rng: random.Random, wording: Wording, inputs: FormatInputs) -> Needle:
    """A number named by a two-word key; distractors (needles > 1) have other keys."""
    keys = _word_keys(rng, inputs.words, inputs.needles)
    values = [_number(rng, inputs.digits) for _ in keys]
    return _fill(wording, keys, values, asked=0)


PASS_KEY = (
    Wording("The pass key is {value}. Remember it. {value} is the pass key.",
            "What is the pass key? The pass key is {value}"),
    Wording("Important: the pass key is {value}. Do not forget {value}.",
            "What is the pass key mentioned above? The pass key is {value}"),
    Wording("The access code you will need later is {value}. Keep it safe.",
            "What is the access code? The access code is {value}"),
    Wording("Here is the pass key: {value}. Memorize it.",
            "Which pass key was given in the text? The pass key was {value}"),
)


@register_format("pass_key", PASS_KEY)
def pass_key(rng: random.Random, wording: Wording, inputs: FormatInputs) -> Needle:
    """One five-digit key with no name (the classic pass-key test); there is nothing to tell two
    apart, so it is always a single needle, repeated once inside its sentence."""
    return _fill(wording, ["pass key"], [_number(rng, 5)], asked=0)


KEY_VALUE = (
    Wording("The value stored under key {key} is {value}.",
            "What is the value stored under key {key}? The value stored under key {key} is {value}"),
    Wording("Key {key} maps to value {value}.",
            "Which value does key {key} map to? Key {key} maps to value {value}"),
    Wording("In the registry, the entry {key} holds {value}.",
            "What does the registry entry {key} hold? The entry {key} holds {value}"),
)


@register_format("key_value", KEY_VALUE)
def key_value(rng: random.Random, wording: Wording, inputs: FormatInputs) -> Needle:
    """A random UUID key and an eight-digit hex value: nothing in the key is a word to lean on."""
    keys = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(inputs.needles)]
    values = [f"{rng.getrandbits(32):08x}" for _ in keys]
    return _fill(wording, keys, values, asked=0)


MULTI_NEEDLE = (
    Wording("The number assigned to {key} is {value}.",
            "What number is assigned to {key}? The number assigned to {key} is {value}"),
    Wording("Record: {key} scored {value}.",
            "What did {key} score? {key} scored {value}"),
    Wording("The locker of {key} has the combination {value}.",
            "What is the combination of the locker of {key}? The combination is {value}"),
)
MULTI_NEEDLE_COUNT = 4  # at least this many needles of the kind, one of them asked


@register_format("multi_needle", MULTI_NEEDLE)
def multi_needle(rng: random.Random, wording: Wording, inputs: FormatInputs) -> Needle:
    """Several needles of one kind, any one of them asked: the model must find the right one."""
    keys = _word_keys(rng, inputs.words, max(inputs.needles, MULTI_NEEDLE_COUNT))
    values = [_number(rng, inputs.digits) for _ in keys]
    return _fill(wording, keys, values, asked=rng.randrange(len(keys)))


COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "violet", "brown")
ANIMALS = ("tiger", "rabbit", "falcon", "dolphin", "turtle", "panther", "beaver", "otter", "eagle", "wolf")
FRUITS = ("mango", "cherry", "banana", "peach", "lemon", "grape", "apricot", "melon", "plum", "papaya")
WORD = (
    Wording("The secret color of {key} is {value}.",
            "What is the secret color of {key}? The secret color of {key} is {value}", COLORS),
    Wording("The animal that guards {key} is a {value}.",
            "Which animal guards {key}? The animal that guards {key} is a {value}", ANIMALS),
    Wording("The favourite fruit of {key} is the {value}.",
            "What is the favourite fruit of {key}? It is the {value}", FRUITS),
)


@register_format("word", WORD)
def word(rng: random.Random, wording: Wording, inputs: FormatInputs) -> Needle:
    """A word answer, not digits, from the wording's fixed list; distractors get other words."""
    keys = _word_keys(rng, inputs.words, inputs.needles)
    values = rng.sample(wording.choices, len(keys)) if len(keys) <= len(wording.choices) else \
        [rng.choice(wording.choices) for _ in keys]
    return _fill(wording, keys, values, asked=0)
