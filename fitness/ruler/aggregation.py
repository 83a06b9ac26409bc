"""RULER's aggregation tasks: common-words extraction (English words of the essay haystack in a
numbered list) and frequent-words extraction (coded words with Zipf-distributed counts). Their
contexts set the counts to fit the token budget exactly, so the answer is what the document holds."""

from __future__ import annotations

import itertools
import math
import random
import string
from collections import Counter
from dataclasses import dataclass

from fitness.errors import RopeSearchError
from fitness.haystacks import encode, fill
from fitness.ruler.tasks import Context, TaskInputs, TaskSample, register_task

COMMON_WORDS, COMMON_REPEATS, OTHER_REPEATS = 10, 30, 3
ZIPF_ALPHA, CODED_VOCABULARY, CODED_LENGTH, FREQUENT = 2.0, 2000, 6, 3
# zeta(alpha): its partial sum to 1e5 and the integral of the rest, exact to ~1e-10 for alpha = 2
ZETA = sum(k**-ZIPF_ALPHA for k in range(1, 100_000)) + 100_000 ** (1 - ZIPF_ALPHA) / (ZIPF_ALPHA - 1)


def _prefix_sums(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


@dataclass(frozen=True)
class CommonWords(Context):
    """A numbered list: each common word `COMMON_REPEATS` times (fewer where the length is short),
    each other word 3 times (more where the haystack's words run out, always fewer than the common
    ones), shuffled; then single words until the budget, the last piece cut."""

    common: tuple[str, ...]
    others: tuple[str, ...]
    seed: int

    def tokens(self, inputs: TaskInputs, budget: int) -> list[list[int]]:
        word_ids = inputs.pieces_of(self.common + self.others)
        common_tokens = sum(len(ids) for ids in word_ids[: len(self.common)])
        other_sums = _prefix_sums([len(ids) for ids in word_ids[len(self.common) :]])
        number_sums = _prefix_sums(list(map(len, inputs.numbered(budget // 2 + 1))))  # an item is >= 2 tokens

        def total(times: int, other_times: int, others: int) -> int:
            items = times * len(self.common) + other_times * others
            if items >= len(number_sums):
                return budget + 1
            return number_sums[items] + times * common_tokens + other_times * other_sums[others]

        times = COMMON_REPEATS  # the common words take at most half the list, unless twice is more than that
        while times > 2 and total(times, 0, 0) > budget // 2:
            times -= 1
        if total(times, 0, 0) >= budget:
            raise RopeSearchError(f"cwe: {budget} tokens cannot hold the {len(self.common)} common words twice")
        other_times = min(OTHER_REPEATS, times - 1)
        while total(times, other_times, len(self.others)) < budget and other_times < times - 1:
            other_times += 1  # the haystack's words run out: the others repeat more often
        if total(times, other_times, len(self.others)) < budget:
            raise RopeSearchError(f"cwe: the haystack has too few distinct words for {budget} tokens")
        others = max(n for n in range(len(self.others) + 1) if total(times, other_times, n) <= budget)
        rng = random.Random(self.seed)
        order = [*range(len(self.common))] * times + [len(self.common) + i for i in range(others)] * other_times
        rng.shuffle(order)
        left = budget - total(times, other_times, others)  # filled with words not used yet, once each
        order += itertools.islice(itertools.cycle(range(len(self.common) + others, len(word_ids))), left)
        numbers = inputs.numbered(len(order))
        pieces = fill((piece for i, w in enumerate(order) for piece in (numbers[i], word_ids[w])), budget)
        listed = Counter(order[: (len(pieces) + 1) // 2])
        if any(listed[w] >= times for w in range(len(self.common), len(word_ids))):
            raise RopeSearchError(f"cwe: the haystack has too few distinct words for {budget} tokens")
        return pieces


@register_task("cwe", "all", 120, "aggregation")
def common_words(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """The ten most common words of a numbered list of English words (the haystack's)."""
    common = rng.sample(inputs.words, COMMON_WORDS)
    # no other word contains a common one or is contained in one: RULER matches answers as substrings
    others = [w for w in inputs.words if not any(c in w or w in c for c in common)]
    rng.shuffle(others)
    return TaskSample(
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        f"Question: What are the {COMMON_WORDS} most common words in the above list?",
        f"Answer: The top {COMMON_WORDS} words that appear most often in the list are:",
        tuple(common),
        CommonWords(tuple(common), tuple(others), rng.getrandbits(64)),
    )


@dataclass(frozen=True)
class CodedText(Context):
    """Coded words with Zipf counts, floor(n k^-alpha / zeta(alpha)) for the k-th word (the first is
    the noise word "..."), n as large as fits, shuffled; then words not used yet, once each."""

    vocabulary: tuple[str, ...]
    seed: int

    def tokens(self, inputs: TaskInputs, budget: int) -> list[list[int]]:
        word_ids = encode(inputs.tokenizer, [" " + w for w in self.vocabulary])

        def counts(n: int) -> list[int]:
            return [math.floor(n * k**-ZIPF_ALPHA / ZETA) for k in range(1, len(word_ids) + 1)]

        def total(n: int) -> int:
            return sum(c * len(ids) for c, ids in zip(counts(n), word_ids))

        low, high = 0, 4 * budget + 8  # the noise word alone is more than `budget` tokens at the top
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if total(middle) <= budget else (low, middle - 1)
        final = counts(low)
        if not final[FREQUENT] > max(final[FREQUENT + 1], 1):
            raise RopeSearchError(f"fwe: {budget} tokens are too few to rank {FREQUENT} words by frequency")
        order = [k for k, c in enumerate(final) for _ in range(c)]
        random.Random(self.seed).shuffle(order)
        unused = [k for k, c in enumerate(final) if c == 0]
        return fill((word_ids[k] for k in itertools.chain(order, unused)), budget)


@register_task("fwe", "all", 50, "aggregation")
def frequent_words(rng: random.Random, inputs: TaskInputs) -> TaskSample:
    """The three most frequent coded words of a text drawn from a Zipf distribution, the noise word
    "..." (the most frequent) ignored."""
    words: list[str] = []
    seen = set()
    while len(words) < CODED_VOCABULARY:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(CODED_LENGTH))
        if word not in seen:
            seen.add(word)
            words.append(word)
    vocabulary = ("...", *words)
    return TaskSample(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words.",
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
        "frequently appeared words in the above coded text?",
        "Answer: According to the coded text above, the three most frequently appeared words are:",
        vocabulary[1 : FREQUENT + 1],
        CodedText(vocabulary, rng.getrandbits(64)),
    )
